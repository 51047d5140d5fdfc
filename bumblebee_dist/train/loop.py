"""The training loop shared by pre-training and fine-tuning.

Loss normalization. One optimizer step takes ``train.grad_accum`` packed micro-batches on every
rank. Before any forward pass, the ranks all-reduce the number of tokens that enter the loss,
N, over all micro-batches of the step. Each micro-batch loss is its sum of squared errors
divided by N / world_size, and is back-propagated without DeepSpeed's 1 / grad_accum scaling.
DeepSpeed averages gradients over ranks (a division by world_size), so the applied gradient is
that of (sum of squared errors over the global batch) / N. That is the gradient of one process
running the same events in one batch, however they are split into ranks and micro-batches.

Skipped steps. A step is skipped by every rank when the global N is 0 or an input feature is
non-finite (decided before any forward pass), or when a loss is non-finite on any rank (decided
by an all-reduce before the optimizer update, which a closed ``StepGate`` then turns into a
no-op; DeepSpeed clears the gradients as after any step). Either way all ranks run the same
collectives, the step is logged as skipped, and the next step runs normally.

Same collectives on every rank. Under ZeRO-3 a forward pass is a collective: it all-gathers the
partitioned parameters, and in DeepSpeed 0.19 the first two forward passes also broadcast the
module order from rank 0. A rank that runs one forward pass more than the others waits in it
while the others wait in their next collective, so the job hangs (or, where mismatched
collectives happen to pair up, goes on with wrong values). Every rank must therefore run the
same number of forward passes, empty batches included. The loaders promise the same batch count
on every rank, and ``agree_on_count`` checks it with one all-reduce when the trainer starts and
before each validation pass. A data set that differs between ranks (another copy on one node, a
shard skipped as corrupt on one rank only) then stops every rank with an error.

Logging. Rank 0 alone writes one log line per ``train.log_every`` steps (step, loss, grad norm,
learning rate, events/s, tokens/s, data-wait share, peak memory, and model FLOPs utilization
where the device peak is known, see ``bumblebee_dist.train.throughput``), sends the same values
to MLflow, appends every step to ``<run_dir>/train_log.jsonl`` and shows a tqdm bar. Rates are
global (all ranks) and averaged over the steps since the previous log line.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from bumblebee_dist.config import RunConfig
from bumblebee_dist.data.packing import PackedBatch
from bumblebee_dist.train.engine import TrainEngine, lr_at
from bumblebee_dist.train.throughput import peak_flops_per_device, step_flops
from kernels.dispatch import masked_mse

LOG = logging.getLogger(__name__)
STEP_LOG_NAME = "train_log.jsonl"


@dataclass
class StepInputs:
    """Model inputs and loss target of one packed micro-batch.

    features (T, F) float, pdg_index (T,) int64, level (T,) int64, mask (T,) bool (True = hidden
    from the model), cu_seqlens (E + 1,) int32, max_seqlen int; target (T, F) float32 and
    loss_mask (T,) bool (True = token enters the loss). ``labels`` (E,) float32 is set by
    classification tasks.
    """

    features: torch.Tensor
    pdg_index: torch.Tensor
    level: torch.Tensor
    mask: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    target: torch.Tensor
    loss_mask: torch.Tensor
    labels: torch.Tensor | None = None

    @property
    def num_events(self) -> int:
        """Number of events E."""
        return int(self.cu_seqlens.numel() - 1)

    @property
    def num_tokens(self) -> int:
        """Number of packed tokens T."""
        return int(self.features.shape[0])

    def to(self, device: torch.device, dtype: torch.dtype) -> "StepInputs":
        """Move tensors to ``device``; the model input features take ``dtype``."""
        moved = {name: value.to(device) if isinstance(value, torch.Tensor) else value
                 for name, value in asdict_shallow(self).items()}
        moved["features"] = moved["features"].to(dtype)
        return StepInputs(**moved)

    def forward_args(self) -> tuple:
        """Positional arguments of ``BumblebeeEncoder.forward``."""
        return (self.features, self.pdg_index, self.level, self.mask, self.cu_seqlens,
                self.max_seqlen)


def asdict_shallow(inputs: StepInputs) -> dict[str, Any]:
    """Field name -> value without copying tensors (``dataclasses.asdict`` deep-copies)."""
    return {name: getattr(inputs, name) for name in StepInputs.__dataclass_fields__}


class Task(Protocol):
    """The parts that differ between pre-training and fine-tuning: loader masking and loss target."""

    name: str
    mask_mode: str  # EventLoader mask_mode

    def prepare(self, batch: PackedBatch) -> StepInputs:
        """Turn a loader batch into model inputs and loss target."""


class PretrainTask:
    """Masked-particle pre-training: predict the hidden particles' features."""

    name = "pretrain"
    mask_mode = "pretrain"

    def prepare(self, batch: PackedBatch) -> StepInputs:
        """Use the loader's mask draw for both the input mask and the loss."""
        return StepInputs(features=batch.features, pdg_index=batch.pdg_index, level=batch.level,
                          mask=batch.mask, cu_seqlens=batch.cu_seqlens,
                          max_seqlen=batch.max_seqlen, target=batch.features,
                          loss_mask=batch.mask)


