import numpy as np
import pytest

from bumblebee_dist.masking import (
    MODE_GEN,
    MODE_ONE,
    MODE_RECO,
    draw_mask,
    draw_mask_with_modes,
    draw_modes,
)

SEED = 1234


def make_events(num_events: int, seed: int = 0, max_len: int = 20):
    """Return event ids, offsets and levels of random events of 0 to max_len tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, num_events)
    offsets = np.zeros(num_events + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    level = rng.integers(0, 2, int(offsets[-1])).astype(np.int8)
    event_id = rng.permutation(10 * num_events)[:num_events].astype(np.int64)
    return event_id, offsets, level


def test_mode_probabilities():
    num_events = 200_000
    mode, _ = draw_modes(np.arange(num_events, dtype=np.int64), SEED, 0)
    for value, probability in ((MODE_ONE, 0.5), (MODE_RECO, 0.25), (MODE_GEN, 0.25)):
        observed = np.mean(mode == value)
        sigma = np.sqrt(probability * (1 - probability) / num_events)
        assert abs(observed - probability) < 5 * sigma, (value, observed)


def test_single_particle_is_uniform():
    num_events, length = 60_000, 7
    offsets = np.arange(num_events + 1, dtype=np.int64) * length
    level = np.ones(num_events * length, dtype=np.int8)
    event_id = np.arange(num_events, dtype=np.int64)
    mask, mode = draw_mask_with_modes(event_id, offsets, level, SEED, 3)
    one = mode == MODE_ONE
    positions = np.argmax(mask.reshape(num_events, length)[one], axis=1)
    counts = np.bincount(positions, minlength=length)
    expected = one.sum() / length
    sigma = np.sqrt(expected * (1 - 1 / length))
    assert np.all(np.abs(counts - expected) < 5 * sigma), counts


def test_mask_follows_mode():
    event_id, offsets, level = make_events(3000)
    mask, mode = draw_mask_with_modes(event_id, offsets, level, SEED, 0)
    for event in range(event_id.size):
        start, end = offsets[event], offsets[event + 1]
        event_mask, event_level = mask[start:end], level[start:end]
        if mode[event] == MODE_ONE:
            assert event_mask.sum() == min(1, end - start)
        elif mode[event] == MODE_RECO:
            np.testing.assert_array_equal(event_mask, event_level == 1)
        else:
            np.testing.assert_array_equal(event_mask, event_level == 0)


def test_same_inputs_same_mask():
    event_id, offsets, level = make_events(500)
    first = draw_mask(event_id, offsets, level, SEED, 2)
    second = draw_mask(event_id, offsets, level, SEED, 2)
    np.testing.assert_array_equal(first, second)


def test_independent_of_batch_split():
    event_id, offsets, level = make_events(1000)
    whole = draw_mask(event_id, offsets, level, SEED, 5)
    cuts = [0, 1, 2, 130, 131, 600, 1000]
    pieces = []
    for start, end in zip(cuts[:-1], cuts[1:]):
        piece_offsets = offsets[start:end + 1] - offsets[start]
        piece_level = level[offsets[start]:offsets[end]]
        pieces.append(draw_mask(event_id[start:end], piece_offsets, piece_level, SEED, 5))
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_independent_of_event_order():
    event_id = np.array([7, 3, 11], dtype=np.int64)
    mode, u = draw_modes(event_id, SEED, 0)
    reversed_mode, reversed_u = draw_modes(event_id[::-1].copy(), SEED, 0)
    np.testing.assert_array_equal(mode, reversed_mode[::-1])
    np.testing.assert_array_equal(u, reversed_u[::-1])


def test_epoch_changes_draw():
    event_id = np.arange(10_000, dtype=np.int64)
    mode_0, u_0 = draw_modes(event_id, SEED, 0)
    mode_1, u_1 = draw_modes(event_id, SEED, 1)
    # Independent draws agree on the mode with probability 0.5^2 + 2 * 0.25^2 = 0.375.
    assert 0.34 < np.mean(mode_0 == mode_1) < 0.41
    assert not np.any(u_0 == u_1)


def test_seed_changes_draw():
    event_id = np.arange(10_000, dtype=np.int64)
    mode_a, _ = draw_modes(event_id, SEED, 0)
    mode_b, _ = draw_modes(event_id, SEED + 1, 0)
    assert 0.34 < np.mean(mode_a == mode_b) < 0.41


def test_empty_batch_and_empty_events():
    offsets = np.zeros(4, dtype=np.int64)
    mask = draw_mask(np.arange(3, dtype=np.int64), offsets, np.zeros(0, np.int8), SEED, 0)
    assert mask.shape == (0,)


def test_negative_ids_and_seed_accepted():
    mode, u = draw_modes(np.array([-1, 0, 2**62], dtype=np.int64), -5, 0)
    assert mode.shape == (3,)
    assert np.all((u >= 0) & (u < 1))


def test_invalid_offsets_raise():
    event_id = np.arange(2, dtype=np.int64)
    level = np.zeros(5, dtype=np.int8)
    with pytest.raises(ValueError, match="shape"):
        draw_mask(event_id, np.array([0, 5]), level, SEED, 0)
    with pytest.raises(ValueError, match="end at the token count 5"):
        draw_mask(event_id, np.array([0, 2, 4]), level, SEED, 0)
    with pytest.raises(ValueError, match="decrease"):
        draw_mask(event_id, np.array([0, 6, 5]), level, SEED, 0)
