"""Time the fused Triton kernels against their torch references and torch.compile of them.

    python -m bench.kernels [--tokens 16384 65536 262144] [--dtype bf16] [--cpu-tokens 2048]

Each row times one forward plus backward pass of one op on a packed batch, with the "paper"
preset's sizes (D = 768, N = 16 heads of H = 48, F = 5 features). Event lengths are 9 tokens
plus the jet count, and the jet count is 2 + Poisson(1.5) capped at 11, so lengths span 11 to
20 with most events at 11 to 13. That distribution is an estimate for a dileptonic selection,
not a measurement. Columns:

- kernel, torch, compiled: ms per forward plus backward, from ``triton.testing.do_bench``;
- torch/kernel, compiled/kernel: how many times faster the kernel is;
- GB/s: the kernel's minimum memory traffic (every input, output and gradient read or written
  once) over its time. An H200 reaches about 4.8 TB/s by NVIDIA's data sheet.

Then the peak memory that the masked MSE adds on top of its inputs, for the kernel against
eager torch and compiled torch. Without CUDA the GPU timings are skipped, and only the torch
references run eagerly on the CPU for ``--cpu-tokens`` tokens, labelled as such.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch._dynamo

from bumblebee_dist.tokens import PDG_VOCABULARY_SIZE
from kernels.attention import unpadded_attention_torch, unpadded_attention_triton
from kernels.embedding_sum import embedding_sum_torch, embedding_sum_triton
from kernels.masked_mse import masked_mse_torch, masked_mse_triton

WIDTH, HEADS, HEAD_DIM, FEATURES = 768, 16, 48, 5
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Case:
    """One op on one packed batch: a forward-plus-backward closure per implementation."""

    name: str
    run: dict[str, Callable[[], None]]  # implementation name -> forward plus backward
    leaves: list[torch.Tensor]  # tensors whose .grad is reset between calls
    min_bytes: int  # minimum memory traffic of one forward plus backward


def draw_lengths(num_tokens: int, rng: np.random.Generator) -> list[int]:
    """Draw event lengths of 11 to 20 tokens that sum to exactly ``num_tokens``."""
    lengths = []
    total = 0
    while total < num_tokens:
        length = 9 + 2 + min(int(rng.poisson(1.5)), 9)
        length = min(length, num_tokens - total)
        lengths.append(length)
        total += length
    return lengths


def packed_offsets(lengths: list[int], device: str) -> torch.Tensor:
    """Return cu_seqlens, (E + 1,) int32 on ``device``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return torch.from_numpy(offsets).to(device)


def forward_backward(function, args, upstream) -> Callable[[], None]:
    """Return a closure that runs ``function(*args)`` and its backward with ``upstream``."""
    def run():
        out = function(*args)
        out.backward(upstream)
    return run


def compiled_or_none(function):
    """Return torch.compile(function), or None when this torch build cannot compile."""
    try:
        return torch.compile(function, dynamic=True)
    except RuntimeError as error:
        print(f"torch.compile is unavailable ({error}); the compiled column stays empty")
        return None


def attention_case(num_tokens, dtype, device, rng) -> Case:
    """Unpadded attention over the drawn events, q, k and v as views of one projection."""
    lengths = draw_lengths(num_tokens, rng)
    cu_seqlens = packed_offsets(lengths, device)
    qkv = torch.randn(num_tokens, 3, HEADS, HEAD_DIM, device=device, dtype=dtype,
                      requires_grad=True)
    upstream = torch.randn(num_tokens, HEADS, HEAD_DIM, device=device, dtype=dtype)
    implementations = {"kernel": unpadded_attention_triton, "torch": unpadded_attention_torch,
                       "compiled": compiled_or_none(unpadded_attention_torch)}
    run = {name: forward_backward(lambda *a, f=function: f(*qkv.unbind(1), *a),
                                  (cu_seqlens, max(lengths)), upstream)
           for name, function in implementations.items() if function is not None}
    element = qkv.element_size()
    # Forward: q, k, v read, out and the fp32 lse written. Backward: q, k, v, out, dO and lse
    # read, dq, dk, dv written. That is 12 (T, N, H) tensors and 2 (N, T) ones.
    min_bytes = num_tokens * HEADS * (12 * HEAD_DIM * element + 2 * 4)
    return Case("unpadded_attention", run, [qkv], min_bytes)