@dataclass
class TrainState:
    """Counters saved in every checkpoint; ``step`` counts optimizer steps, skipped ones included."""

    step: int = 0
    epoch: int = 0
    events_seen: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    last_val_loss: float | None = None
    mlflow_run_id: str | None = None
    resumed_from_step: int | None = None


@dataclass
class StepResult:
    """Outcome of one optimizer step, identical on every rank."""

    loss: float | None
    grad_norm: float | None
    lr: float
    events: int
    tokens: int
    skipped: str = ""  # reason when skipped, "" when the update was applied
    squared_lengths: int = 0  # sum over the global batch's events of (event tokens)^2


@dataclass
class _Window:
    """Totals since the last log line."""

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    events: int = 0
    tokens: int = 0
    flops: float = 0.0

    def rates(self, peak_flops: float | None) -> dict[str, float]:
        """Global rates since the window opened; MFU only when ``peak_flops`` (all ranks) is known."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = {"throughput/events_per_s": self.events / elapsed,
                 "throughput/tokens_per_s": self.tokens / elapsed,
                 "time/data_wait_share": self.data_wait / elapsed}
        if peak_flops:
            rates["throughput/mfu"] = self.flops / elapsed / peak_flops
        return rates


def peak_memory_gib() -> float:
    """Peak accelerator memory on CUDA, else the peak resident memory of this process, in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a short list of numbers over all ranks (float64, so counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


class RankMismatchError(RuntimeError):
    """Ranks disagree on a count that must be equal, so their collectives would not match."""


def agree_on_count(count: int, description: str, device: torch.device) -> int:
    """Check that every rank passed the same ``count`` and return it (collective).

    Raises RankMismatchError on every rank, not only on the ranks that differ, when the counts
    differ. ``description`` names the count in the message.
    """
    if not torch.distributed.is_initialized():
        return count
    # One all-reduce of (count, -count) with MAX gives the largest and the smallest count.
    bounds = torch.tensor([count, -count], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)
    largest, smallest = int(bounds[0]), -int(bounds[1])
    if largest != smallest:
        raise RankMismatchError(
            f"ranks disagree on {description}: between {smallest} and {largest} (this rank "
            f"{torch.distributed.get_rank()}: {count}). Under ZeRO-3 each forward pass is a "
            "collective, so the ranks would hang. Every rank must read the same data set: use one "
            "data.path that every node shares and check the log for shards skipped as corrupt")
    return count


def _inputs_finite(inputs: StepInputs) -> bool:
    visible = ~inputs.mask
    return bool(torch.isfinite(inputs.features[visible]).all()
                and torch.isfinite(inputs.target[inputs.loss_mask]).all())


class Trainer:
    """Runs optimizer steps, validation, logging and periodic checkpoints for one job.

    ``save_checkpoint`` is called on every rank with the trainer at each checkpoint step;
    ``tracker`` needs ``log_metrics(metrics, step)`` and is only used on rank 0.
    """

    def __init__(self, config: RunConfig, task: Task, engine: TrainEngine, train_loader,
                 val_loader=None, tracker=None, state: TrainState | None = None,
                 save_checkpoint=None):
        self.config, self.task, self.engine = config, task, engine
        self.train_loader, self.val_loader = train_loader, val_loader
        self.tracker, self.save_checkpoint = tracker, save_checkpoint
        self.state = state or TrainState()
        self.dist = engine.dist
        self.total_steps = self._total_steps()
        self._window = _Window()
        self._step_log = Path(config.train.run_dir) / STEP_LOG_NAME
        self._stage0_norm: float | None = None
        self.num_parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                   for p in engine.engine.module.parameters())
        peak = peak_flops_per_device(engine.precision)
        self._peak_flops = peak * self.dist.world_size if peak else None
        self._check_loaders_agree()

    def _check_loaders_agree(self) -> None:
        """Check that the loaders give every rank the same number of batches (collective)."""
        device = self.engine.device
        agree_on_count(len(self.train_loader), "the train batches per rank", device)
        if self.val_loader is not None:
            agree_on_count(len(self.val_loader), "the validation batches per rank", device)

    def _total_steps(self) -> int:
        # Batches per epoch vary a little between epochs (packing follows the shuffled order),
        # so the schedule length sums every epoch's plan. It must not depend on the epoch the
        # trainer starts in, or a resumed run would follow another learning-rate curve.
        train = self.config.train
        if train.max_steps > 0:
            return train.max_steps
        loader = self.train_loader
        if not hasattr(loader, "epoch_plan"):
            return train.epochs * max(1, len(loader) // train.grad_accum)
        steps = sum(loader.epoch_plan(epoch).batches_per_rank // train.grad_accum
                    for epoch in range(train.epochs))
        if steps == 0:
            plan = loader.epoch_plan(0)
            raise ValueError(
                f"the train split gives 0 optimizer steps: {loader.num_events} events in "
                f"{plan.batches_per_rank} batches per rank on {self.dist.world_size} ranks with "
                f"data.max_tokens={self.config.data.max_tokens} and "
                f"train.grad_accum={train.grad_accum}; lower data.max_tokens, use fewer ranks "
                f"or generate more events")
        return steps

    def done(self) -> bool:
        """True once max_steps (when set) or the last epoch is reached."""
        train = self.config.train
        if train.max_steps > 0 and self.state.step >= train.max_steps:
            return True
        return self.train_loader.epoch >= train.epochs

    def train(self) -> TrainState:
        """Train until ``done``; return the final state."""
        self.engine.engine.train()
        self._truncate_step_log()
        progress = self._progress_bar()
        while not self.done():
            self.state.epoch = self.train_loader.epoch
            self._run_epoch(progress)
        if progress is not None:
            progress.close()
        self.state.epoch = self.train_loader.epoch
        return self.state

    def _progress_bar(self):
        if not self.dist.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=min(self.state.step, self.total_steps),
                    desc=self.task.name, unit="step", dynamic_ncols=True)

    def _run_epoch(self, progress) -> None:
        batches = iter(self.train_loader)
        while not self.done():
            group = self._next_group(batches)
            if len(group) < self.config.train.grad_accum:
                if group and self.dist.is_main:
                    LOG.info("epoch %d: %d batches left over after the last full step of %d "
                             "micro-batches, not used", self.state.epoch, len(group),
                             self.config.train.grad_accum)
                return
            result = self.train_step(group)
            self._after_step(result, progress)

    def _next_group(self, batches: Iterator[PackedBatch]) -> list[StepInputs]:
        group = []
        started = time.perf_counter()
        for _ in range(self.config.train.grad_accum):
            batch = next(batches, None)
            if batch is None:
                break
            group.append(self.task.prepare(batch).to(self.engine.device, self.engine.input_dtype))
        self._window.data_wait += time.perf_counter() - started
        return group

    def train_step(self, group: list[StepInputs]) -> StepResult:
        """Run forward and backward on every micro-batch of one step, then update (or skip)."""
        local = [sum(int(x.loss_mask.sum()) for x in group), sum(x.num_events for x in group),
                 sum(x.num_tokens for x in group), sum(not _inputs_finite(x) for x in group),
                 sum(_squared_lengths(x) for x in group)]
        count, events, tokens, bad_inputs, squares = all_reduce_sum(local, self.engine.device)
        lr = lr_at(self.state.step, self.config.train, self.total_steps)
        skipped = self._skip_reason(count, bad_inputs)
        if skipped:
            return StepResult(None, None, lr, int(events), int(tokens), skipped, int(squares))
        self.engine.set_lr(lr)
        loss_sum, nonfinite = self._accumulate(group, count / self.dist.world_size)
        loss = loss_sum / self.dist.world_size
        grad_norm = self._grad_norm()
        if nonfinite:
            return StepResult(None, None, lr, int(events), int(tokens),
                              f"non-finite loss on {int(nonfinite)} of {self.dist.world_size} ranks",
                              int(squares))
        return StepResult(loss, grad_norm, lr, int(events), int(tokens), "", int(squares))

    @staticmethod
    def _skip_reason(count: float, bad_inputs: float) -> str:
        if count == 0:
            return "no token enters the loss in the global batch"
        if bad_inputs > 0:
            return f"{int(bad_inputs)} micro-batches hold non-finite input features"
        return ""

    def _accumulate(self, group: list[StepInputs], normalizer: float) -> tuple[float, float]:
        """Forward and backward every micro-batch; return (global loss sum, ranks non-finite)."""
        engine, gate = self.engine.engine, self.engine.gate
        local_sum = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        verdict = [0.0, 0.0]
        for index, inputs in enumerate(group):
            prediction = engine(*inputs.forward_args())
            loss = masked_mse(prediction, inputs.target, inputs.loss_mask, normalizer)
            local_sum += loss.detach().double()
            if index == len(group) - 1:
                finite = bool(torch.isfinite(local_sum))
                verdict = all_reduce_sum([float(local_sum) if finite else 0.0, float(not finite)],
                                         self.engine.device)
                gate.closed = verdict[1] > 0
            engine.backward(loss, scale_wrt_gas=False)
            if index == len(group) - 1 and self.config.train.zero_stage == 0:
                self._stage0_norm = _local_grad_norm(engine.module)
            engine.step()
        gate.closed = False
        return verdict[0], verdict[1]

    def _grad_norm(self) -> float | None:
        norm = self.engine.engine.get_global_grad_norm()
        if norm is None and self.config.train.zero_stage == 0:
            norm = self._stage0_norm
        if isinstance(norm, torch.Tensor):
            norm = float(norm)
        return norm

    def _after_step(self, result: StepResult, progress) -> None:
        state = self.state
        state.step += 1
        state.events_seen += result.events
        state.tokens_seen += result.tokens
        self._window.events += result.events
        self._window.tokens += result.tokens
        self._window.flops += step_flops(self.config.model, self.num_parameters, result.tokens,
                                         result.squared_lengths)
        if result.skipped:
            state.skipped_steps += 1
            if self.dist.is_main:
                LOG.warning("step %d skipped on every rank: %s", state.step, result.skipped)
        else:
            state.first_loss = result.loss if state.first_loss is None else state.first_loss
            state.last_loss = result.loss
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{result.loss:.4g}" if result.loss is not None else "skip")
        self._record(result)
        self._periodic(progress)

    def _periodic(self, progress) -> None:
        train, step = self.config.train, self.state.step
        last = self.done()
        if self.val_loader is not None and train.val_every and step % train.val_every == 0 and not last:
            self.run_validation()
        if self.save_checkpoint is not None and train.checkpoint_every \
                and step % train.checkpoint_every == 0 and not last:
            self.save_checkpoint(self)

    def _record(self, result: StepResult) -> None:
        """Append the step to the JSONL log; every log_every steps, log a line and metrics."""
        if not self.dist.is_main:
            return
        step = self.state.step
        row = {"step": step, "loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
               "events": result.events, "tokens": result.tokens, "skipped": result.skipped}
        with open(self._step_log, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if step % self.config.train.log_every != 0:
            return
        metrics = {"lr": result.lr, **self._window.rates(self._peak_flops),
                   "memory/peak_gib": peak_memory_gib(),
                   "steps/skipped_total": float(self.state.skipped_steps)}
        if result.loss is not None:
            metrics["loss/train"] = result.loss
        if result.grad_norm is not None and math.isfinite(result.grad_norm):
            metrics["grad/norm"] = result.grad_norm
        LOG.info(_format_line(step, self.total_steps, metrics))
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)
        self._window = _Window()

    def _truncate_step_log(self) -> None:
        """Drop step rows past the resumed step, so the file keeps one row per step."""
        if not self.dist.is_main or not self._step_log.is_file():
            return
        rows = [line for line in self._step_log.read_text().splitlines()
                if line and json.loads(line)["step"] <= self.state.step]
        self._step_log.write_text("".join(row + "\n" for row in rows))

    @torch.no_grad()
    def run_validation(self) -> float | None:
        """Mean loss per loss token over the validation split (every rank); log it on rank 0."""
        if self.val_loader is None:
            return None
        self.engine.engine.eval()
        sums = self._validation_sums()
        self.engine.engine.train()
        sse, count = all_reduce_sum(sums, self.engine.device)
        loss = sse / count if count > 0 else None
        self.state.last_val_loss = loss
        if self.dist.is_main and loss is not None:
            LOG.info("step %d validation: loss %.5f over %d loss tokens", self.state.step, loss,
                     int(count))
            if self.tracker is not None:
                self.tracker.log_metrics({"loss/val": loss}, self.state.step)
        return loss

    def _validation_sums(self) -> list[float]:
        loader = self.val_loader
        rewind = dict(loader.state_dict(), epoch=0, position=0)
        loader.load_state_dict(rewind)  # the same events and masks at every pass
        limit = self.config.train.val_max_batches
        batches = min(len(loader), limit) if limit else len(loader)
        # Every rank runs exactly this many forward passes; ranks that run out of events get
        # empty batches from the loader and still run the forward pass (see the module docstring).
        batches = agree_on_count(batches, "the validation batches per rank", self.engine.device)
        sse, count = 0.0, 0
        iterator = iter(loader)
        for _ in range(batches):
            batch = next(iterator)
            inputs = self.task.prepare(batch).to(self.engine.device, self.engine.input_dtype)
            prediction = self.engine.engine(*inputs.forward_args())
            sse += float(masked_mse(prediction, inputs.target, inputs.loss_mask, 1.0))
            count += int(inputs.loss_mask.sum())
        return [sse, float(count)]


def _squared_lengths(inputs: StepInputs) -> int:
    lengths = (inputs.cu_seqlens[1:] - inputs.cu_seqlens[:-1]).long()
    return int(lengths.square().sum())


def _local_grad_norm(module: torch.nn.Module) -> float:
    squares = [p.grad.detach().float().square().sum() for p in module.parameters()
               if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def _format_line(step: int, total: int, metrics: dict[str, float]) -> str:
    loss = metrics.get("loss/train")
    norm = metrics.get("grad/norm")
    mfu = f"{100 * metrics['throughput/mfu']:.1f} %" if "throughput/mfu" in metrics else "n/a"
    return (f"step {step}/{total} | loss {'skipped' if loss is None else f'{loss:.5f}'} | "
            f"grad norm {'-' if norm is None else f'{norm:.3g}'} | lr {metrics['lr']:.3g} | "
            f"{metrics['throughput/events_per_s']:.0f} events/s | "
            f"{metrics['throughput/tokens_per_s']:.0f} tokens/s | "
            f"data wait {100 * metrics['time/data_wait_share']:.1f} % | "
            f"memory {metrics['memory/peak_gib']:.2f} GiB | MFU {mfu}")
