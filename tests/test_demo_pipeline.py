"""The whole demo chain on a tiny data set: real Pythia, Ray, DeepSpeed and MLflow."""

import json

import mlflow
import pytest

from bumblebee_dist.cli import main
from bumblebee_dist.pipeline import FINETUNED_MODEL, PRETRAINED_MODEL, DemoSettings, run_demo


@pytest.mark.slow
def test_demo_chain_end_to_end(tmp_path, capsys):
    settings = DemoSettings(out=str(tmp_path / "demo"), ttbar_events=1200, eta_t_events=900,
                            events_per_shard=300, seed=5, preset="tiny", pretrain_epochs=2,
                            finetune_epochs=2, max_tokens=256)
    summary = run_demo(settings)

    printed = capsys.readouterr().out
    assert "bumblebee-dist demo summary" in printed
    assert "MLP on reco features" in printed
    samples = {row["sample"]: row for row in summary["samples"]}
    assert samples["ttbar"]["generated"] == 1200
    assert samples["eta_t"]["generated"] == 900
    assert 0 < samples["ttbar"]["selected"] < 1200
    assert summary["pretrain"]["steps"] > 0
    assert summary["finetune"]["steps"] > 0
    assert summary["pretrain"]["first_loss"] is not None
    models = summary["classification"]["models"]
    assert set(models) == {"bumblebee (fine-tuned)", "MLP on reco features"}
    for result in models.values():
        assert 0.0 <= result["auroc"] <= 1.0
        assert result["num_events"] > 0
    assert summary["reconstruction"]["mttbar_relative"]["num_events"] > 0
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["pretrain"] == summary["pretrain"]
    for name in ("roc_toponium.png", "scores_toponium.png", "reconstruction_residuals.png"):
        assert (tmp_path / "demo" / "evaluation" / name).stat().st_size > 1000

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri)
    data_experiment = client.get_experiment_by_name("bumblebee-data")
    (data_run,) = client.search_runs([data_experiment.experiment_id])
    assert data_run.data.metrics["cut_flow/ttbar/generated"] == 1200
    assert len(client.list_artifacts(data_run.info.run_id, "validation_plots")) > 5
    for name in (PRETRAINED_MODEL, FINETUNED_MODEL):
        assert int(client.get_model_version_by_alias(name, "champion").version) == 1

    # Both exports record the statistics their inputs were standardized with.
    stats = json.loads((tmp_path / "demo" / "data" / "manifest.json").read_text())["feature_stats"]
    for step in ("pretrain", "finetune"):
        export_config = json.loads((tmp_path / "demo" / step / "export" / "config.json").read_text())
        assert export_config["feature_stats"] == stats, step
    # Fine-tuning names the version its models:/...@champion start pointed at when it ran.
    finetune_config = json.loads((tmp_path / "demo" / "finetune" / "export" / "config.json").read_text())
    assert finetune_config["pretrained_version"] == f"models:/{PRETRAINED_MODEL}/1"

    # The registry comparison scores the same test events as the demo's evaluation.
    main(["models", "compare", "--tracking-uri", settings.tracking_uri, "--data",
          str(tmp_path / "demo" / "data"), "--out", str(tmp_path / "compare"),
          f"models:/{FINETUNED_MODEL}@champion", f"models:/{FINETUNED_MODEL}/1"])
    compared = json.loads((tmp_path / "compare" / "compare.json").read_text())["models"]
    demo_auroc = models["bumblebee (fine-tuned)"]["auroc"]
    assert compared[f"models:/{FINETUNED_MODEL}@champion"]["auroc"] == pytest.approx(demo_auroc)
    assert compared[f"models:/{FINETUNED_MODEL}/1"]["num_events"] == \
        models["bumblebee (fine-tuned)"]["num_events"]
    assert (tmp_path / "compare" / "compare_roc_toponium.png").stat().st_size > 1000

    # A second start finds every step complete and changes nothing.
    again = run_demo(settings)
    assert again["pretrain"] == summary["pretrain"]
    assert again["classification"] == summary["classification"]
