"""DeepSpeed engine setup: process group, generated DeepSpeed JSON, AdamW and its schedule.

The DeepSpeed JSON is built from ``TrainConfig`` here and nowhere else. One micro-batch is one
packed batch of events (``train_micro_batch_size_per_gpu`` = 1), whose size in events varies
because batches are packed to a token budget. DeepSpeed's own loss scaling is therefore not used:
the loop divides each micro-batch loss by the global count of masked particles and calls
``engine.backward(loss, scale_wrt_gas=False)`` (see ``bumblebee_dist.train.loop``).

The optimizer is a plain ``torch.optim.AdamW`` handed to DeepSpeed, with a gate in front of its
``step`` so the loop can skip an update on every rank at once. The learning rate is a pure
function of the step index (linear warmup, cosine decay to ``min_lr_ratio`` of the peak), set on
the parameter groups before each update, so a resumed run gets the same rate without any
scheduler state.

On a machine without CUDA, ``DS_ACCELERATOR`` defaults to ``cpu`` and the process group uses
gloo; with CUDA it uses NCCL. ``build_engine`` logs the backend it runs on.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bumblebee_dist.config import TrainConfig

LOG = logging.getLogger(__name__)


def _deepspeed():
    """Import DeepSpeed after choosing its accelerator, which it reads once at first use."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def resolve_precision(train: TrainConfig) -> str:
    """Return "bf16" or "fp32": ``auto`` means bf16 on CUDA and fp32 elsewhere."""
    if train.precision != "auto":
        return train.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def select_backend() -> str:
    """Return the torch.distributed backend: NCCL on CUDA, gloo otherwise."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda":
        return "nccl"
    return "gloo"


@dataclass
class DistInfo:
    """Rank, world size and backend of this process."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the only rank that logs and talks to MLflow."""
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Create the process group (once) from the launcher's environment.

    Run without a launcher (no ``RANK`` variable), it forms a world of one process on a free
    local port, so tests and notebooks use the same code path.
    """
    deepspeed = _deepspeed()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = select_backend()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
        release_shm_buffer()
    return DistInfo(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=backend)


def shm_buffer_path(rank: int) -> Path:
    """Return the shared-memory file DeepSpeed's CPU allreduce creates for ``rank`` of this job."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_"
                               f"{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer() -> None:
    """Unlink this rank's shared-memory allreduce buffer once every rank has mapped it.

    With CPU ranks on one machine, DeepSpeed creates a 66 MiB file per rank under /dev/shm and
    never removes it, so every job, even one that ends cleanly, leaves its files behind. Each
    rank maps all the other ranks' files while the process group starts; after a barrier, each
    rank unlinks its own. The mappings stay valid until the process exits, and a killed job
    leaves nothing behind.
    """
    # Every rank joins the barrier, whether or not it has a buffer: a rank whose shared-memory
    # op did not load has none, and skipping the barrier there would pair it with another
    # collective on the other ranks.
    torch.distributed.barrier()
    shm_buffer_path(torch.distributed.get_rank()).unlink(missing_ok=True)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deepspeed_config(train: TrainConfig, precision: str) -> dict[str, Any]:
    """Build the DeepSpeed JSON from the typed config; nothing else defines it."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=False)
    if train.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = train.zero3_param_persistence_threshold
    return {
        # One micro-batch is one token-budget packed batch, whatever its event count.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # DeepSpeed's own progress lines are off: the loop logs one line per log step.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_at(step: int, train: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    The rate rises linearly to ``train.lr`` over ``train.warmup_steps`` steps, then follows a
    cosine from ``train.lr`` down to ``train.min_lr_ratio * train.lr`` at ``total_steps``.
    """
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    floor = train.min_lr_ratio * train.lr
    return floor + 0.5 * (train.lr - floor) * (1.0 + math.cos(math.pi * progress))


class StepGate:
    """Switch in front of an optimizer's ``step``: while closed, ``step`` changes nothing.

    ZeRO calls the wrapped optimizer's ``step`` once per parameter sub-group, so the gate stays
    closed until the loop opens it again, rather than for one call.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.closed = False
        self._step = optimizer.step
        optimizer.step = self._gated_step

    def _gated_step(self, *args, **kwargs):
        if self.closed:
            return None
        return self._step(*args, **kwargs)


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norms and 1-D tables are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr,
                             betas=(train.adam_beta1, train.adam_beta2), eps=1e-8)


@dataclass
class TrainEngine:
    """A DeepSpeed engine with what the loop needs beside it."""

    engine: Any  # deepspeed.DeepSpeedEngine
    gate: StepGate
    precision: str
    dist: DistInfo
    ds_config: dict[str, Any]

    @property
    def device(self) -> torch.device:
        """Device of this rank's parameters and inputs."""
        return torch.device(self.engine.device)

    @property
    def input_dtype(self) -> torch.dtype:
        """Dtype of float model inputs: bf16 when the engine runs in bf16, else fp32."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group before the next update."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr


# Attribute of a bf16 parameter that points at its fp32 master copy, where DeepSpeed keeps the
# copies in plain lists (bf16 without ZeRO) rather than mapping them itself as ZeRO does.
MASTER_ATTRIBUTE = "_bumblebee_fp32_master"


def link_master_weights(optimizer: Any, initial: dict[int, torch.Tensor]) -> None:
    """Link each bf16 parameter to its fp32 master copy in DeepSpeed's bf16 wrapper without ZeRO.

    That wrapper copies the master weights from the parameters after they were cast to bf16, so
    they would start rounded; ``initial`` (parameter id -> fp32 value before the cast) restores
    the fp32 start that ZeRO stages get. The export reads the linked master copies.
    """
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if low is None or high is None:
        return
    for low_group, high_group in zip(low, high):
        for parameter, master in zip(low_group, high_group):
            if id(parameter) in initial:
                master.data.copy_(initial[id(parameter)])
            setattr(parameter, MASTER_ATTRIBUTE, master)


def build_engine(model: torch.nn.Module, train: TrainConfig, dist: DistInfo) -> TrainEngine:
    """Wrap ``model`` in a DeepSpeed engine configured from ``train``."""
    deepspeed = _deepspeed()
    precision = resolve_precision(train)
    optimizer = build_optimizer(model, train)
    gate = StepGate(optimizer)
    ds_config = deepspeed_config(train, precision)
    # DeepSpeed's bf16 wrapper without ZeRO creates the optimizer states by taking one step with
    # zero gradients. AdamW would count that step as its first update, which shifts the bias
    # correction of every later update and applies weight decay once. The closed gate makes it a
    # no-op, so AdamW creates its states at the first real step.
    # Only bf16 without ZeRO needs the fp32 start values (see link_master_weights).
    keep_initial = precision == "bf16" and train.zero_stage == 0
    initial = {id(p): p.detach().clone() for p in model.parameters()} if keep_initial else {}
    gate.closed = True
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                               dist_init_required=False)
    finally:
        gate.closed = False
    link_master_weights(engine.optimizer, initial)
    if dist.is_main:
        LOG.info("DeepSpeed engine: %d ranks over %s (accelerator %s), ZeRO stage %d, %s, "
                 "gradient accumulation %d, gradient clip %s", dist.world_size, dist.backend,
                 os.environ.get("DS_ACCELERATOR", "cuda"), train.zero_stage, precision,
                 train.grad_accum, train.grad_clip)
    return TrainEngine(engine=engine, gate=gate, precision=precision, dist=dist, ds_config=ds_config)
