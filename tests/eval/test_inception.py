"""Inception Score: 1 for identical predictions, the number of classes for confident, balanced
ones, the direct formula otherwise; bad inputs rejected."""

import numpy as np
import pytest

from eval.inception import inception_score


def test_identical_uniform_predictions_score_one():
    mean, std = inception_score(np.full((100, 101), 1 / 101), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_confident_balanced_predictions_score_the_number_of_classes():
    probabilities = np.eye(10)[np.arange(200) % 10]
    mean, _ = inception_score(probabilities, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-9)


def test_matches_the_direct_formula_per_split():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 7)) * 2
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = []
    for part in np.array_split(probabilities, 3):  # no shuffle: contiguous equal parts
        marginal = part.mean(axis=0)
        scores.append(np.exp(np.mean([np.sum(p * np.log(p / marginal)) for p in part])))
    mean, std = inception_score(probabilities, splits=3, shuffle_seed=None)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10) and std == pytest.approx(np.std(scores), rel=1e-8)
    shuffled, _ = inception_score(probabilities, splits=1)  # one split: order does not matter
    assert shuffled == pytest.approx(inception_score(probabilities, splits=1, shuffle_seed=None)[0], rel=1e-12)


def test_rejects_logits_and_too_many_splits():
    with pytest.raises(ValueError, match="softmax"):
        inception_score(np.random.default_rng(0).normal(size=(20, 5)))
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.full((5, 3), 1 / 3), splits=10)


def stylegan_v_isv(probabilities: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """StyleGAN-V's `compute_isv`, written here from its definition: shuffle with
    numpy RandomState(42), split at i * n // splits, KL of each row to its split's marginal."""
    probs = probabilities.astype(np.float64).copy()
    np.random.RandomState(42).shuffle(probs)
    n, scores = len(probs), []
    for i in range(num_splits):
        part = probs[i * n // num_splits : (i + 1) * n // num_splits]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("samples", [10_000, 2048, 1001])
def test_parity_with_stylegan_v_video_is(samples):
    rng = np.random.default_rng(samples)
    logits = rng.normal(size=(samples, 101)) * 3 + rng.normal(size=101)  # uneven classes, confident rows
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    mean, std = inception_score(probabilities, splits=10)
    expected_mean, expected_std = stylegan_v_isv(probabilities)
    assert mean == pytest.approx(expected_mean, rel=1e-6) and std == pytest.approx(expected_std, rel=1e-6)
    unshuffled, _ = inception_score(probabilities, splits=10, shuffle_seed=None)
    assert unshuffled != pytest.approx(expected_mean, rel=1e-9)  # the shuffle is part of the protocol
