"""Training benchmarks: packed vs padded throughput, ZeRO memory per stage, data wait.

    python -m bench.train [--data DIR] [--preset small] [--steps 6]

(a) Throughput of plain PyTorch training steps (one process) on the real event lengths, in real
    tokens per second, for token-budget packed batches and for the same events padded to the
    longest event of each batch. Padding is built as extra tokens per event that no loss reads,
    so the padded step does the work of a padded implementation. The bound from the lengths is
    the speed-up packing would give if a step cost the same per token, padded or not: padded
    tokens / real tokens. Packing reaches ``(packed / padded) / bound`` of it.
(b) Model-state bytes per rank (parameters, gradients, optimizer states, and the fp32 master
    copy) actually allocated after one AdamW step, for ZeRO 0, 1, 2 and 3 on 4 CPU ranks in one
    launch, in fp32 and in bf16, as ratios to stage 0. The theoretical ratios, on N ranks,
    count 16 bytes per parameter at stage 0: in fp32, 4 of parameter, 4 of gradient and 8 of
    moments, with no master copy (stage 1 = (4 + 4 + 8/N)/16, stage 2 = (4 + 12/N)/16); in
    bf16, 2 of parameter, 2 of gradient and 12 of fp32 master copy and moments (stage 1 =
    (2 + 2 + 12/N)/16, stage 2 = (2 + 14/N)/16); stage 3 = 16/N/16 in both.
(c) The data-wait share of step time in a real pre-training job: ``launch/pretrain.py`` under
    the deepspeed launcher on 2 CPU ranks for a few dozen steps, read back from its MLflow run.

The targets are printed at the end beside the measured values. The data set is ``--data``,
else ``runs/demo/data`` when complete, else a small synthetic one. No number here is asserted
by a test.
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
PRECISIONS = ("fp32", "bf16")


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


def measure_throughput(data: Path, preset: str, steps: int, max_tokens: int,
                       rounds: int = 5) -> float:
    """Print packed and padded training throughput; return the share of its bound packing reaches.

    The two variants alternate step by step on the same events, ``rounds`` times over the
    batches, so a change in the machine's load hits both. The speed-up is the median over rounds
    of padded time / packed time.
    """
    import statistics

    from bumblebee_dist.config import TrainConfig, model_preset
    from bumblebee_dist.data.loader import EventLoader
    from bumblebee_dist.model import BumblebeeEncoder
    from bumblebee_dist.train.engine import build_optimizer
    from bumblebee_dist.train.loop import PretrainTask
    from kernels.dispatch import masked_mse

    loader = EventLoader(str(data), "train", seed=1, max_tokens=max_tokens)
    task = PretrainTask()
    variants = {"packed": [task.prepare(batch) for _, batch in zip(range(steps), loader)]}
    variants["padded"] = [padded_copy(inputs) for inputs in variants["packed"]]
    real = sum(x.num_tokens for x in variants["packed"])
    bound = sum(x.num_tokens for x in variants["padded"]) / real
    trainers = {}
    for name in variants:
        model = BumblebeeEncoder(model_preset(preset), init_seed=1)
        trainers[name] = (model, build_optimizer(model, TrainConfig()))

    def timed_step(name: str, inputs) -> float:
        model, optimizer = trainers[name]
        started = time.perf_counter()
        count = max(1, int(inputs.loss_mask.sum()))
        loss = masked_mse(model(*inputs.forward_args()), inputs.target, inputs.loss_mask, count)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    for name, batches in variants.items():  # warm-up, not timed
        timed_step(name, batches[0])
    seconds = {name: [] for name in variants}
    for _ in range(rounds):
        totals = dict.fromkeys(variants, 0.0)
        for index in range(steps):
            for name, batches in variants.items():
                totals[name] += timed_step(name, batches[index])
        for name in variants:
            seconds[name].append(totals[name])
    speedup = statistics.median(p / q for p, q in zip(seconds["padded"], seconds["packed"]))
    events = sum(x.num_events for x in variants["packed"])
    print(f"\n(a) training throughput, preset {preset}, {steps} steps of {events // steps} events "
          f"on average, {rounds} rounds alternating packed and padded, "
          f"{torch.get_num_threads()} threads")
    for name in variants:
        print(f"    {name}: {real / statistics.median(seconds[name]):10.0f} real tokens/s (median "
              f"round)")
    print(f"    packed / padded = {speedup:.3f} (median of per-round ratios); bound from the lengths "
          f"(padded tokens / real tokens) = {bound:.3f}; packing reaches {speedup / bound:.3f} of "
          f"its bound")
    if speedup > bound:
        print("    (above the bound: a padded step costs more than its share of tokens, since "
              "attention grows with the square of the padded length)")
    return speedup / bound


def theoretical_ratio(stage: int, world: int, precision: str) -> float:
    """Model-state bytes of a ZeRO stage over stage 0 for AdamW, 16 bytes per parameter at stage 0.

    fp32: 4 of parameter, 4 of gradient, 8 of moments. bf16: 2 of parameter, 2 of gradient, 12
    of fp32 master copy and moments, as in the ZeRO paper's mixed-precision count.
    """
    parameter, gradient = (4, 4) if precision == "fp32" else (2, 2)
    rest = 16 - parameter - gradient
    per_parameter = {0: 16, 1: parameter + gradient + rest / world,
                     2: parameter + (gradient + rest) / world, 3: 16 / world}
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
    """Bytes of parameters, gradients, optimizer states and fp32 master copy held by this rank.

    The master copy is what the wrapped AdamW updates when that is not the model's own
    parameters: DeepSpeed's fp32 partitions under ZeRO, its fp32 copy in bf16 without ZeRO.
    """
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
    # What the optimizer updates: its parameter groups, and the keys of its state, since ZeRO-3
    # puts each fp32 partition in a group only for the length of its update.
    updated = [tensor for group in base.param_groups for tensor in group["params"]]
    for tensor in [*updated, *base.state]:
        add("master_copy", tensor)
        if tensor.grad is not None:
            add("gradients", tensor.grad)
    for state in base.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                add("optimizer_states", value)
    for path, tensor in _storages(optimizer, set()):
        if "grad" in path.lower():
            add("gradients", tensor)
    return totals


def zero_worker(out: Path, preset: str) -> None:
    """Run under deepspeed with 4 ranks: one AdamW step per precision and stage, then measure."""
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
    for precision in PRECISIONS:
        for stage in (0, 1, 2, 3):
            model = BumblebeeEncoder(model_preset(preset), init_seed=1)
            parameters = count_parameters(model)
            wrapped = build_engine(model, TrainConfig(zero_stage=stage, precision=precision), dist)
            engine, step_inputs = wrapped.engine, inputs.to(wrapped.device, wrapped.input_dtype)
            for iteration in range(2):  # the second backward leaves gradients to measure
                prediction = engine(*step_inputs.forward_args()).float()
                engine.backward((prediction - step_inputs.target.float()).square().mean())
                if iteration == 0:
                    engine.step()
            measured = model_state_bytes(engine)
            gathered = [None] * dist.world_size
            torch.distributed.all_gather_object(gathered, measured)
            report[f"{precision}/{stage}"] = {"parameters": parameters, "ranks": gathered}
            if hasattr(engine, "destroy"):
                engine.destroy()
    if dist.is_main:
        out.write_text(json.dumps(report))


def measure_zero_memory(preset: str) -> dict[str, float]:
    """Print model-state bytes per ZeRO stage and precision; return the ZeRO-3 ratio of each."""
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
        report = json.loads(out.read_text())
    zero3 = {}
    for precision in PRECISIONS:
        parameters = report[f"{precision}/0"]["parameters"]
        print(f"\n(b) model-state bytes per rank, preset {preset} ({parameters} parameters), "
              f"{precision} AdamW, {WORLD} CPU ranks, rank 0 (largest rank in brackets)")
        print("    stage  params    grads     optim     master    total     ratio  theory")
        baseline = sum(report[f"{precision}/0"]["ranks"][0].values())
        for stage in (0, 1, 2, 3):
            ranks = report[f"{precision}/{stage}"]["ranks"]
            first = ranks[0]
            total = sum(first.values())
            largest = max(sum(rank.values()) for rank in ranks) / baseline
            print(f"    {stage}      {_mib(first['parameters'])} {_mib(first['gradients'])} "
                  f"{_mib(first['optimizer_states'])} {_mib(first['master_copy'])} "
                  f"{_mib(total)} {total / baseline:6.3f}  "
                  f"{theoretical_ratio(stage, WORLD, precision):.3f}  [{largest:.3f}]")
            if stage == 3:
                zero3[precision] = largest
    print("    (MiB. In fp32, DeepSpeed's ZeRO stages keep an fp32 master copy of each rank's "
          "partition beside the parameters, which the theory leaves out; stage 1 also keeps "
          "only its gradient partition after the reduce, so it measures like stage 2.)")
    return zero3


def measure_data_wait(data: Path, preset: str, steps: int = 40) -> float:
    """Run a short pre-training job on 2 CPU ranks; return its mean data-wait share of step time."""
    from mlflow.tracking import MlflowClient

    from bumblebee_dist.launching import REPO_ROOT, deepspeed_command

    with tempfile.TemporaryDirectory(prefix="bench-wait-") as folder:
        store = f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"
        overrides = [f"data.path={data.resolve()}", f"train.run_dir={Path(folder).resolve() / 'run'}",
                     f"train.max_steps={steps}", "train.epochs=1000", "train.log_every=10", "train.checkpoint_every=0",
                     "train.val_every=0", "train.val_max_batches=1", f"tracking.uri={store}",
                     "tracking.experiment=bench-data-wait"]
        command, env = deepspeed_command("launch/pretrain.py",
                                         ["--preset", preset, "--resume", "none", *overrides],
                                         num_ranks=2)
        done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the pre-training run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        client = MlflowClient(tracking_uri=store)
        experiment = client.get_experiment_by_name("bench-data-wait")
        run = client.search_runs([experiment.experiment_id])[0]
        shares = [m.value for m in client.get_metric_history(run.info.run_id, "time/data_wait_share")]
        rates = [m.value for m in client.get_metric_history(run.info.run_id, "throughput/events_per_s")]
    # The first window includes start-up, and the rest are steady state.
    steady = shares[1:] or shares
    share = sum(steady) / len(steady)
    print(f"\n(c) data wait in a pre-training job, preset {preset}, 2 CPU ranks, {steps} steps: "
          f"{100 * share:.2f} % of step time (mean of {len(steady)} log windows after the first; "
          f"{rates[-1]:.0f} events/s in the last)")
    return share


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:8.3f}"


def print_targets(packing: float, zero3: dict[str, float], data_wait: float) -> None:
    """Print each target beside its measured value."""
    rows = [("packed throughput, share of its bound", f"{packing:.3f}", ">= 0.93", packing >= 0.93),
            ("ZeRO-3 model-state bytes / stage 0, 4 ranks, bf16", f"{zero3['bf16']:.3f}",
             "<= 0.30", zero3["bf16"] <= 0.30),
            ("ZeRO-3 model-state bytes / stage 0, 4 ranks, fp32", f"{zero3['fp32']:.3f}",
             "<= 0.30", zero3["fp32"] <= 0.30),
            ("data wait, share of step time", f"{100 * data_wait:.2f} %", "<= 1 %",
             data_wait <= 0.01)]
    print("\ntargets")
    for name, measured, target, met in rows:
        print(f"    {name:52s} {measured:>9s}  target {target:8s} {'met' if met else 'missed'}")


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
        packing = measure_throughput(data, args.preset, args.steps, args.max_tokens)
        zero3 = measure_zero_memory(args.preset)
        data_wait = measure_data_wait(data, args.preset)
    print_targets(packing, zero3, data_wait)


if __name__ == "__main__":
    main()
