"""Compile every Triton kernel launch for A100 and H100 without a GPU and print its resource use.

    python -m bench.kernel_compile [--arch 80 90]

The ops of ``kernels/`` run forward and backward on CPU tensors, with each ``@triton.jit``
kernel replaced by a recorder. The recorded arguments are what a CUDA launch would pass:
pointer dtypes, the integer specializations Triton derives from values (divisibility by 16,
the value 1), constexprs such as the block sizes, and launch options. Each distinct
specialization is then compiled with ``triton.compile`` for sm_80 (A100) and sm_90 (H100, H200)
by the ptxas that ships with Triton, and ``cuobjdump`` reads the resource use from the cubin.

The recorded cases follow training. They cover fp32 and bf16 inputs, the head dims of the
model presets (16, 32 and 48, tiled as 64) and events of up to 16, 20 and 100 tokens. They run
both embedding-gradient modes, and the masked MSE with and without its gradient.

Limits: shapes outside these cases may select other specializations (for example a head dim
of 128 or 256, which the attention kernels accept). fp16 and fp64 inputs, which only the tests
use, are not compiled. A cubin that fits is no proof that the kernel is correct or fast; only
the interpreter tests and a GPU run check that.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import triton
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from bumblebee_dist.tokens import PDG_VOCABULARY_SIZE

# The package ``kernels`` exports dispatch functions named like two of these modules.
attention = importlib.import_module("kernels.attention")
embedding_sum = importlib.import_module("kernels.embedding_sum")
masked_mse = importlib.import_module("kernels.masked_mse")
KERNEL_MODULES = (attention, embedding_sum, masked_mse)
TARGET_NAMES = {80: "sm_80 (A100)", 90: "sm_90 (H100/H200)"}
WARP_SIZE = 32
# Maximum shared memory per thread block from the CUDA C++ Programming Guide's table of compute
# capabilities: 163 KB for 8.0 and 227 KB for 9.0. Each SM has 1 KB more (164 and 228 KB), which
# CUDA reserves for system use. At launch, Triton rejects a kernel whose shared memory is above
# the device's opt-in maximum per block.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
# The same table: 64K 32-bit registers per thread block for both compute capabilities.
MAX_REGISTERS_PER_BLOCK = 64 * 1024
NUM_TOKENS = 4093  # a packed batch under the default 4096-token budget, not a multiple of 16
NUM_FEATURES = 5
# (heads, head dim, max_seqlen). The "paper" preset runs events of up to 16 and 20 tokens, which
# fit one 16- or 32-token block, and of 100 tokens, which need several. The "small" and "tiny"
# presets run dileptonic events of up to 20 tokens.
ATTENTION_SHAPES = ((16, 48, 16), (16, 48, 20), (16, 48, 100), (4, 32, 20), (2, 16, 20))
MODEL_WIDTHS = (768, 128, 32)  # hidden size of the "paper", "small" and "tiny" presets
TRAINING_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class Launch:
    """One kernel specialization as a launcher passes it, in the form triton.compile takes."""

    kernel: JITFunction
    signature: dict[str, str]  # argument name -> Triton type, "constexpr" for constants
    constexprs: dict[str, Any]  # argument name -> value of each constant argument
    attrs: dict[tuple[int, ...], list]  # (argument index,) -> [["tt.divisibility", 16]]
    options: dict[str, Any]  # launch options such as num_warps; {} for the defaults

    @property
    def name(self) -> str:
        """Kernel function name."""
        return self.kernel.__name__

    @property
    def variant(self) -> str:
        """Input dtype and the constexpr switches that are on, e.g. ``bf16 WRITE_GRAD_Q``."""
        dtype = next(kind.lstrip("*") for kind in self.signature.values() if kind[:1] == "*")
        switches = [name for name, value in self.constexprs.items() if value is True]
        return " ".join([dtype, *switches])

    @property
    def blocks(self) -> str:
        """Block-size constexprs, e.g. ``M32 N32 H64``."""
        return " ".join(f"{name.removeprefix('BLOCK_')}{value}"
                        for name, value in self.constexprs.items() if name.startswith("BLOCK_"))

    def key(self) -> str:
        """Text that two launches share exactly when Triton compiles them to the same kernel."""
        return repr((self.name, self.signature, {k: str(v) for k, v in self.constexprs.items()},
                     self.attrs, self.options))


@dataclass(frozen=True)
class Resources:
    """Resource use of one compiled specialization on one target."""

    launch: Launch
    arch: int
    registers: int  # per thread
    spill_bytes: int  # per thread: stack frame plus local memory
    shared_bytes: int  # per block: Triton's dynamic shared memory plus static shared memory
    num_warps: int
    num_stages: int
    cubin_bytes: int


def missing_toolchain() -> str | None:
    """Return why kernels cannot be compiled here, or None when the NVIDIA toolchain works."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 replaces the kernels by interpreted functions; unset it"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as error:
        return f"the NVIDIA backend of Triton {triton.__version__} is missing ({error})"
    try:
        for arch in TARGET_NAMES:
            get_ptxas(arch)  # sm_80 uses ptxas, sm_90 ptxas-blackwell
        knobs.nvidia.cuobjdump.path
    except RuntimeError as error:
        return f"an NVIDIA tool of Triton {triton.__version__} is missing: {error}"
    return None


