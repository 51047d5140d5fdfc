"""Distributed checks run under the ``deepspeed`` launcher by ``test_distributed.py``.

Usage: deepspeed --num_gpus 2 tests/train/ds_harness.py DATA_DIR OUT_DIR

For ZeRO stages 2 and 3, every rank builds the same four packed micro-batches and takes two of
them per step (gradient accumulation 2), so the global batch of a step is the same four
micro-batches as a single process holding all their events in one batch. Rank 0 runs that
single process in plain PyTorch beside the engine and records both, and writes the outcome of
every check to OUT_DIR/harness_stage<N>.json for the test to assert on.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from bumblebee_dist.config import RunConfig, TrainConfig, model_preset
from bumblebee_dist.data.loader import EventLoader
from bumblebee_dist.model import BumblebeeEncoder
from bumblebee_dist.train import checkpoint as ckpt
from bumblebee_dist.train.engine import build_engine, build_optimizer, init_distributed, lr_at
from bumblebee_dist.train.export import (ExportError, expected_shapes,
                                         gather_fp32_state_dict, load_exported, write_export)
from bumblebee_dist.train.loop import PretrainTask, StepInputs, Trainer
from kernels.dispatch import masked_mse

ACCUM = 2
SEED = 7


def concat_inputs(parts: list[StepInputs]) -> StepInputs:
    """Pack several micro-batches into one batch (offsets rebased)."""
    offsets, total = [torch.zeros(1, dtype=torch.int32)], 0
    for part in parts:
        offsets.append(part.cu_seqlens[1:] + total)
        total += part.num_tokens
    cat = {name: torch.cat([getattr(p, name) for p in parts])
           for name in ("features", "pdg_index", "level", "mask", "target", "loss_mask")}
    return StepInputs(cu_seqlens=torch.cat(offsets), max_seqlen=max(p.max_seqlen for p in parts),
                      **cat)


def without_loss_tokens(inputs: StepInputs) -> StepInputs:
    """The same events with nothing masked, so no token enters the loss."""
    clear = torch.zeros_like(inputs.mask)
    return StepInputs(**{**vars(inputs), "mask": clear, "loss_mask": clear})


class ReferenceProcess:
    """One process, plain PyTorch, the whole global batch as one packed batch."""

    def __init__(self, train: TrainConfig, total_steps: int):
        self.model = BumblebeeEncoder(model_preset("tiny"), init_seed=SEED)
        self.optimizer = build_optimizer(self.model, train)
        self.train, self.total_steps, self.step = train, total_steps, 0

    def run_step(self, parts: list[StepInputs] | None) -> float | None:
        """One optimizer step on ``parts`` (None: a skipped step); return the loss."""
        index, self.step = self.step, self.step + 1
        if parts is None:
            return None
        batch = concat_inputs(parts)
        count = int(batch.loss_mask.sum())
        loss = masked_mse(self.model(*batch.forward_args()), batch.target, batch.loss_mask, count)
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(index, self.train, self.total_steps)
        self.optimizer.step()
        return float(loss)


def max_difference(left: dict, right: dict) -> float:
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def nan_head_hook(module, args, output):
    return output * float("nan")


def run_stage(stage: int, data_dir: Path, out_dir: Path, dist) -> dict:
    config = RunConfig(model_preset="tiny", model=model_preset("tiny"))
    config.train = TrainConfig(run_dir=str(out_dir / f"run_stage{stage}"), zero_stage=stage,
                               grad_accum=ACCUM, lr=1e-3, warmup_steps=1, max_steps=8,
                               weight_decay=0.0, grad_clip=1.0, log_every=1,
                               zero3_param_persistence_threshold=0)
    loader = EventLoader(str(data_dir), "train", rank=0, world_size=1, seed=SEED, max_tokens=160,
                         mask_mode="pretrain")
    batches = iter(loader)
    task = PretrainTask()
    global_batches = [[task.prepare(next(batches)) for _ in range(2 * ACCUM)] for _ in range(3)]
    model = BumblebeeEncoder(model_preset("tiny"), init_seed=SEED)
    engine = build_engine(model, config.train, dist)
    Path(config.train.run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, task, engine, loader)
    reference = ReferenceProcess(config.train, trainer.total_steps) if dist.is_main else None
    report = {"stage": stage, "world_size": dist.world_size, "backend": dist.backend, "steps": []}

    def step(parts: list[StepInputs], reference_parts, hook_rank: int | None = None) -> None:
        local = parts[dist.rank * ACCUM:(dist.rank + 1) * ACCUM]
        handle = None
        if hook_rank == dist.rank:
            handle = engine.engine.module.head.register_forward_hook(nan_head_hook)
        result = trainer.train_step(local)
        trainer._after_step(result, None)
        if handle is not None:
            handle.remove()
        state = gather_fp32_state_dict(engine.engine.module)
        if dist.is_main:
            expected = reference.run_step(reference_parts)
            report["steps"].append({
                "loss": result.loss, "reference_loss": expected, "skipped": result.skipped,
                "grad_norm": result.grad_norm,
                "max_param_difference": max_difference(state, reference.model.state_dict())})

    # Normal steps; the global batch is split 2 ranks x 2 micro-batches.
    step(global_batches[0], global_batches[0])
    step(global_batches[1], global_batches[1])
    # Rank 1 has no loss token: the step still runs, normalized by rank 0's count alone.
    partial = global_batches[2][:ACCUM] + [without_loss_tokens(x) for x in global_batches[2][ACCUM:]]
    step(partial, global_batches[2][:ACCUM])
    # No loss token anywhere: skipped by both ranks.
    step([without_loss_tokens(x) for x in global_batches[0]], None)
    # A NaN prediction on rank 1 only: skipped by both ranks.
    step(global_batches[1], None, hook_rank=1)
    # The next step runs normally.
    step(global_batches[0], global_batches[0])

    report.update(check_checkpoint_round_trip(trainer, global_batches, dist))
    if stage == 3:  # right after a step, before any forward pass gathers the parameters
        report.update(check_placeholder_rejected(engine, config, out_dir / "placeholder_export", dist))
    report.update(check_export(engine, config, global_batches[0][0], out_dir / f"export_stage{stage}", dist))
    report.update(check_tied_module(stage, dist))
    return report


def check_checkpoint_round_trip(trainer: Trainer, global_batches, dist) -> dict:
    """Save, take a step, load: parameters equal the saved ones and the step replays exactly."""
    engine = trainer.engine.engine
    saved_state = gather_fp32_state_dict(engine.module)
    path = ckpt.save_checkpoint(engine, trainer.config.train.run_dir, trainer.state.step,
                                {"train_state": vars(trainer.state).copy()}, keep=2,
                                per_rank={"rank": dist.rank})
    local = global_batches[1][dist.rank * ACCUM:(dist.rank + 1) * ACCUM]
    first = trainer.train_step(local)
    loaded = ckpt.load_checkpoint(engine, path)
    restored_state = gather_fp32_state_dict(engine.module)
    again = trainer.train_step(local)
    out = {"checkpoint_rank_entry_ok": loaded["rank"] == dist.rank,
           "checkpoint_path": str(path)}
    if dist.is_main:
        out["checkpoint_max_difference"] = max_difference(saved_state, restored_state)
        out["checkpoint_keys_equal"] = sorted(saved_state) == sorted(restored_state)
        out["replayed_losses"] = [first.loss, again.loss]
    return out


def check_export(engine, config: RunConfig, batch: StepInputs, export_dir: Path, dist) -> dict:
    """Export, load without DeepSpeed, compare outputs on a fixed batch with the engine's."""
    from bumblebee_dist.train.export import export_model

    state = gather_fp32_state_dict(engine.engine.module)
    exported = export_model(engine.engine.module, config.model, export_dir, {"task": "harness"})
    engine.engine.eval()
    with torch.no_grad():
        engine_output = engine.engine(*batch.forward_args())
    engine.engine.train()
    if not dist.is_main:
        return {}
    plain = load_exported(exported)
    with torch.no_grad():
        plain_output = plain(*batch.forward_args())
    return {"export_output_difference": float((plain_output - engine_output).abs().max()),
            "export_weights_difference": max_difference(state, plain.state_dict()),
            "export_numel": sum(t.numel() for t in plain.state_dict().values()),
            "model_numel": sum(int(torch.tensor(s).prod()) for s in expected_shapes(config.model).values())}


