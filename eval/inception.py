"""Inception Score (Salimans et al. 2016) over class probabilities; on video, of the UCF-101 C3D.

    IS = exp(E_x KL(p(y|x) || p(y)))

computed on `splits` equal parts and reported as mean and standard deviation over the parts.
StyleGAN-V's video IS shuffles the probabilities with a fixed seed (numpy RandomState(42)) before
splitting, so parts do not follow generation order; so do we.
"""

from __future__ import annotations

import numpy as np

SHUFFLE_SEED = 42
EPSILON = 1e-12  # log(0) guard: a zero probability contributes 0 * log(eps) = 0


def inception_score(probabilities: np.ndarray, splits: int = 10, shuffle_seed: int | None = SHUFFLE_SEED) -> tuple[float, float]:
    """probabilities: (n, classes), rows summing to 1. Returns (mean, std) over the splits."""
    probs = np.array(probabilities, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probabilities of shape {probs.shape}: expected (n, classes)")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3) or (probs < 0).any():
        raise ValueError("inception score: rows are not probability distributions (the classifier must end in a softmax)")
    if not 1 <= splits <= len(probs):
        raise ValueError(f"inception score: {splits} splits of {len(probs)} samples; need 1 <= splits <= samples")
    if shuffle_seed is not None:
        np.random.RandomState(shuffle_seed).shuffle(probs)
    n = len(probs)
    scores = []
    for k in range(splits):
        part = probs[k * n // splits : (k + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + EPSILON) - np.log(marginal + EPSILON))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
