"""Fast checks of the training pieces that need no DeepSpeed launcher."""

import json
import math
import os

import numpy as np
import pytest
import torch

from bumblebee_dist.config import RunConfig, TrainConfig, model_preset
from bumblebee_dist.data.packing import PackedBatch
from bumblebee_dist.features import FeatureStats
from bumblebee_dist.finetune import (CLASS_TOKEN_INDEX, TASKS, append_class_tokens, build_task,
                                     class_token_positions, load_starting_model, select_events)
from bumblebee_dist.model import BumblebeeEncoder
from bumblebee_dist.tokens import LEVEL_GEN, LEVEL_RECO
from bumblebee_dist.train import checkpoint as ckpt
from bumblebee_dist.train.engine import DistInfo, StepGate, deepspeed_config, lr_at
from bumblebee_dist.train.export import (ExportError, check_state_dict, expected_shapes,
                                         load_exported, write_export)
from bumblebee_dist.train.loop import PretrainTask, TrainState
from bumblebee_dist.train.run import (NothingTrainedError, RunDirBusyError, check_trained,
                                      lock_run_dir)

SAMPLES = [{"name": "ttbar", "id": 0}, {"name": "eta_t", "id": 1}]


def make_packed(lengths, samples, codes, seed=0) -> PackedBatch:
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths), 0)
    level = torch.tensor([LEVEL_RECO if i % 2 else LEVEL_GEN for i in range(total)])
    return PackedBatch(
        features=torch.randn(total, 5, generator=generator), pdg_index=torch.zeros(total, dtype=torch.int64),
        level=level, mask=level == LEVEL_GEN, cu_seqlens=cu_seqlens, max_seqlen=max(lengths),
        event_id=torch.arange(len(lengths)), process_code=torch.tensor(codes, dtype=torch.int32),
        sample=torch.tensor(samples, dtype=torch.int8),
        m_ttbar_true=torch.full((len(lengths),), 400.0))


def test_deepspeed_config_from_train_config():
    train = TrainConfig(zero_stage=3, grad_accum=4, grad_clip=0.5)
    config = deepspeed_config(train, "fp32")
    assert config["train_micro_batch_size_per_gpu"] == 1
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == 3
    assert config["bf16"]["enabled"] is False
    assert deepspeed_config(train, "bf16")["bf16"]["enabled"] is True


def test_deepspeed_config_names_zero_clip():
    # DeepSpeed clips at norm 1.0 when the key is absent, so "0 disables" must be written out.
    config = deepspeed_config(TrainConfig(grad_clip=0.0), "fp32")
    assert config["gradient_clipping"] == 0.0


