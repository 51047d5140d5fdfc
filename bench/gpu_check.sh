#!/usr/bin/env bash
# Check the Triton kernels on a CUDA machine: kernel tests, kernel benchmark, one bf16 step.
#
#   bash bench/gpu_check.sh        # from any folder, with the project's Python environment active
#
# Installs nothing and needs no network. Each stage has a time limit, 4 min 45 s in all.
# Logs go to $OUT when it is set, else to ./gpu_check_out. The exit status is 0 only when
# every stage passed; a failing stage does not stop the later ones.
set -uo pipefail

cd "$(dirname "$0")/.."
out_dir="${OUT:-gpu_check_out}"
mkdir -p "$out_dir"
python="${PYTHON:-python}"
# Unbuffered output, so a stage stopped by its time limit still leaves its log lines.
export PYTHONUNBUFFERED=1

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device is visible to $python: run this script on a GPU machine" >&2
    exit 1
fi
"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton',
triton.__version__, torch.cuda.get_device_name())" | tee "$out_dir/versions.txt"

status=0

echo "== kernel tests on CUDA"
timeout 110 "$python" -m pytest tests/kernels tests/model/test_kernels_parity.py -q \
    -p no:cacheprovider 2>&1 | tee "$out_dir/kernel_tests.log" || status=1

echo "== kernel benchmark"
# Two batch sizes keep the torch.compile warm-up inside the time limit.
timeout 130 "$python" -m bench.kernels --tokens 16384 262144 2>&1 \
    | tee "$out_dir/bench_kernels.txt" || status=1

echo "== one bf16 training step of the small model, Triton kernels against torch"
timeout 45 "$python" - <<'PYTHON' 2>&1 | tee "$out_dir/train_step.log" || status=1
import os
import time

import torch

from bumblebee_dist.config import model_preset
from bumblebee_dist.model import BumblebeeEncoder
from bumblebee_dist.tokens import PDG_VOCABULARY_SIZE
from kernels import dispatch

NUM_EVENTS = 4096


def make_batch():
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(11, 21, (NUM_EVENTS,), generator=generator)
    total = int(lengths.sum())
    cu_seqlens = torch.zeros(NUM_EVENTS + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    batch = {
        "features": torch.randn(total, 5, generator=generator),
        "pdg_index": torch.randint(0, PDG_VOCABULARY_SIZE, (total,), generator=generator),
        "level": torch.randint(0, 2, (total,), generator=generator),
        "mask": torch.rand(total, generator=generator) < 0.3,
        "cu_seqlens": cu_seqlens,
    }
    batch = {name: tensor.cuda() for name, tensor in batch.items()}
    batch["features"] = batch["features"].bfloat16()
    return {**batch, "max_seqlen": int(lengths.max())}


def train_step(backend, batch):
    os.environ[dispatch.ENV_VAR] = backend
    model = BumblebeeEncoder(model_preset("small"), init_seed=0).cuda().bfloat16()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.cuda.synchronize()
    start = time.perf_counter()
    prediction = model(**batch)
    mask = batch["mask"]
    loss = dispatch.masked_mse(prediction, batch["features"], mask, int(mask.sum()))
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"{backend:6s}: loss {loss.item():.5f}, grad norm {grad_norm.item():.5f}, "
          f"{elapsed * 1e3:.1f} ms (first step, compilation included)")
    return loss.float(), grad_norm.float()


batch = make_batch()
print(f"{NUM_EVENTS} events, {batch['features'].shape[0]} tokens")
os.environ[dispatch.ENV_VAR] = "auto"
for op in ("embedding_sum", "masked_mse", "unpadded_attention"):
    assert dispatch.select_backend(op, torch.device("cuda")) == "triton", op
triton_loss, triton_norm = train_step("triton", batch)
torch_loss, torch_norm = train_step("torch", batch)
assert torch.isfinite(triton_loss), "the Triton step gave a non-finite loss"
assert torch.isfinite(triton_norm), "the Triton step gave a non-finite gradient norm"
# Both paths round to bf16 at every layer boundary; 2 % covers that rounding, not a bug.
torch.testing.assert_close(triton_loss, torch_loss, rtol=2e-2, atol=0.0)
torch.testing.assert_close(triton_norm, torch_norm, rtol=5e-2, atol=0.0)
print("bf16 training step: Triton and torch agree")
PYTHON

if [ "$status" -eq 0 ]; then echo "gpu check passed; logs in $out_dir"; else
    echo "gpu check FAILED; logs in $out_dir" >&2; fi
exit "$status"
