"""Two DeepSpeed CPU ranks against one plain PyTorch process on the same events.

One launch of ``ds_harness.py`` covers ZeRO-2 and ZeRO-3: loss normalization over ranks and
micro-batches, steps skipped on every rank, checkpoint round trip, export round trip, placeholder
rejection, and tied weights with a 1-element bias. The launch takes about 30 s.
"""

import json
import subprocess

import pytest
import torch

from bumblebee_dist.data.synthetic import write_dataset
from bumblebee_dist.launching import deepspeed_command
from bumblebee_dist.train import checkpoint as ckpt

pytestmark = pytest.mark.slow
STAGES = (2, 3)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    write_dataset(root / "data", {"train": [200, 200], "val": [40]}, seed=5)
    command, env = deepspeed_command("tests/train/ds_harness.py", [str(root / "data"), str(root)],
                                     num_ranks=2)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return {stage: json.loads((root / f"harness_stage{stage}.json").read_text()) for stage in STAGES}


@pytest.mark.parametrize("stage", STAGES)
def test_loss_matches_single_process(reports, stage):
    steps = reports[stage]["steps"]
    for index, step in enumerate(steps):
        if step["reference_loss"] is None:
            continue
        assert step["loss"] == pytest.approx(step["reference_loss"], rel=1e-5), index
        assert step["max_param_difference"] < 1e-5, index


@pytest.mark.parametrize("stage", STAGES)
def test_skipped_steps_agree(reports, stage):
    steps = reports[stage]["steps"]
    assert [bool(step["skipped"]) for step in steps] == [False, False, False, True, True, False]
    assert "no token enters the loss" in steps[3]["skipped"]
    assert "non-finite loss on 1 of 2 ranks" in steps[4]["skipped"]
    # The parameters after the skipped steps still equal the reference, which made no update.
    assert steps[4]["max_param_difference"] < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend is chosen without CUDA")
def test_gloo_chosen_without_gpu(reports):
    assert reports[2]["backend"] == "gloo"
    assert reports[2]["world_size"] == 2


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_round_trip(reports, stage):
    report = reports[stage]
    assert report["checkpoint_keys_equal"]
    assert report["checkpoint_max_difference"] == 0.0
    assert report["checkpoint_rank_entry_ok"]
    first, again = report["replayed_losses"]
    assert first == again


@pytest.mark.parametrize("stage", STAGES)
def test_export_round_trip(reports, stage):
    report = reports[stage]
    assert report["export_numel"] == report["model_numel"]
    assert report["export_weights_difference"] == 0.0
    assert report["export_output_difference"] <= 1e-6


def test_export_rejects_zero3_placeholder(reports):
    report = reports[3]
    assert "'embedding.proj.weight'" in report["placeholder_error"]
    assert "partitioned placeholder" in report["placeholder_error"]
    assert not report["placeholder_file_written"]


@pytest.mark.parametrize("stage", STAGES)
def test_tied_weights_export(reports, stage):
    report = reports[stage]
    assert report["tied_keys"] == ["embedding.weight", "head.bias", "head.weight", "score.bias",
                                   "score.weight"]
    assert report["tied_output_difference"] <= 1e-6
    assert report["tied_still_shared"]
    assert report["score_bias_shape"] == [1]


def test_resume_on_other_world_size_rejected(reports):
    path = reports[2]["checkpoint_path"]
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_checkpoint(engine=None, path=path)  # this process is a world of 1
    assert "world size 2" in str(error.value)
    assert "world size 1" in str(error.value)
