import pytest
import torch

from kernels.embedding_sum import embedding_sum_torch

WIDTH, FEATURES, PDG_ROWS = 16, 5, 13


def make_inputs(num_tokens=29, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "features": torch.randn(num_tokens, FEATURES, generator=generator),
        "mask": torch.rand(num_tokens, generator=generator) < 0.3,
        "pdg_index": torch.randint(0, PDG_ROWS, (num_tokens,), generator=generator),
        "level": torch.randint(0, 2, (num_tokens,), generator=generator),
        "proj_weight": torch.randn(WIDTH, FEATURES, generator=generator),
        "proj_bias": torch.randn(WIDTH, generator=generator),
        "pdg_table": torch.randn(PDG_ROWS, WIDTH, generator=generator),
        "level_table": torch.randn(2, WIDTH, generator=generator),
        "mask_table": torch.randn(2, WIDTH, generator=generator),
    }
    return tensors


def manual(t):
    visible = t["features"].clone()
    visible[t["mask"]] = 0.0
    out = visible @ t["proj_weight"].T + t["proj_bias"]
    return (out + t["pdg_table"][t["pdg_index"]] + t["level_table"][t["level"]]
            + t["mask_table"][t["mask"].long()])


def test_matches_manual_formula():
    tensors = make_inputs()
    torch.testing.assert_close(embedding_sum_torch(**tensors), manual(tensors))


def test_masked_features_do_not_reach_output_or_grad():
    tensors = make_inputs(seed=1)
    clean = embedding_sum_torch(**tensors)
    tensors["features"][tensors["mask"]] = float("nan")
    tensors["features"].requires_grad_()
    tensors["proj_weight"].requires_grad_()
    out = embedding_sum_torch(**tensors)
    out.square().sum().backward()
    assert torch.equal(out, clean)
    assert torch.isfinite(tensors["proj_weight"].grad).all()
    assert torch.count_nonzero(tensors["features"].grad[tensors["mask"]]) == 0


def test_non_contiguous_features():
    tensors = make_inputs(seed=2)
    wide = torch.randn(tensors["features"].shape[0], 2 * FEATURES)
    view = wide[:, ::2]
    assert not view.is_contiguous()
    tensors["features"] = view
    expected = manual({**tensors, "features": view.contiguous()})
    torch.testing.assert_close(embedding_sum_torch(**tensors), expected)


def test_level_as_int8():
    tensors = make_inputs(seed=3)
    expected = embedding_sum_torch(**tensors)
    tensors["level"] = tensors["level"].to(torch.int8)
    torch.testing.assert_close(embedding_sum_torch(**tensors), expected)


def grads_of(tensors, upstream):
    leaves = {name: tensors[name].clone().requires_grad_() for name in
              ("features", "proj_weight", "proj_bias", "pdg_table", "level_table", "mask_table")}
    out = embedding_sum_torch(**{**tensors, **leaves})
    out.backward(upstream(out))
    return {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("kind", ["stride_zero", "from_cat"])
def test_unusual_upstream_grad(kind):
    tensors = make_inputs(seed=4)
    generator = torch.Generator().manual_seed(9)
    dense = torch.randn(tensors["features"].shape[0], WIDTH, generator=generator)
    if kind == "stride_zero":
        upstream_value = torch.ones(1, 1).expand(dense.shape)
        expected_value = torch.ones(dense.shape)
    else:
        upstream_value = torch.cat([dense, dense], dim=1)[:, WIDTH // 2: WIDTH // 2 + WIDTH]
        expected_value = upstream_value.contiguous()
    assert not upstream_value.is_contiguous()
    got = grads_of(tensors, lambda out: upstream_value)
    expected = grads_of(tensors, lambda out: expected_value)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_shape_errors_name_argument():
    tensors = make_inputs()
    with pytest.raises(ValueError, match="mask must be"):
        embedding_sum_torch(**{**tensors, "mask": tensors["mask"].long()})
    with pytest.raises(ValueError, match="proj_weight"):
        embedding_sum_torch(**{**tensors, "proj_weight": tensors["proj_weight"].T})
    with pytest.raises(ValueError, match="level_table"):
        embedding_sum_torch(**{**tensors, "level_table": torch.zeros(2, WIDTH + 1)})
