"""The end-of-demo summary: one table of what was made and how well the models do."""

from __future__ import annotations

from typing import Any


def _sample_rows(manifest: dict) -> list[dict]:
    rows = []
    for sample in manifest.get("samples", []):
        cut_flow = sample.get("cut_flow", {})
        counts = list(cut_flow.values()) if isinstance(cut_flow, dict) else [c for _, c in cut_flow]
        generated = counts[0] if counts else None
        selected = counts[-1] if counts else None
        efficiency = selected / generated if generated else None
        rows.append({"sample": sample["name"], "generated": generated, "selected": selected,
                     "efficiency": efficiency})
    return rows


def build_summary(results: dict[str, Any], timings: dict[str, float]) -> dict:
    """Collect the numbers of every step's result into one JSON-ready dict."""
    manifest = results.get("generate and shard", {})
    pretrain = results.get("pre-train", {})
    finetune = results.get("fine-tune", {})
    evaluation = results.get("evaluate", {})
    return {
        "samples": _sample_rows(manifest),
        "pretrain": {key: pretrain.get(key) for key in
                     ("first_loss", "last_loss", "steps", "events_seen", "registered_model",
                      "registered_version")},
        "finetune": {key: finetune.get(key) for key in
                     ("first_loss", "last_loss", "steps", "events_seen", "registered_model",
                      "registered_version")},
        "classification": evaluation.get("classification", {}),
        "reconstruction": evaluation.get("reconstruction", {}),
        "step_seconds": timings,
    }


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_summary(summary: dict) -> str:
    """Render the summary as a plain-text table for the terminal."""
    lines = ["", "=" * 72, "bumblebee-dist demo summary", "=" * 72, "",
             f"{'sample':<10}{'generated':>12}{'selected':>12}{'cut-flow efficiency':>22}"]
    for row in summary["samples"]:
        lines.append(f"{row['sample']:<10}{_number(row['generated']):>12}{_number(row['selected']):>12}"
                     f"{_number(row['efficiency'], 3):>22}")
    for stage in ("pretrain", "finetune"):
        info = summary[stage]
        lines += ["", f"{stage}: loss {_number(info['first_loss'])} -> {_number(info['last_loss'])} "
                      f"over {_number(info['steps'])} steps; registered "
                      f"{_number(info['registered_model'])} version {_number(info['registered_version'])}"]
    classification = summary["classification"]
    if classification:
        lines += ["", f"{'classifier (' + classification.get('task', '') + ')':<34}{'AUROC':>16}{'test events':>14}"]
        for name, result in classification.get("models", {}).items():
            auroc = f"{result['auroc']:.3f} +- {result['uncertainty']:.3f}"
            lines.append(f"{name:<34}{auroc:>16}{result['num_events']:>14}")
    reconstruction = summary["reconstruction"]
    if reconstruction:
        lines += ["", "reconstruction, all gen particles masked (bias / resolution):"]
        for name, value in reconstruction.items():
            if isinstance(value, dict) and "resolution" in value:
                lines.append(f"  {name:<22}{value['bias']:>+10.3f} /{value['resolution']:>8.3f}"
                             f"   ({value['num_events']} entries)")
    lines.append("")
    return "\n".join(lines)