class _Recorder:
    """Stand-in for a JITFunction that stores each ``kernel[grid](...)`` call."""

    def __init__(self, kernel: JITFunction, calls: list):
        self.kernel = kernel
        self.calls = calls

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.calls.append((self.kernel, args, kwargs))
        return record


@contextlib.contextmanager
def _recording(calls: list) -> Iterator[None]:
    """Replace every JITFunction of the kernel modules by a recorder, restored on exit.

    Helpers called only inside kernels are replaced too, which is harmless while nothing
    compiles, and they must be back before anything does.
    """
    with contextlib.ExitStack() as stack:
        for module in KERNEL_MODULES:
            for name, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    stack.enter_context(_patched(module, name, _Recorder(value, calls)))
        yield


@contextlib.contextmanager
def _patched(module, name: str, value) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _launch_from_call(kernel: JITFunction, args: tuple, kwargs: dict) -> Launch:
    """Specialize the arguments of one call the way ``JITFunction.run`` does on a GPU."""
    arguments = {name: value for name, value in kwargs.items() if name in kernel.arg_names}
    options = {name: value for name, value in kwargs.items() if name not in kernel.arg_names}
    bound = inspect.signature(kernel.fn).bind(*args, **arguments)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, value) in enumerate(zip(kernel.params, bound.arguments.values())):
        if param.is_constexpr:
            kind, attr = "constexpr", None
        else:
            # Triton's own rule: tensors become typed pointers, the int 1 and None become
            # constants, and 16-byte aligned pointers and multiples of 16 get a divisibility
            # attribute.
            kind, attr = native_specialize_impl(
                BaseBackend, value, param.is_const, not param.do_not_specialize,
                not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        elif attr:
            attrs[(index,)] = BaseBackend.parse_attr(attr)
    return Launch(kernel, signature, constexprs, attrs, options)


def _run_attention(dtype: torch.dtype, heads: int, head_dim: int, max_seqlen: int) -> None:
    # q, k and v are views of one (T, 3, N, H) projection, as in the encoder.
    qkv = torch.zeros(NUM_TOKENS, 3, heads, head_dim, dtype=dtype, requires_grad=True)
    lengths = [max_seqlen] * (NUM_TOKENS // max_seqlen) + [NUM_TOKENS % max_seqlen]
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths), 0)
    out = attention.unpadded_attention_triton(*qkv.unbind(1), cu_seqlens, max_seqlen)
    out.backward(torch.zeros_like(out))


def _run_embedding_sum(dtype: torch.dtype, width: int, grad_mode: str) -> None:
    def parameter(*shape):
        return torch.zeros(*shape, dtype=dtype, requires_grad=True)

    out = embedding_sum.embedding_sum_triton(
        parameter(NUM_TOKENS, NUM_FEATURES),
        torch.zeros(NUM_TOKENS, dtype=torch.bool),
        torch.zeros(NUM_TOKENS, dtype=torch.int64),
        torch.zeros(NUM_TOKENS, dtype=torch.int64),
        parameter(width, NUM_FEATURES), parameter(width), parameter(PDG_VOCABULARY_SIZE, width),
        parameter(2, width), parameter(2, width), grad_mode=grad_mode,
    )
    out.backward(torch.zeros_like(out))


