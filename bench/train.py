"""Training benchmarks: packed vs padded throughput, and model-state memory per ZeRO stage.

    python -m bench.train [--data DIR] [--preset small] [--steps 6]

(a) Throughput of plain PyTorch training steps (one process) on the real event lengths, in real
    tokens per second, for token-budget packed batches and for the same events padded to the
    longest event of each batch. Padding is built as extra tokens per event that no loss reads,
    so the padded step does the work of a padded implementation. The bound printed beside the
    measured ratio is sum of lengths / (events x max length per batch): the share of real tokens
    in the padded batches.
(b) Model-state bytes per rank (parameters, gradients, optimizer states, and the fp32 master
    copy DeepSpeed keeps for ZeRO 1 to 3) actually allocated after one AdamW step, for ZeRO 0,
    1, 2 and 3 on 4 CPU ranks in one launch, as ratios to stage 0. The theoretical ratios, for
    fp32 AdamW with 4 bytes of parameter, 4 of gradient and 8 of moments per parameter and no
    separate master copy, on N ranks: stage 0 = 16/16, stage 1 = (4 + 4 + 8/N)/16, stage 2 =
    (4 + (4 + 8)/N)/16, stage 3 = 16/N/16.

The data set is ``--data``, else ``runs/demo/data`` when complete, else a small synthetic one.
No number here is asserted by a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEMO_DATA = Path("runs/demo/data")
WORLD = 4


def _data_path(requested: Path | None, scratch: Path) -> Path:
    if requested is not None:
        return requested
    manifest = DEMO_DATA / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
        return DEMO_DATA
    from bumblebee_dist.data.synthetic import write_dataset

    print(f"no complete data set in {DEMO_DATA}: using a synthetic one", flush=True)
    write_dataset(scratch / "data", {"train": [1500, 1500]}, seed=4)
    return scratch / "data"


def padded_copy(inputs):
    """Extend each event of a batch to the batch's longest event with tokens no loss reads."""
    from bumblebee_dist.train.loop import StepInputs

    lengths = (inputs.cu_seqlens[1:] - inputs.cu_seqlens[:-1]).long()
    longest = int(lengths.max())
    slot = torch.arange(longest)[None, :]
    real = slot < lengths[:, None]  # (E, longest)
    # A padding token repeats its event's last token; its mask and loss mask are cleared below.
    last = (lengths[:, None] - 1).clamp(min=0)
    source = inputs.cu_seqlens[:-1, None].long() + torch.minimum(slot, last)
    source = source.reshape(-1).clamp(0, max(inputs.num_tokens - 1, 0))
    keep = real.reshape(-1)
    tokens = {}
    for name in ("features", "pdg_index", "level", "mask", "target", "loss_mask"):
        value = getattr(inputs, name)[source]
        if name in ("mask", "loss_mask"):
            value = value & keep
        tokens[name] = value
    offsets = torch.arange(len(lengths) + 1, dtype=torch.int32) * longest
    return StepInputs(cu_seqlens=offsets, max_seqlen=longest, **tokens)


def measure_throughput(data: Path, preset: str, steps: int, max_tokens: int) -> None:
    from bumblebee_dist.config import TrainConfig, model_preset
    from bumblebee_dist.data.loader import EventLoader
    from bumblebee_dist.model import BumblebeeEncoder
    from bumblebee_dist.train.engine import build_optimizer
    from bumblebee_dist.train.loop import PretrainTask
    from kernels.dispatch import masked_mse

    loader = EventLoader(str(data), "train", seed=1, max_tokens=max_tokens)
    task = PretrainTask()
    packed = [task.prepare(batch) for _, batch in zip(range(steps + 1), loader)]
    padded = [padded_copy(inputs) for inputs in packed]
    real = sum(x.num_tokens for x in packed[1:])
    bound = real / sum(x.num_tokens for x in padded[1:])
    rates = {}
    for name, batches in (("packed", packed), ("padded", padded)):
        model = BumblebeeEncoder(model_preset(preset), init_seed=1)
        optimizer = build_optimizer(model, TrainConfig())
        for index, inputs in enumerate(batches):
            if index == 1:  # the first step warms up allocations and is not timed
                started = time.perf_counter()
            count = max(1, int(inputs.loss_mask.sum()))
            loss = masked_mse(model(*inputs.forward_args()), inputs.target, inputs.loss_mask, count)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates[name] = real / (time.perf_counter() - started)
    events = sum(x.num_events for x in packed[1:])
    print(f"\n(a) training throughput, preset {preset}, {steps} steps of {events // steps} events "
          f"on average, {torch.get_num_threads()} threads")
    print(f"    packed: {rates['packed']:10.0f} real tokens/s")
    print(f"    padded: {rates['padded']:10.0f} real tokens/s")
    print(f"    padded / packed = {rates['padded'] / rates['packed']:.3f}; bound from the lengths "
          f"(real tokens / padded tokens) = {bound:.3f}")


def theoretical_ratio(stage: int, world: int) -> float:
    """Model-state bytes of a ZeRO stage over stage 0, for fp32 AdamW (16 bytes per parameter)."""
    per_parameter = {0: 4 + 4 + 8, 1: 4 + 4 + 8 / world, 2: 4 + (4 + 8) / world, 3: 16 / world}
    return per_parameter[stage] / 16