def embedding_inputs(num_tokens, dtype, device, rng):
    """Return the keyword arguments of ``embedding_sum_*`` and the (T, D) upstream gradient."""
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    tensors = {
        "features": torch.randn(num_tokens, FEATURES, generator=generator),
        "mask": torch.rand(num_tokens, generator=generator) < 0.3,
        "pdg_index": torch.randint(0, PDG_VOCABULARY_SIZE, (num_tokens,), generator=generator),
        "level": torch.randint(0, 2, (num_tokens,), generator=generator),
        "proj_weight": torch.randn(WIDTH, FEATURES, generator=generator) * 0.02,
        "proj_bias": torch.zeros(WIDTH),
        "pdg_table": torch.randn(PDG_VOCABULARY_SIZE, WIDTH, generator=generator) * 0.02,
        "level_table": torch.randn(2, WIDTH, generator=generator) * 0.02,
        "mask_table": torch.randn(2, WIDTH, generator=generator) * 0.02,
    }
    tensors = {name: tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
               for name, tensor in tensors.items()}
    for name in ("proj_weight", "proj_bias", "pdg_table", "level_table", "mask_table"):
        tensors[name].requires_grad_()
    upstream = torch.randn(num_tokens, WIDTH, device=device, dtype=dtype)
    return tensors, upstream


def embedding_case(num_tokens, dtype, device, rng, grad_mode) -> Case:
    """Embedding sum with the parameter gradients reduced in ``grad_mode``."""
    tensors, upstream = embedding_inputs(num_tokens, dtype, device, rng)
    leaves = [tensor for tensor in tensors.values() if tensor.requires_grad]

    def kernel(**kwargs):
        return embedding_sum_triton(**kwargs, grad_mode=grad_mode)

    implementations = {"kernel": kernel, "torch": embedding_sum_torch,
                       "compiled": compiled_or_none(embedding_sum_torch)}
    run = {name: forward_backward(lambda f=function: f(**tensors), (), upstream)
           for name, function in implementations.items() if function is not None}
    element = upstream.element_size()
    # The output and the feature gradient are written once and the upstream gradient is read
    # once. Both passes read the features, the bool mask and two int64 indices of each token.
    feature_bytes = FEATURES * tensors["features"].element_size()
    min_bytes = num_tokens * (2 * WIDTH * element + feature_bytes + 2 * (feature_bytes + 17))
    return Case(f"embedding_sum ({grad_mode})", run, leaves, min_bytes)


def masked_mse_inputs(num_tokens, dtype, device):
    """Return prediction (a leaf), target, mask and the normalizer."""
    prediction = torch.randn(num_tokens, FEATURES, device=device, dtype=dtype,
                             requires_grad=True)
    target = torch.randn(num_tokens, FEATURES, device=device, dtype=dtype)
    mask = torch.rand(num_tokens, device=device) < 0.3
    return prediction, target, mask, max(int(mask.sum()), 1)


def masked_mse_case(num_tokens, dtype, device) -> Case:
    """Masked MSE with the gradient of the prediction."""
    prediction, target, mask, normalizer = masked_mse_inputs(num_tokens, dtype, device)
    implementations = {"kernel": masked_mse_triton, "torch": masked_mse_torch,
                       "compiled": compiled_or_none(masked_mse_torch)}
    run = {name: forward_backward(function, (prediction, target, mask, normalizer), None)
           for name, function in implementations.items() if function is not None}
    element = prediction.element_size()
    # prediction and target read, mask read, the fp32 gradient written and read, dP written.
    min_bytes = num_tokens * (FEATURES * (3 * element + 8) + 1)
    return Case("masked_mse", run, [prediction], min_bytes)


def time_case(case: Case) -> dict[str, float]:
    """Return ms per forward plus backward of each implementation of ``case``."""
    from triton.testing import do_bench

    return {name: measure(case.name, name, do_bench, run, warmup=25, rep=100,
                          grad_to_none=case.leaves)
            for name, run in case.run.items()}


