"""Fine-tuning for event classification with a class token.

Input of each event: reco particles visible, gen particles all masked (loader ``mask_mode="gen"``),
and one class token appended after the event's last token: PDG id ``tokens.CLASS_TOKEN_PDG``,
level reco, mask 1, so its particle vector is never seen. Its target, in model space, is
(1, 0, 0, 0, 0) for signal and all zeros for background. The classifier score of an event is the
first component of the model's prediction for its class token.

Loss: the masked MSE of ``kernels.masked_mse`` over class tokens only, normalized by the global
number of events of the step. The masked gen tokens are inputs the model must not see, not
regression targets here: adding their reconstruction error would mix a second objective, with
its own scale, into a classification fine-tune, so they carry no loss.

Tasks (sample names are looked up in the data set manifest):

- ``toponium``: eta_t events (signal) against ttbar events (background);
- ``initial_state``: ttbar events only, gluon fusion (Pythia process code 601, signal) against
  quark-antiquark annihilation (602, background).

Events outside a task (for example eta_t events in ``initial_state``) are removed from each
batch before the class tokens are appended.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bumblebee_dist.data.packing import PackedBatch
from bumblebee_dist.tokens import CLASS_TOKEN_PDG, LEVEL_RECO, pdg_to_index
from bumblebee_dist.train.loop import StepInputs

LOG = logging.getLogger(__name__)
PROCESS_GG = 601
PROCESS_QQBAR = 602
SIGNAL_TARGET_INDEX = 0  # feature slot that carries the class target and the score
CLASS_TOKEN_INDEX = int(pdg_to_index(np.array([CLASS_TOKEN_PDG]))[0])


@dataclass(frozen=True)
class TaskSpec:
    """Event selection of a fine-tuning task and its signal definition."""

    name: str
    signal_samples: tuple[str, ...]
    background_samples: tuple[str, ...]
    signal_process: int | None = None  # when set, signal = this process code, background = other
    background_process: int | None = None


TASKS = {
    "toponium": TaskSpec("toponium", signal_samples=("eta_t",), background_samples=("ttbar",)),
    "initial_state": TaskSpec("initial_state", signal_samples=("ttbar",),
                              background_samples=("ttbar",), signal_process=PROCESS_GG,
                              background_process=PROCESS_QQBAR),
}


def _sample_ids(samples: list[dict], names: tuple[str, ...], task: str) -> list[int]:
    by_name = {sample["name"]: int(sample["id"]) for sample in samples}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ValueError(f"fine-tuning task {task!r} needs samples {list(names)}, but the data "
                         f"set manifest lists only {sorted(by_name)}; generate them first")
    return [by_name[name] for name in names]


class ClassificationTask:
    """Fine-tuning task: appends class tokens and regresses their target vector.

    ``samples`` is the manifest's sample list (``[{"name": ..., "id": ...}, ...]``).
    """

    mask_mode = "gen"

    def __init__(self, spec: TaskSpec, samples: list[dict]):
        self.spec = spec
        self.name = f"finetune-{spec.name}"
        self.signal_ids = torch.tensor(_sample_ids(samples, spec.signal_samples, spec.name))
        self.background_ids = torch.tensor(_sample_ids(samples, spec.background_samples, spec.name))

    def select(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (keep (E,) bool, label (E,) float32) of the batch's events."""
        sample = batch.sample.long()
        in_signal = torch.isin(sample, self.signal_ids)
        in_background = torch.isin(sample, self.background_ids)
        if self.spec.signal_process is None:
            return in_signal | in_background, in_signal.float()
        code = batch.process_code.long()
        signal = in_signal & (code == self.spec.signal_process)
        background = in_background & (code == self.spec.background_process)
        return signal | background, signal.float()

    def prepare(self, batch: PackedBatch) -> StepInputs:
        """Keep the task's events, append their class tokens, and set the loss on those alone."""
        keep, labels = self.select(batch)
        kept = select_events(batch, keep)
        return append_class_tokens(kept, labels[keep])


def build_task(task: str, samples: list[dict]) -> ClassificationTask:
    """Return the fine-tuning task named ``task`` for a data set with ``samples``."""
    if task not in TASKS:
        raise ValueError(f"fine-tuning task {task!r} is unknown; valid tasks: {sorted(TASKS)}")
    return ClassificationTask(TASKS[task], samples)


