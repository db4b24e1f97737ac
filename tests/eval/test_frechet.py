"""Fréchet distance: parity with the scipy sqrtm reference (StyleGAN-V's formula) in float64,
zero for a set against itself, and mergeable running statistics."""

import numpy as np
import pytest
import scipy.linalg

from eval.frechet import FeatureStats, frechet_distance, stats_distance


def reference_distance(a: np.ndarray, b: np.ndarray) -> float:
    """StyleGAN-V's computation: np.cov statistics, scipy.linalg.sqrtm of the product."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    return float(np.real(np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b - 2 * root)))


def stats_of(features: np.ndarray, chunks: int = 1) -> FeatureStats:
    stats = FeatureStats(features.shape[1])
    for part in np.array_split(features, chunks):
        stats.update(part)
    return stats


@pytest.mark.parametrize("samples, dim", [(600, 64), (200, 400)])
def test_matches_the_float64_scipy_reference(samples, dim):
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    real = rng.normal(size=(samples, dim)) @ mixing
    generated = rng.normal(0.3, 1.2, size=(samples, dim)) @ mixing + rng.normal(size=dim)
    expected = reference_distance(real, generated)
    assert stats_distance(stats_of(real), stats_of(generated)) == pytest.approx(expected, rel=1e-6)


def test_a_set_against_itself_is_zero_and_the_distance_is_symmetric():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(300, 400))  # fewer samples than dimensions: a singular covariance
    stats = stats_of(features)
    assert abs(stats_distance(stats, stats)) < 1e-6 * np.trace(stats.covariance)
    other = stats_of(rng.normal(size=(300, 400)) + 0.5)
    assert stats_distance(stats, other) == pytest.approx(stats_distance(other, stats), rel=1e-9)


def test_gaussians_with_known_distance():
    # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 3.0 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_statistics_merge_across_workers_and_round_trip(tmp_path):
    features = np.random.default_rng(2).normal(size=(101, 16))
    merged = stats_of(features[:40]).merge(stats_of(features[40:], chunks=3))
    assert merged.count == 101
    np.testing.assert_allclose(merged.mean, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(merged.covariance, np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)
    merged.save(tmp_path / "stats.npz")
    loaded = FeatureStats.load(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded.outer, merged.outer)


def test_bad_features_are_rejected():
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match=r"expected \(n, 4\)"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN or inf"):
        stats.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        stats_of(np.zeros((1, 4))).covariance


def stylegan_v_fvd(real: np.ndarray, generated: np.ndarray) -> float:
    """StyleGAN-V's FVD, written here from its definitions: `FeatureStats.get_mean_cov` (float64
    mean, raw second moment divided by n minus the mean's outer product) and `compute_fvd`
    (scipy.linalg.sqrtm of sigma_gen @ sigma_real, real part of the total)."""
    def mean_cov(features):
        features = features.astype(np.float64)
        mean = features.sum(axis=0) / len(features)
        return mean, features.T @ features / len(features) - np.outer(mean, mean)
    mu_real, sigma_real = mean_cov(real)
    mu_gen, sigma_gen = mean_cov(generated)
    root = scipy.linalg.sqrtm(np.dot(sigma_gen, sigma_real))
    return float(np.real(np.square(mu_gen - mu_real).sum() + np.trace(sigma_gen + sigma_real - root * 2)))


@pytest.mark.parametrize("samples", [2048, 300])
def test_parity_with_stylegan_v_fvd_on_i3d_sized_features(samples):
    rng = np.random.default_rng(samples)
    mixing = rng.normal(size=(400, 400)) / 20
    real = rng.normal(size=(samples, 400)) @ mixing
    generated = rng.normal(0.1, 1.1, size=(samples, 400)) @ mixing + rng.normal(scale=0.2, size=400)
    expected = stylegan_v_fvd(real, generated)
    assert stats_distance(stats_of(real, chunks=7), stats_of(generated), ddof=0) == pytest.approx(expected, rel=1e-6)
    # Dividing by n - 1 instead moves the number by about the ratio of the divisors
    unbiased = stats_distance(stats_of(real), stats_of(generated), ddof=1)
    assert unbiased != pytest.approx(expected, rel=1e-6) and unbiased == pytest.approx(expected, rel=3 / samples)