def _run_masked_mse(dtype: torch.dtype, compute_grad: bool) -> None:
    # The prediction has the model dtype, the target stays fp32, as in the training loop.
    prediction = torch.zeros(NUM_TOKENS, NUM_FEATURES, dtype=dtype, requires_grad=compute_grad)
    target = torch.zeros(NUM_TOKENS, NUM_FEATURES)
    mask = torch.zeros(NUM_TOKENS, dtype=torch.bool)
    loss = masked_mse.masked_mse_triton(prediction, target, mask, 1.0)
    if compute_grad:
        loss.backward()


def record_launches() -> list[Launch]:
    """Run the training cases of every op on the CPU and return each distinct kernel launch."""
    calls: list = []
    with _recording(calls):
        for dtype in TRAINING_DTYPES:
            for shape in ATTENTION_SHAPES:
                _run_attention(dtype, *shape)
            for width in MODEL_WIDTHS:
                for grad_mode in embedding_sum.GRAD_MODES:
                    _run_embedding_sum(dtype, width, grad_mode)
            for compute_grad in (True, False):
                _run_masked_mse(dtype, compute_grad)
    unique = {}
    for call in calls:
        launch = _launch_from_call(*call)
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def compile_launch(launch: Launch, arch: int):
    """Compile one launch for ``sm_<arch>`` and return Triton's CompiledKernel."""
    source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, WARP_SIZE),
                          options=launch.options)


def cubin_resource_usage(cubin: bytes, function: str) -> dict[str, int]:
    """Return the ``cuobjdump --dump-resource-usage`` fields of one function, e.g. REG."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name],
            capture_output=True, text=True, check=True,
        ).stdout
    match = re.search(rf"Function {re.escape(function)}:\s*\n(.*)", report)
    if match is None:
        raise ValueError(f"cuobjdump output lists no function {function!r}:\n{report}")
    return {field: int(value) for field, value in re.findall(r"(\w+):(\d+)", match.group(1))}


def measure(launch: Launch, arch: int) -> Resources:
    """Compile ``launch`` for ``sm_<arch>`` and read its registers, spills and shared memory.

    Triton's ``n_spills`` is the driver's local memory size per thread divided by 4. In the
    cubin, ptxas puts spilled registers into the stack frame, so spill_bytes is STACK + LOCAL.
    """
    compiled = compile_launch(launch, arch)
    cubin = compiled.asm["cubin"]
    usage = cubin_resource_usage(cubin, compiled.metadata.name)
    return Resources(
        launch=launch,
        arch=arch,
        registers=usage["REG"],
        spill_bytes=usage["STACK"] + usage["LOCAL"],
        shared_bytes=compiled.metadata.shared + usage["SHARED"],
        num_warps=compiled.metadata.num_warps,
        num_stages=compiled.metadata.num_stages,
        cubin_bytes=len(cubin),
    )


def format_table(rows: list[Resources]) -> str:
    """Return one aligned line per row, with a header line."""
    header = ("kernel", "variant", "blocks", "target", "regs", "spill B", "smem B", "warps",
              "stages")
    lines = [header] + [
        (row.launch.name, row.launch.variant, row.launch.blocks, f"sm_{row.arch}",
         str(row.registers), str(row.spill_bytes), str(row.shared_bytes), str(row.num_warps),
         str(row.num_stages))
        for row in rows
    ]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in lines)


def main() -> None:
    """Record the launches, compile each for every requested target and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(TARGET_NAMES),
                        default=sorted(TARGET_NAMES), help="compute capabilities to compile for")
    args = parser.parse_args()
    reason = missing_toolchain()
    if reason is not None:
        raise SystemExit(f"cannot compile the kernels: {reason}")
    start = time.perf_counter()
    launches = record_launches()
    rows = [measure(launch, arch) for arch in args.arch for launch in launches]
    print(format_table(rows))
    seconds = time.perf_counter() - start
    print(f"\n{len(launches)} specializations x {len(args.arch)} targets in {seconds:.0f} s "
          f"with Triton {triton.__version__}, which reuses compilations from its cache.")
    print("Shared memory limits per block:")
    for arch in args.arch:
        print(f"  {TARGET_NAMES[arch]}: {MAX_SHARED_BYTES[arch]} B")


if __name__ == "__main__":
    main()