def _storages(value, seen: set, depth: int = 0):
    """Yield (attribute path, tensor) reachable from ``value`` through attributes and containers."""
    if depth > 4 or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield "", value
        return
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    elif hasattr(value, "__dict__") and type(value).__module__.startswith(("deepspeed", "torch.optim")):
        items = vars(value).items()
    else:
        return
    for key, item in items:
        for path, tensor in _storages(item, seen, depth + 1):
            yield f"{key}.{path}" if path else str(key), tensor


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer states and fp32 master copy held by this rank."""
    counted: set[int] = set()
    totals = {"parameters": 0, "gradients": 0, "optimizer_states": 0, "master_copy": 0}

    def add(role: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in counted:
            return
        counted.add(storage.data_ptr())
        totals[role] += storage.nbytes()

    for parameter in engine.module.parameters():
        add("parameters", getattr(parameter, "ds_tensor", parameter))
    for parameter in engine.module.parameters():
        if parameter.grad is not None:
            add("gradients", parameter.grad)
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    for state in base.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                add("optimizer_states", value)
    for path, tensor in _storages(optimizer, set()):
        name = path.lower()
        if "grad" in name:
            add("gradients", tensor)
        elif "fp32" in name or "single_partition" in name:
            add("master_copy", tensor)
    return totals


def zero_worker(out: Path, preset: str) -> None:
    """Run under deepspeed with 4 ranks: one AdamW step per stage, then measure this rank."""
    from bumblebee_dist.config import TrainConfig, model_preset
    from bumblebee_dist.model import BumblebeeEncoder
    from bumblebee_dist.model.encoder import count_parameters
    from bumblebee_dist.train.engine import build_engine, init_distributed
    from bumblebee_dist.train.loop import StepInputs

    dist = init_distributed()
    tokens = 64
    generator = torch.Generator().manual_seed(dist.rank)
    inputs = StepInputs(features=torch.randn(tokens, 5, generator=generator),
                        pdg_index=torch.zeros(tokens, dtype=torch.int64),
                        level=torch.ones(tokens, dtype=torch.int64),
                        mask=torch.arange(tokens) % 4 == 0,
                        cu_seqlens=torch.tensor([0, 16, 32, 48, 64], dtype=torch.int32),
                        max_seqlen=16, target=torch.zeros(tokens, 5),
                        loss_mask=torch.arange(tokens) % 4 == 0)
    report = {}
    for stage in (0, 1, 2, 3):
        model = BumblebeeEncoder(model_preset(preset), init_seed=1)
        parameters = count_parameters(model)
        engine = build_engine(model, TrainConfig(zero_stage=stage, precision="fp32"), dist).engine
        for iteration in range(2):  # the second backward leaves gradients for the measurement
            prediction = engine(*inputs.forward_args())
            engine.backward((prediction - inputs.target).square().mean())
            if iteration == 0:
                engine.step()
        measured = model_state_bytes(engine)
        gathered = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, measured)
        report[stage] = {"parameters": parameters, "ranks": gathered}
        if hasattr(engine, "destroy"):
            engine.destroy()
    if dist.is_main:
        out.write_text(json.dumps(report))


def measure_zero_memory(preset: str) -> None:
    from bumblebee_dist.launching import REPO_ROOT, deepspeed_command

    with tempfile.TemporaryDirectory(prefix="bench-zero-") as folder:
        out = Path(folder) / "zero.json"
        command, env = deepspeed_command("bench/train.py", ["--zero-worker", str(out),
                                                           "--preset", preset], num_ranks=WORLD)
        # Run as the module bench.train: as a script, bench/kernels.py would hide the kernels
        # package.
        script = command.index(str(REPO_ROOT / "bench" / "train.py"))
        command[script:script + 1] = ["--module", "bench.train"]
        done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the 4-rank ZeRO run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        report = {int(stage): value for stage, value in json.loads(out.read_text()).items()}
    parameters = report[0]["parameters"]
    print(f"\n(b) model-state bytes per rank, preset {preset} ({parameters} parameters), fp32 "
          f"AdamW, {WORLD} CPU ranks, rank 0 (max over ranks in brackets)")
    print("    stage  params    grads     optim     master    total     ratio  theory")
    baseline = sum(report[0]["ranks"][0].values())
    for stage in (0, 1, 2, 3):
        ranks = report[stage]["ranks"]
        first = ranks[0]
        total = sum(first.values())
        largest = max(sum(rank.values()) for rank in ranks)
        print(f"    {stage}      {_mib(first['parameters'])} {_mib(first['gradients'])} "
              f"{_mib(first['optimizer_states'])} {_mib(first['master_copy'])} {_mib(total)} "
              f"{total / baseline:6.3f}  {theoretical_ratio(stage, WORLD):.3f}  "
              f"[{largest / baseline:.3f}]")
    print("    (MiB; 'master' is the fp32 copy of the partition DeepSpeed keeps even in fp32 "
          "training, which the theory leaves out)")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:8.3f}"


def main() -> None:
    """Print both benchmarks, or run as one rank of the ZeRO measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="data set folder (default: the demo's)")
    parser.add_argument("--preset", default="small", help="model preset (default small)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (default 6)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="token budget per batch")
    parser.add_argument("--zero-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--expected_world_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.zero_worker is not None:
        zero_worker(args.zero_worker, args.preset)
        return
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        data = _data_path(args.data, Path(folder))
        print(f"data set: {data}")
        measure_throughput(data, args.preset, args.steps, args.max_tokens)
    measure_zero_memory(args.preset)


if __name__ == "__main__":
    main()