def select_events(batch: PackedBatch, keep: torch.Tensor) -> PackedBatch:
    """Return a packed batch holding only the events where ``keep`` (E,) is True."""
    lengths = torch.diff(batch.cu_seqlens.long())
    token_keep = torch.repeat_interleave(keep, lengths)
    kept_lengths = lengths[keep]
    cu_seqlens = torch.zeros(kept_lengths.numel() + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(kept_lengths, 0)
    return PackedBatch(
        features=batch.features[token_keep], pdg_index=batch.pdg_index[token_keep],
        level=batch.level[token_keep], mask=batch.mask[token_keep], cu_seqlens=cu_seqlens,
        max_seqlen=int(kept_lengths.max()) if kept_lengths.numel() else 0,
        event_id=batch.event_id[keep], process_code=batch.process_code[keep],
        sample=batch.sample[keep], m_ttbar_true=batch.m_ttbar_true[keep])


def class_token_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Rows of the class tokens in a batch built by ``append_class_tokens``: each event's last."""
    return cu_seqlens[1:].long() - 1


def append_class_tokens(batch: PackedBatch, labels: torch.Tensor) -> StepInputs:
    """Append one masked class token per event; its target is ``labels`` (E,) in slot 0.

    Token t of event e moves to row t + e, because each earlier event gained one token. The
    class token of event e takes the last row of the event.
    """
    num_events, num_tokens = batch.num_events, batch.num_tokens
    lengths = torch.diff(batch.cu_seqlens.long())
    cu_seqlens = batch.cu_seqlens.long() + torch.arange(num_events + 1)
    event_of_token = torch.repeat_interleave(torch.arange(num_events), lengths)
    old_rows = torch.arange(num_tokens) + event_of_token
    class_rows = class_token_positions(cu_seqlens)
    total = num_tokens + num_events

    features = batch.features.new_zeros((total, batch.features.shape[1]))
    features[old_rows] = batch.features
    target = features.clone()
    target[class_rows, SIGNAL_TARGET_INDEX] = labels.to(target.dtype)
    pdg_index = _scatter(batch.pdg_index, old_rows, class_rows, CLASS_TOKEN_INDEX, total)
    level = _scatter(batch.level, old_rows, class_rows, LEVEL_RECO, total)
    mask = _scatter(batch.mask, old_rows, class_rows, True, total)
    loss_mask = torch.zeros(total, dtype=torch.bool)
    loss_mask[class_rows] = True
    max_seqlen = batch.max_seqlen + 1 if num_events else 0
    return StepInputs(features=features, pdg_index=pdg_index, level=level, mask=mask,
                      cu_seqlens=cu_seqlens.to(torch.int32), max_seqlen=max_seqlen,
                      target=target, loss_mask=loss_mask, labels=labels.float())


def _scatter(values: torch.Tensor, old_rows: torch.Tensor, class_rows: torch.Tensor,
             class_value, total: int) -> torch.Tensor:
    out = values.new_empty(total)
    out[old_rows] = values
    out[class_rows] = class_value
    return out


@torch.no_grad()
def class_scores(model: torch.nn.Module, inputs: StepInputs) -> torch.Tensor:
    """Classifier score (E,) of each event: slot 0 of the class-token prediction."""
    prediction = model(*inputs.forward_args())
    return prediction[class_token_positions(inputs.cu_seqlens), SIGNAL_TARGET_INDEX].float()


def load_starting_model(config, dist):
    """Return the model fine-tuning starts from: ``finetune.pretrained`` or a fresh init.

    A ``models:/`` URI is downloaded by rank 0 into ``<run_dir>/pretrained`` and read by every
    rank from there (one node, or a run folder every node shares). The export's model config
    replaces ``config.model``, so a preset given on the command line cannot mismatch the weights.
    The export's feature statistics, when it records them, become ``model.feature_stats``, and
    fine-tuning standardizes its inputs with them.
    """
    from bumblebee_dist.model import BumblebeeEncoder
    from bumblebee_dist.tracking import (ModelRegistry, fetch_pretrained, parse_model_uri,
                                         resolve_store)
    from bumblebee_dist.features import FeatureStats
    from bumblebee_dist.train.export import load_exported, read_export_config
    from bumblebee_dist.train.run import broadcast

    spec = config.finetune.pretrained
    if not spec:
        return BumblebeeEncoder(config.model, init_seed=config.train.seed)
    outcome = None
    if dist.is_main:
        try:
            tracking_uri, _ = resolve_store(config.tracking, config.train.run_dir)
            resolved = spec
            if spec.startswith("models:/"):  # an alias can move later: fetch and record its version
                name, _, _ = parse_model_uri(spec)
                resolved = f"models:/{name}/{ModelRegistry(tracking_uri).version_source(spec)[0]}"
            folder = fetch_pretrained(resolved, tracking_uri,
                                      Path(config.train.run_dir) / "pretrained")
            outcome = ("ok", (str(folder), resolved))
        except Exception as error:  # sent to every rank so that all of them stop together
            outcome = ("error", f"{type(error).__name__}: {error}")
    status, value = broadcast(outcome)
    if status == "error":
        raise RuntimeError(f"finetune.pretrained={spec!r} could not be fetched: {value}")
    value, resolved = value
    model = load_exported(value)
    model.pretrained_version = resolved
    if model.config != config.model and dist.is_main:
        LOG.info("model config taken from the pre-trained export %s: %s", value, model.config)
    config.model = model.config
    export_config = read_export_config(value)
    if dist.is_main:
        LOG.info("fine-tuning starts from %s (%s)", resolved, value)
        if export_config.get("task") not in (None, "pretrain"):
            LOG.warning("finetune.pretrained=%s records training task %r, not 'pretrain': "
                        "fine-tuning starts from a model already fine-tuned", spec,
                        export_config["task"])
    recorded = export_config.get("feature_stats")
    if recorded is not None:
        # The pre-trained model learned on inputs standardized with these statistics.
        model.feature_stats = FeatureStats.from_manifest(recorded)
    elif dist.is_main:
        LOG.warning("finetune.pretrained=%s records no feature statistics: inputs are "
                    "standardized with the statistics of %s, which may differ from those it "
                    "was trained with", spec, config.data.path)
    return model


def run_finetuning(config, resume: str = "auto"):
    """Fine-tune on ``config.finetune.task`` with the shared loop; return result.json on rank 0."""
    from bumblebee_dist.data.shards import read_manifest
    from bumblebee_dist.train.engine import init_distributed
    from bumblebee_dist.train.run import run_job, seed_everything, setup_logging

    dist = init_distributed()
    setup_logging(dist)
    seed_everything(config.train.seed)
    task = build_task(config.finetune.task, read_manifest(config.data.path).samples)
    model = load_starting_model(config, dist)
    metadata = {"finetune_task": config.finetune.task,
                "pretrained": config.finetune.pretrained or None,
                "pretrained_version": getattr(model, "pretrained_version", None)}
    return run_job(config, task, model, dist, resume, metadata,
                   feature_stats=getattr(model, "feature_stats", None))