def check_placeholder_rejected(engine, config: RunConfig, export_dir: Path, dist) -> dict:
    """Under ZeRO-3 the module's own state_dict holds placeholders: the export must refuse it."""
    module = engine.engine.module
    placeholders = {name: p.data.detach().clone() for name, p in module.named_parameters()}
    placeholders.update({name: b.detach().clone() for name, b in module.named_buffers()})
    if not dist.is_main:
        return {}
    try:
        write_export(placeholders, config.model, export_dir)
        message = ""
    except ExportError as error:
        message = str(error)
    return {"placeholder_error": message,
            "placeholder_file_written": (export_dir / "model.safetensors").exists()}


class TiedToy(torch.nn.Module):
    """Stand-in with tied weights and a 1-element bias, which the encoder does not have."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(7, 6)
        self.head = torch.nn.Linear(6, 7)
        self.head.weight = self.embedding.weight  # tied: one parameter under two keys
        self.score = torch.nn.Linear(6, 1)  # its bias has a single element

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(index)
        return torch.cat([self.head(hidden), self.score(hidden)], dim=-1)


def check_tied_module(stage: int, dist) -> dict:
    """Train the tied stand-in 2 steps, export its gathered state, strict-load it, compare."""
    import deepspeed
    from safetensors.torch import load_file, save_file

    from bumblebee_dist.train.export import check_state_dict

    torch.manual_seed(3)
    model = TiedToy()
    shapes = {name: tuple(t.shape) for name, t in TiedToy().state_dict().items()}
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config)
    index = torch.arange(7) + dist.rank
    for _ in range(2):
        loss = engine(index % 7).square().mean()
        engine.backward(loss)
        engine.step()
    state = gather_fp32_state_dict(engine.module)
    with torch.no_grad():
        engine_output = engine(torch.arange(7))
    if not dist.is_main:
        return {}
    check_state_dict(state, shapes)
    path = Path(tempfile.mkdtemp()) / f"tied_stage{stage}.safetensors"
    save_file(state, str(path))
    plain = TiedToy()
    plain.load_state_dict(load_file(str(path)), strict=True)
    path.unlink()
    with torch.no_grad():
        plain_output = plain(torch.arange(7))
    return {"tied_keys": sorted(state), "tied_output_difference":
            float((plain_output - engine_output).abs().max()),
            "tied_still_shared": plain.head.weight is plain.embedding.weight,
            "score_bias_shape": list(state["score.bias"].shape)}


def main() -> None:
    data_dir, out_dir = Path(sys.argv[-2]), Path(sys.argv[-1])
    dist = init_distributed()
    for stage in (2, 3):
        report = run_stage(stage, data_dir, out_dir, dist)
        if dist.is_main:
            (out_dir / f"harness_stage{stage}.json").write_text(json.dumps(report, indent=1))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
