import subprocess
import sys

import pytest
import torch

from bumblebee_dist.config import model_preset
from bumblebee_dist.model import (
    BumblebeeEncoder,
    count_parameters,
    init_weights,
    parameter_count_formula,
)
from bumblebee_dist.tokens import PDG_VOCABULARY_SIZE

PAPER_PARAMETERS = 56_726_021


def make_batch(lengths, seed=0, num_features=5):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return {
        "features": torch.randn(total, num_features, generator=generator, dtype=torch.float64),
        "pdg_index": torch.randint(0, PDG_VOCABULARY_SIZE, (total,), generator=generator),
        "level": torch.randint(0, 2, (total,), generator=generator),
        "mask": torch.rand(total, generator=generator) < 0.3,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": max(lengths, default=0),
    }


def tiny_model(seed=0):
    return BumblebeeEncoder(model_preset("tiny"), init_seed=seed).double().eval()


def slice_event(batch, start, end):
    tokens = {name: batch[name][start:end] for name in ("features", "pdg_index", "level", "mask")}
    cu_seqlens = torch.tensor([0, end - start], dtype=torch.int32)
    return {**tokens, "cu_seqlens": cu_seqlens, "max_seqlen": end - start}


def test_packed_equals_each_event_alone():
    lengths = [0, 1, 25, 0, 7, 13]
    model, batch = tiny_model(), make_batch(lengths)
    packed = model(**batch)
    offsets = batch["cu_seqlens"].tolist()
    for start, end in zip(offsets[:-1], offsets[1:]):
        alone = model(**slice_event(batch, start, end))
        assert alone.shape == (end - start, 5)
        torch.testing.assert_close(packed[start:end], alone, rtol=1e-10, atol=1e-10)


def test_permuting_particles_permutes_output():
    model, batch = tiny_model(), make_batch([11, 14], seed=1)
    permutation = torch.cat([torch.randperm(11), 11 + torch.randperm(14)])
    permuted = {name: batch[name][permutation]
                for name in ("features", "pdg_index", "level", "mask")}
    out = model(**batch)
    out_permuted = model(**{**batch, **permuted})
    torch.testing.assert_close(out_permuted, out[permutation], rtol=1e-10, atol=1e-10)


def test_masked_features_do_not_change_output():
    model, batch = tiny_model(), make_batch([9, 16], seed=2)
    out = model(**batch)
    changed = batch["features"].clone()
    changed[batch["mask"]] = torch.randn(int(batch["mask"].sum()), 5, dtype=torch.float64) * 50
    assert torch.equal(model(**{**batch, "features": changed}), out)


def test_visible_features_change_output():
    model, batch = tiny_model(), make_batch([9, 16], seed=3)
    out = model(**batch)
    changed = batch["features"].clone()
    changed[~batch["mask"]] += 1.0
    assert not torch.allclose(model(**{**batch, "features": changed}), out)


def test_gradients_finite_for_every_parameter():
    model = BumblebeeEncoder(model_preset("tiny"), init_seed=5)
    batch = make_batch([0, 1, 25, 4], seed=4)
    batch["features"] = batch["features"].float()
    model(**batch).square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


def test_paper_preset_parameter_count():
    config = model_preset("paper")
    model = BumblebeeEncoder(config, init_seed=None)
    count = count_parameters(model)
    assert count == PAPER_PARAMETERS
    assert count == parameter_count_formula(config)
    assert abs(count - 57e6) / 57e6 < 0.01


@pytest.mark.parametrize("preset", ["small", "tiny"])
def test_parameter_formula_matches_model(preset):
    config = model_preset(preset)
    assert count_parameters(BumblebeeEncoder(config)) == parameter_count_formula(config)


def test_init_weights_deterministic():
    first = BumblebeeEncoder(model_preset("tiny"), init_seed=7).state_dict()
    second = BumblebeeEncoder(model_preset("tiny"), init_seed=7).state_dict()
    other = BumblebeeEncoder(model_preset("tiny"), init_seed=8).state_dict()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])


def test_init_weights_resets_trained_values():
    model = BumblebeeEncoder(model_preset("tiny"), init_seed=3)
    reference = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    init_weights(model, 3)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_invalid_cu_seqlens_rejected():
    model, batch = tiny_model(), make_batch([3, 4])
    batch["cu_seqlens"] = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="end at the total token count 7"):
        model(**batch)


def test_wrong_feature_count_rejected():
    model, batch = tiny_model(), make_batch([3], num_features=4)
    with pytest.raises(ValueError, match="num_features"):
        model(**batch)


def test_model_does_not_import_deepspeed():
    code = "import sys, bumblebee_dist.model; print('deepspeed' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