def measure(case_name: str, name: str, function, *args, **kwargs) -> float:
    """Return function(*args, **kwargs); NaN when torch.compile fails on the compiled column."""
    try:
        return function(*args, **kwargs)
    except torch._dynamo.exc.TorchDynamoException as error:
        # torch.compile compiles at the first call; its failure must not cost the other columns.
        if name != "compiled":
            raise
        first_line = (str(error).splitlines() or [""])[0]
        print(f"{case_name}: torch.compile failed with {type(error).__name__}: {first_line}")
        return math.nan


def print_timings(case: Case, num_tokens: int, timings: dict[str, float]) -> None:
    kernel = timings["kernel"]
    compiled = timings.get("compiled", math.nan)
    bandwidth = case.min_bytes / (kernel * 1e-3) / 1e9
    print(f"{case.name:28s} {num_tokens:>8d} {kernel:9.3f} {timings['torch']:9.3f} "
          f"{compiled:9.3f} {timings['torch'] / kernel:12.2f} {compiled / kernel:15.2f} "
          f"{bandwidth:8.0f}")


def peak_extra_mib(run: Callable[[], None], leaves: list[torch.Tensor]) -> float:
    """Return the peak CUDA memory that one call allocates beyond what was allocated before."""
    for leaf in leaves:
        leaf.grad = None
    run()  # warm up compilation and caches first
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_gpu(tokens: list[int], dtype: torch.dtype) -> None:
    """Time every op at every token count and print the masked-MSE memory comparison."""
    rng = np.random.default_rng(0)
    print(f"GPU: {torch.cuda.get_device_name()}, dtype {dtype}")
    print(f"{'op':28s} {'tokens':>8s} {'kernel':>9s} {'torch':>9s} {'compiled':>9s} "
          f"{'torch/kernel':>12s} {'compiled/kernel':>15s} {'GB/s':>8s}   (ms per fwd+bwd)")
    for num_tokens in tokens:
        cases = [attention_case(num_tokens, dtype, "cuda", rng),
                 embedding_case(num_tokens, dtype, "cuda", rng, "deterministic"),
                 embedding_case(num_tokens, dtype, "cuda", rng, "atomic"),
                 masked_mse_case(num_tokens, dtype, "cuda")]
        for case in cases:
            print_timings(case, num_tokens, time_case(case))
        del cases
    print("\nmasked_mse peak memory beyond its inputs, MiB, one forward plus backward")
    print(f"{'tokens':>8s} {'kernel':>10s} {'torch':>10s} {'compiled':>10s}")
    for num_tokens in tokens:
        case = masked_mse_case(num_tokens, dtype, "cuda")
        peaks = {name: measure(case.name, name, peak_extra_mib, run, case.leaves)
                 for name, run in case.run.items()}
        print(f"{num_tokens:>8d} {peaks['kernel']:10.2f} {peaks['torch']:10.2f} "
              f"{peaks.get('compiled', math.nan):10.2f}")


def run_cpu_reference(num_tokens: int, repeats: int = 3) -> None:
    """Time the torch references alone, eagerly, in fp32 on the CPU."""
    print(f"\nCPU, torch references only (eager, fp32, {num_tokens} tokens, best of {repeats}); "
          f"these are no kernel timings")
    rng = np.random.default_rng(0)
    cases = [attention_case(num_tokens, torch.float32, "cpu", rng),
             embedding_case(num_tokens, torch.float32, "cpu", rng, "deterministic"),
             masked_mse_case(num_tokens, torch.float32, "cpu")]
    for case in cases:
        run = case.run["torch"]
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        name = case.name.split(" ")[0]
        print(f"  {name:20s} {best * 1e3:9.2f} ms per forward plus backward")


def main() -> None:
    """Parse the arguments and run the GPU benchmark, or the CPU reference timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16_384, 65_536, 262_144],
                        help="packed tokens per batch, one row per value")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="dtype of the inputs and parameters on the GPU")
    parser.add_argument("--cpu-tokens", type=int, default=2048,
                        help="tokens of the CPU reference timings without CUDA; 0 skips them")
    args = parser.parse_args()
    if torch.cuda.is_available():
        run_gpu(args.tokens, DTYPES[args.dtype])
        return
    print("CUDA is not available: kernel timings need a GPU, so none are taken here.")
    if args.cpu_tokens > 0:
        # The Triton imports above define the kernels but launch nothing on the CPU.
        run_cpu_reference(args.cpu_tokens)


if __name__ == "__main__":
    main()
