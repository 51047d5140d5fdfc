#!/usr/bin/env bash
# Check the Triton kernels and training on a CUDA machine: kernel tests, kernel benchmark, one
# bf16 step with and without the kernels, and a short pre-training job through DeepSpeed.
#
#   bash bench/gpu_check.sh        # from any folder, with the project's Python environment active
#
# Installs nothing and needs no network. Each stage has a time limit, 6 min in all.
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
# The compile check is left out: on a GPU the kernels run, and it only repeats the compilation.
timeout 110 "$python" -m pytest tests/kernels tests/model/test_kernels_parity.py -q \
    --ignore tests/kernels/test_triton_compile.py -p no:cacheprovider 2>&1 \
    | tee "$out_dir/kernel_tests.log" || status=1

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

echo "== pre-training on one GPU through the DeepSpeed launcher: bf16, NCCL, ZeRO-2, kernels on"
timeout 75 "$python" - <<'PYTHON' 2>&1 | tee "$out_dir/pretrain.log" || status=1
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bumblebee_dist.data.synthetic import write_dataset

with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
    root = Path(folder)
    write_dataset(root / "data", {"train": [3000, 3000], "val": [500]}, seed=1)
    subprocess.run([sys.executable, "-m", "bumblebee_dist.cli", "pretrain", "--ranks", "1",
                    "--preset", "small", f"data.path={root / 'data'}",
                    f"train.run_dir={root / 'run'}", "train.max_steps=30", "train.epochs=5",
                    "train.log_every=10", "train.val_max_batches=2", "tracking.enabled=false"],
                   check=True)
    result = json.loads((root / "run" / "result.json").read_text())
print(f"pre-training: {result['steps']} steps in {result['precision']}, loss "
      f"{result['first_loss']:.4f} -> {result['last_loss']:.4f}")
assert result["precision"] == "bf16", result["precision"]
assert result["last_loss"] < result["first_loss"], "the loss did not fall in 30 steps"
PYTHON

if [ "$status" -eq 0 ]; then echo "gpu check passed; logs in $out_dir"; else
    echo "gpu check FAILED; logs in $out_dir" >&2; fi
exit "$status"
