"""Four-rank checks run by ``test_train_multinode.py`` as four "nodes" on one machine.

Usage: launch/local_multinode.sh --nodes 4 tests/train/ds_stages_harness.py DATA_DIR OUT_DIR

1. ``launch/pretrain.py`` itself runs a few steps of pre-training into OUT_DIR/pretrain: tiny
   preset, ZeRO-3 with every parameter partitioned, a checkpoint and an export. It validates
   in the middle of training and at the end, and one rank gets an empty validation batch.
   Then ``agree_on_count`` is given a count that differs on rank 0 and must raise on every
   rank;
2. ZeRO stages 0, 1, 2 and 3, each on a fresh engine, take the same 3 fp32 steps; rank 0
   records the logged losses, the parameters after every step against one plain PyTorch process,
   and the exported safetensors against the engine;
3. gradient accumulation: one micro-batch of 8 events per rank against 4 micro-batches of 2;
4. a toy model with an odd parameter count (27) and a 1-element bias, under ZeRO-2 and ZeRO-3;
5. the steps of 2 in bf16 under ZeRO stages 0 to 3, against the same fp32 plain process, with
   AdamW's step count read from its state, and a checkpoint saved and loaded at each stage.

Rank 0 writes OUT_DIR/stages.json for the test to assert on.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import torch

from bumblebee_dist.config import RunConfig, TrainConfig, model_preset
from bumblebee_dist.data.loader import EventLoader
from bumblebee_dist.model import BumblebeeEncoder
from bumblebee_dist.train import checkpoint as ckpt
from bumblebee_dist.train import entry
from bumblebee_dist.train.engine import DistInfo, build_engine, init_distributed
from bumblebee_dist.train.export import (expected_shapes, export_model, gather_fp32_state_dict,
                                         load_exported)
from bumblebee_dist.train.loop import (STEP_LOG_NAME, PretrainTask, RankMismatchError,
                                       StepInputs, Trainer, agree_on_count, all_reduce_sum)
from ds_harness import ReferenceProcess, max_difference

SEED = 7
STEPS = 3
REPO_ROOT = Path(__file__).resolve().parents[2]


def run_entry_point(data_dir: Path, out_dir: Path, expected_world_size: str) -> None:
    """Run launch/pretrain.py in this process, as the launcher would."""
    sys.argv = ["launch/pretrain.py", "--expected_world_size", expected_world_size,
                "--preset", "tiny", f"data.path={data_dir}", "data.max_tokens=256",
                f"train.run_dir={out_dir / 'pretrain'}", "train.max_steps=3",
                "train.checkpoint_every=2", "train.val_every=2", "train.zero_stage=3",
                "train.zero3_param_persistence_threshold=0", "train.log_every=1",
                "tracking.enabled=false"]
    # The entry point destroys the process group at its end; this harness keeps using it.
    entry.close_process_group = lambda: None
    runpy.run_path(str(REPO_ROOT / "launch" / "pretrain.py"), run_name="__main__")


def check_count_guard(dist: DistInfo) -> dict:
    """A count that differs on rank 0 must raise on every rank; an equal one must pass."""
    try:
        agree_on_count(2 if dist.is_main else 1, "the test count", torch.device("cpu"))
        message = ""
    except RankMismatchError as error:
        message = str(error)
    raised, = all_reduce_sum([float(bool(message))], torch.device("cpu"))
    equal = agree_on_count(5, "the test count", torch.device("cpu"))
    return {"guard": {"ranks_raised": int(raised), "message": message, "equal_count": equal}}


def slice_events(inputs: StepInputs, start: int, stop: int) -> StepInputs:
    """Events ``start:stop`` of a packed micro-batch, as a packed micro-batch of their own."""
    first, last = int(inputs.cu_seqlens[start]), int(inputs.cu_seqlens[stop])
    offsets = inputs.cu_seqlens[start:stop + 1] - first
    lengths = offsets[1:] - offsets[:-1]
    tokens = {name: getattr(inputs, name)[first:last]
              for name in ("features", "pdg_index", "level", "mask", "target", "loss_mask")}
    return StepInputs(cu_seqlens=offsets.to(torch.int32), max_seqlen=int(lengths.max()), **tokens)


def stage_config(stage: int, run_dir: Path, grad_accum: int = 1, lr: float = 1e-3,
                 precision: str = "fp32") -> RunConfig:
    config = RunConfig(model_preset="tiny", model=model_preset("tiny"))
    config.train = TrainConfig(run_dir=str(run_dir), zero_stage=stage, grad_accum=grad_accum,
                               precision=precision, lr=lr, warmup_steps=1, max_steps=STEPS,
                               weight_decay=0.0, grad_clip=1.0, log_every=1,
                               zero3_param_persistence_threshold=0)
    return config


def train_steps(config: RunConfig, loader, steps: list[list[StepInputs]], dist: DistInfo,
                export_dir: Path | None = None, round_trip: bool = False) -> dict:
    """Train on a fresh engine, one optimizer step per entry of ``steps`` (this rank's inputs).

    With ``round_trip``, the engine then saves a checkpoint, takes one more step, loads the
    checkpoint and takes the same step again: both losses and weights must be equal.
    """
    Path(config.train.run_dir).mkdir(parents=True, exist_ok=True)
    engine = build_engine(BumblebeeEncoder(config.model, init_seed=SEED), config.train, dist)
    trainer = Trainer(config, PretrainTask(), engine, loader)
    states = []
    for group in steps:
        inputs = [part.to(engine.device, engine.input_dtype) for part in group]
        trainer._after_step(trainer.train_step(inputs), None)
        states.append(gather_fp32_state_dict(engine.engine.module))
    out: dict = {"states": states, "adam_steps": adam_step_counts(engine.engine.optimizer)}
    if export_dir is not None:
        exported = export_model(engine.engine.module, config.model, export_dir)
        probe = steps[0][0]
        engine.engine.eval()
        with torch.no_grad():
            engine_output = engine.engine(
                *probe.to(engine.device, engine.input_dtype).forward_args()).float()
        if dist.is_main:
            plain = load_exported(exported)
            with torch.no_grad():
                plain_output = plain(*probe.forward_args())
            out["export_output_difference"] = float((plain_output - engine_output).abs().max())
            out["export_weights_difference"] = max_difference(states[-1], plain.state_dict())
            out["export_numel"] = sum(t.numel() for t in plain.state_dict().values())
            values = torch.cat([t.flatten() for t in plain.state_dict().values()])
            out["export_bf16_exact_share"] = float((values.bfloat16().float() == values).float().mean())
    if round_trip:
        out.update(checkpoint_round_trip(trainer, steps[0], dist))
    if dist.is_main:
        rows = (Path(config.train.run_dir) / STEP_LOG_NAME).read_text().splitlines()
        out["logged_losses"] = [json.loads(row)["loss"] for row in rows]
        out["logged_grad_norms"] = [json.loads(row)["grad_norm"] for row in rows]
    return out


def checkpoint_round_trip(trainer: Trainer, group: list[StepInputs], dist: DistInfo) -> dict:
    """Save, step, load, step again; return both losses and the largest weight difference."""
    engine = trainer.engine
    path = ckpt.save_checkpoint(engine.engine, trainer.config.train.run_dir, trainer.state.step,
                                {"train_state": vars(trainer.state).copy()}, keep=2)
    inputs = [part.to(engine.device, engine.input_dtype) for part in group]
    first = trainer.train_step(inputs)
    after_first = gather_fp32_state_dict(engine.engine.module)
    ckpt.load_checkpoint(engine.engine, path)
    again = trainer.train_step(inputs)
    after_again = gather_fp32_state_dict(engine.engine.module)
    if not dist.is_main:
        return {}
    return {"round_trip_losses": [first.loss, again.loss],
            "round_trip_difference": max_difference(after_first, after_again)}


def adam_step_counts(optimizer) -> list[float]:
    """The distinct ``step`` values in the state of the AdamW that ``optimizer`` wraps."""
    base = getattr(optimizer, "optimizer", optimizer)
    return sorted({float(state["step"]) for state in base.state.values() if "step" in state})


def mean_difference(left: dict, right: dict) -> float:
    """Mean absolute difference over every element of two state dicts with the same keys."""
    total = sum(float((left[k].float() - right[k].float()).abs().sum()) for k in left)
    return total / sum(left[k].numel() for k in left)


def check_stages(data_dir: Path, out_dir: Path, dist: DistInfo) -> dict:
    """Same 3 steps under ZeRO 0 to 3 and in one plain process; losses, weights and exports.

    Then the same steps again in bf16, against the same fp32 plain process.
    """
    loader = EventLoader(str(data_dir), "train", rank=0, world_size=1, seed=SEED, max_tokens=160)
    batches = iter(loader)
    task = PretrainTask()
    global_steps = [[task.prepare(next(batches)) for _ in range(dist.world_size)] for _ in range(STEPS)]
    local_steps = [[group[dist.rank]] for group in global_steps]
    report: dict = {"model_numel": sum(int(torch.tensor(shape).prod())
                                       for shape in expected_shapes(model_preset("tiny")).values())}
    reference = None
    if dist.is_main:
        reference = ReferenceProcess(stage_config(0, out_dir / "unused").train, STEPS)
        report["reference_losses"] = [reference.run_step(group) for group in global_steps]
    for stage in (0, 1, 2, 3):
        config = stage_config(stage, out_dir / f"stage{stage}")
        result = train_steps(config, loader, local_steps, dist, out_dir / f"export_stage{stage}")
        if dist.is_main:
            result["param_difference_to_reference"] = max_difference(
                result["states"][-1], reference.model.state_dict())
            result.pop("states")
            report[f"stage{stage}"] = result
    for stage in (0, 1, 2, 3):
        config = stage_config(stage, out_dir / f"bf16_stage{stage}", precision="bf16")
        result = train_steps(config, loader, local_steps, dist, out_dir / f"bf16_export_stage{stage}",
                             round_trip=True)
        if dist.is_main:
            final = result.pop("states")[-1]
            result["param_difference_to_reference"] = max_difference(final, reference.model.state_dict())
            result["mean_param_difference_to_reference"] = mean_difference(
                final, reference.model.state_dict())
            report[f"bf16_stage{stage}"] = result
    return report


def check_accumulation(data_dir: Path, out_dir: Path, dist: DistInfo) -> dict:
    """One micro-batch of 8 events per rank against 4 micro-batches of 2 with accumulation."""
    loader = EventLoader(str(data_dir), "train", rank=0, world_size=1, seed=SEED, max_tokens=4096)
    task = PretrainTask()
    batch = task.prepare(next(iter(loader)))
    assert batch.num_events >= 8 * dist.world_size * STEPS, batch.num_events
    whole, split = [], []
    for step in range(STEPS):
        start = (step * dist.world_size + dist.rank) * 8
        whole.append([slice_events(batch, start, start + 8)])
        split.append([slice_events(batch, start + 2 * part, start + 2 * part + 2) for part in range(4)])
    # AdamW divides by the root of the second moment, which in the first steps turns the rounding
    # of near-zero gradients into updates of up to about lr; lr=1e-4 keeps that below 1e-5.
    one = train_steps(stage_config(2, out_dir / "accum1", lr=1e-4), loader, whole, dist)
    four = train_steps(stage_config(2, out_dir / "accum4", grad_accum=4, lr=1e-4), loader, split,
                       dist)
    if not dist.is_main:
        return {}
    return {"accumulation": {
        "losses_one_micro_batch": one["logged_losses"],
        "losses_four_micro_batches": four["logged_losses"],
        "grad_norms_one_micro_batch": one["logged_grad_norms"],
        "grad_norms_four_micro_batches": four["logged_grad_norms"],
        "param_differences": [max_difference(a, b) for a, b in zip(one["states"], four["states"])]}}


class OddToy(torch.nn.Module):
    """27 parameters (not divisible by 4 ranks), with a 1-element bias on the score head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embedding = torch.nn.Embedding(5, 3)  # 15
        self.head = torch.nn.Linear(3, 2)  # 8
        self.score = torch.nn.Linear(3, 1)  # 4, bias of 1 element

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(index)
        return torch.cat([self.head(hidden), self.score(hidden)], dim=-1)


def train_toy(model: torch.nn.Module, step_fn) -> None:
    index = torch.arange(5)
    for _ in range(2):
        step_fn(model(index).square().mean() + model(index)[:, 2].mean())


def check_odd_toy(stage: int, out_dir: Path, dist: DistInfo) -> dict:
    """Train the odd toy 2 steps, export its gathered state, compare with plain PyTorch."""
    import deepspeed
    from safetensors.torch import load_file, save_file

    from bumblebee_dist.train.export import check_state_dict

    model = OddToy()
    initial_bias = model.score.bias.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    # DeepSpeed clips gradients at norm 1.0 when the config names no value; the plain process
    # below does not clip.
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0, "zero_optimization": zero})

    def engine_step(loss):
        engine.backward(loss)
        engine.step()

    train_toy(engine, engine_step)
    state = gather_fp32_state_dict(engine.module)
    if not dist.is_main:
        return {}
    plain = OddToy()
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0)

    def plain_step(loss):
        plain_optimizer.zero_grad()
        loss.backward()
        plain_optimizer.step()

    train_toy(plain, plain_step)
    shapes = {name: tuple(t.shape) for name, t in plain.state_dict().items()}
    check_state_dict(state, shapes)
    path = out_dir / f"odd_stage{stage}.safetensors"
    save_file(state, str(path))
    exported = load_file(str(path))
    return {f"odd_stage{stage}": {
        "numel": sum(t.numel() for t in exported.values()),
        "model_numel": sum(p.numel() for p in plain.parameters()),
        "export_equals_gathered": all(torch.equal(exported[k], state[k]) for k in state),
        "difference_to_plain": max_difference(exported, plain.state_dict()),
        "score_bias_shape": list(exported["score.bias"].shape),
        "score_bias_change": float((exported["score.bias"] - initial_bias).abs().max())}}


def main() -> None:
    data_dir, out_dir = Path(sys.argv[-2]), Path(sys.argv[-1])
    expected = sys.argv[sys.argv.index("--expected_world_size") + 1]
    run_entry_point(data_dir, out_dir, expected)
    dist = init_distributed()
    report = {"world_size": dist.world_size, "backend": dist.backend}
    report.update(check_count_guard(dist))
    report.update(check_stages(data_dir, out_dir, dist))
    report.update(check_accumulation(data_dir, out_dir, dist))
    for stage in (2, 3):
        report.update(check_odd_toy(stage, out_dir, dist))
    if dist.is_main:
        (out_dir / "stages.json").write_text(json.dumps(report, indent=1))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