def test_deepspeed_config_persistence_threshold():
    zero = deepspeed_config(TrainConfig(zero_stage=3), "fp32")["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 100_000
    train = TrainConfig(zero_stage=3, zero3_param_persistence_threshold=0)
    zero = deepspeed_config(train, "fp32")["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0
    zero = deepspeed_config(TrainConfig(zero_stage=2), "fp32")["zero_optimization"]
    assert "stage3_param_persistence_threshold" not in zero


def test_lr_warmup_then_cosine():
    train = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, train, 110) == pytest.approx(0.1)
    assert lr_at(9, train, 110) == pytest.approx(1.0)
    assert lr_at(60, train, 110) == pytest.approx(0.55)
    assert lr_at(110, train, 110) == pytest.approx(0.1)
    assert lr_at(500, train, 110) == pytest.approx(0.1)


def test_step_gate_blocks_updates():
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    gate = StepGate(optimizer)
    parameter.grad = torch.ones(3)
    gate.closed = True
    optimizer.step()
    assert torch.equal(parameter.detach(), torch.ones(3))
    assert optimizer.state == {} or not optimizer.state[parameter]
    gate.closed = False
    optimizer.step()
    assert not torch.equal(parameter.detach(), torch.ones(3))


def fake_checkpoint(root, step, world_size=2, complete=True):
    path = root / ckpt.tag_for(step) if complete else root / (ckpt.TMP_PREFIX + ckpt.tag_for(step))
    path.mkdir(parents=True)
    if complete:
        (path / ckpt.MARKER).write_text(json.dumps({"step": step, "world_size": world_size}))
    return path


def test_resume_auto_picks_newest_complete(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    assert ckpt.resolve_resume("auto", tmp_path) is None
    fake_checkpoint(root, 50)
    newest = fake_checkpoint(root, 100)
    fake_checkpoint(root, 150, complete=False)  # a save that crashed half-way
    incomplete = root / ckpt.tag_for(200)
    incomplete.mkdir()  # final name but no marker
    assert ckpt.resolve_resume("auto", tmp_path) == newest
    assert ckpt.resolve_resume(str(root), tmp_path) == newest


def test_damaged_checkpoint_skipped(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    older = fake_checkpoint(root, 50)
    newest = fake_checkpoint(root, 100)
    for path in (older, newest):
        (path / "model_states.pt").write_bytes(b"12345")
        marker = json.loads((path / ckpt.MARKER).read_text())
        marker["files"] = {"model_states.pt": 5}
        (path / ckpt.MARKER).write_text(json.dumps(marker))
    assert ckpt.resolve_resume("auto", tmp_path) == newest
    (newest / "model_states.pt").write_bytes(b"123")  # truncated
    assert ckpt.resolve_resume("auto", tmp_path) == older
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.resolve_resume(str(newest), tmp_path)
    assert "model_states.pt (3 bytes, 5 saved)" in str(error.value)
    (older / "model_states.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="every checkpoint in .* is damaged"):
        ckpt.resolve_resume("auto", tmp_path)


def test_resume_path_without_checkpoint_rejected(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_prune_keeps_newest(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    for step in (10, 20, 30):
        fake_checkpoint(root, step)
    stale = fake_checkpoint(root, 40, complete=False)
    ckpt.prune_checkpoints(root, keep=2)
    assert [step for step, _ in ckpt.list_complete(root)] == [20, 30]
    assert not stale.exists()


def test_other_world_size_rejected(tmp_path):
    path = fake_checkpoint(ckpt.checkpoint_root(tmp_path), 50, world_size=4)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.check_world_size(path, 2)
    assert "world size 4" in str(error.value)
    assert "world size 2" in str(error.value)


SAVED_MARKER = {"step": 50, "world_size": 2, "zero_stage": 2, "precision": "fp32",
                "settings": {"model": {"num_layers": 4, "hidden_size": 64}, "task": "pretrain"}}


@pytest.mark.parametrize("current, expected", [
    ({"zero_stage": 3}, "zero_stage: 2 saved, 3 now"),
    ({"precision": "bf16"}, "precision: 'fp32' saved, 'bf16' now"),
    ({"model": {"num_layers": 4, "hidden_size": 128}}, "model.hidden_size: 64 saved, 128 now"),
    ({"task": "finetune-toponium"}, "task: 'pretrain' saved, 'finetune-toponium' now"),
])
def test_changed_setting_rejected(tmp_path, current, expected):
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.check_settings(tmp_path, SAVED_MARKER, current)
    assert expected in str(error.value)
    assert "another train.run_dir" in str(error.value)


def test_other_data_set_rejected(tmp_path):
    marker = {**SAVED_MARKER, "settings": {"data_manifest_sha256": "aa11"}}
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.check_settings(tmp_path, marker, {"data_manifest_sha256": "bb22"})
    assert "data_manifest_sha256: 'aa11' saved, 'bb22' now" in str(error.value)
    assert "loader position" in str(error.value)


def test_resume_none_rejects_used_run_dir(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    fake_checkpoint(root, 40, complete=False)
    assert ckpt.resolve_resume("none", tmp_path) is None
    fake_checkpoint(root, 50)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.resolve_resume("none", tmp_path)
    assert "newest at step 50" in str(error.value)
    assert "--resume auto" in str(error.value)


def test_run_dir_lock_excludes_second_job(tmp_path):
    first = lock_run_dir(tmp_path)
    with pytest.raises(RunDirBusyError) as error:
        lock_run_dir(tmp_path)
    assert f"pid {os.getpid()}" in str(error.value)
    assert str(tmp_path) in str(error.value)
    first.close()  # the lock goes with the file, as when the holding process ends
    lock_run_dir(tmp_path).close()


def test_same_settings_accepted(tmp_path):
    ckpt.check_settings(tmp_path, SAVED_MARKER, {
        "zero_stage": 2, "precision": "fp32", "task": "pretrain",
        "model": {"num_layers": 4, "hidden_size": 64}})
    # A setting the checkpoint did not record is not compared.
    ckpt.check_settings(tmp_path, {"step": 50, "world_size": 2}, {"zero_stage": 3})


def test_rng_state_round_trip():
    state = ckpt.capture_rng_state()
    expected = (np.random.rand(), torch.rand(2))
    ckpt.restore_rng_state(state)
    assert np.random.rand() == expected[0]
    assert torch.equal(torch.rand(2), expected[1])


def test_export_round_trip_strict(tmp_path):
    config = model_preset("tiny")
    model = BumblebeeEncoder(config, init_seed=3)
    write_export(model.state_dict(), config, tmp_path / "export", {"task": "unit"})
    loaded = load_exported(tmp_path / "export")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert json.loads((tmp_path / "export" / "config.json").read_text())["task"] == "unit"


def test_export_rejects_placeholder(tmp_path):
    config = model_preset("tiny")
    state = BumblebeeEncoder(config, init_seed=3).state_dict()
    state["head.proj.bias"] = torch.empty(0)
    with pytest.raises(ExportError, match="head.proj.bias"):
        write_export(state, config, tmp_path / "export")
    assert not (tmp_path / "export" / "model.safetensors").exists()


def test_export_rejects_missing_key():
    config = model_preset("tiny")
    state = BumblebeeEncoder(config, init_seed=3).state_dict()
    del state["final_norm.weight"]
    with pytest.raises(ExportError, match="final_norm.weight"):
        check_state_dict(state, expected_shapes(config))


def test_class_tokens_appended_per_event():
    batch = make_packed([3, 2, 4], samples=[0, 1, 0], codes=[601, 601, 602])
    inputs = append_class_tokens(batch, torch.tensor([0.0, 1.0, 0.0]))
    assert inputs.cu_seqlens.tolist() == [0, 4, 7, 12]
    rows = class_token_positions(inputs.cu_seqlens)
    assert rows.tolist() == [3, 6, 11]
    assert inputs.pdg_index[rows].tolist() == [CLASS_TOKEN_INDEX] * 3
    assert inputs.level[rows].tolist() == [LEVEL_RECO] * 3
    assert inputs.mask[rows].all()
    assert inputs.loss_mask.nonzero().flatten().tolist() == rows.tolist()
    assert inputs.target[rows].tolist() == [[0.0] * 5, [1.0, 0, 0, 0, 0], [0.0] * 5]
    assert inputs.max_seqlen == 5
    original_rows = [r for r in range(12) if r not in rows.tolist()]
    assert torch.equal(inputs.features[original_rows], batch.features)
    assert torch.equal(inputs.mask[original_rows], batch.mask)


def test_toponium_labels_eta_t_as_signal():
    task = build_task("toponium", SAMPLES)
    keep, labels = task.select(make_packed([2, 2, 2], samples=[0, 1, 0], codes=[601, 1042, 602]))
    assert keep.tolist() == [True, True, True]
    assert labels.tolist() == [0.0, 1.0, 0.0]


def test_initial_state_keeps_ttbar_only():
    task = build_task("initial_state", SAMPLES)
    batch = make_packed([2, 3, 2, 2], samples=[0, 1, 0, 0], codes=[601, 1042, 602, 601])
    keep, labels = task.select(batch)
    assert keep.tolist() == [True, False, True, True]
    assert labels[keep].tolist() == [1.0, 0.0, 1.0]
    inputs = task.prepare(batch)
    assert inputs.num_events == 3
    assert int(inputs.loss_mask.sum()) == 3


def test_select_events_none_kept():
    batch = make_packed([2, 3], samples=[1, 1], codes=[1042, 1042])
    empty = select_events(batch, torch.tensor([False, False]))
    assert empty.num_events == 0
    assert empty.num_tokens == 0
    assert empty.cu_seqlens.tolist() == [0]


def test_finetune_task_needs_manifest_samples():
    with pytest.raises(ValueError, match="eta_t"):
        build_task("toponium", [{"name": "ttbar", "id": 0}])
    assert set(TASKS) == {"toponium", "initial_state"}


def test_class_token_score_is_finite():
    from bumblebee_dist.finetune import class_scores

    batch = make_packed([3, 2], samples=[0, 1], codes=[601, 1042])
    inputs = append_class_tokens(batch, torch.tensor([0.0, 1.0]))
    scores = class_scores(BumblebeeEncoder(model_preset("tiny")), inputs)
    assert scores.shape == (2,)
    assert all(math.isfinite(s) for s in scores.tolist())


def test_step_flops_counts_matmuls_and_attention():
    from bumblebee_dist.train.throughput import step_flops

    tiny = model_preset("tiny")  # 2 layers, width 32
    # 2 events of 3 and 5 tokens: 6 N T + 12 L D (3^2 + 5^2).
    assert step_flops(tiny, 1000, 8, 34) == 6 * 1000 * 8 + 12 * 2 * 32 * 34


def test_peak_flops_from_environment(monkeypatch):
    from bumblebee_dist.train.throughput import PEAK_ENV, peak_flops_per_device

    monkeypatch.setenv(PEAK_ENV, "100")
    assert peak_flops_per_device("bf16") == 1e14
    monkeypatch.setenv(PEAK_ENV, "fast")
    with pytest.raises(ValueError, match=PEAK_ENV):
        peak_flops_per_device("bf16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="without CUDA the peak is unknown")
def test_mfu_not_available_on_cpu(monkeypatch):
    from bumblebee_dist.train.loop import _format_line
    from bumblebee_dist.train.throughput import PEAK_ENV, peak_flops_per_device

    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_flops_per_device("fp32") is None
    line = _format_line(3, 10, {"lr": 1e-3, "throughput/events_per_s": 10.0,
                                "throughput/tokens_per_s": 150.0, "time/data_wait_share": 0.1,
                                "memory/peak_gib": 0.5})
    assert line.endswith("memory 0.50 GiB | MFU n/a")
    with_mfu = _format_line(3, 10, {"lr": 1e-3, "throughput/events_per_s": 10.0,
                                    "throughput/tokens_per_s": 150.0, "time/data_wait_share": 0.1,
                                    "memory/peak_gib": 0.5, "throughput/mfu": 0.42})
    assert with_mfu.endswith("MFU 42.0 %")


def test_loader_workers_leave_global_rng_alone(tmp_path):
    from bumblebee_dist.data.loader import EventLoader
    from bumblebee_dist.data.synthetic import write_dataset

    write_dataset(tmp_path / "data", {"train": [60]}, seed=2)
    loader = EventLoader(tmp_path / "data", "train", max_tokens=256, num_workers=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches = iter(loader)
    next(batches)
    assert torch.equal(torch.get_rng_state(), before)


def test_finetuning_takes_pretrained_feature_stats(tmp_path):
    # Fine-tuning scales its inputs as the pre-trained model was trained, whatever data it reads.
    stats = {name: {"mean": 0.5 + index, "std": 2.0 + index}
             for index, name in enumerate(("log_pt", "eta", "m"))}
    config = model_preset("tiny")
    export = write_export(BumblebeeEncoder(config, init_seed=0).state_dict(), config,
                          tmp_path / "export", {"task": "pretrain", "feature_stats": stats})
    run = RunConfig(model=model_preset("tiny"))
    run.finetune.pretrained = str(export)
    run.train.run_dir = str(tmp_path / "run")
    dist = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")
    model = load_starting_model(run, dist)
    assert model.feature_stats == FeatureStats.from_manifest(stats)
    assert model.pretrained_version == str(export)


def test_run_without_update_rejected():
    task = PretrainTask()
    with pytest.raises(NothingTrainedError) as error:
        check_trained(TrainState(step=10, skipped_steps=10), task, "data/x")
    assert "none of the 10 optimizer steps updated the model" in str(error.value)
    assert "data/x" in str(error.value)
    with pytest.raises(NothingTrainedError):
        check_trained(TrainState(step=0), task, "data/x")
    check_trained(TrainState(step=10, skipped_steps=9), task, "data/x")
