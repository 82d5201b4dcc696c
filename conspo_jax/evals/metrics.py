"""Sampling metrics: the unbiased pass@k estimator and avg@k.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): with n samples of which
c are correct, the probability that a random size-k subset holds a correct one is
1 - C(n-c, k) / C(n, k), computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms
the (huge) binomials. avg@k is the mean correctness over k samples, i.e. pass@1 estimated from k.
"""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples, ``c`` of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct_PxN: np.ndarray, k: int) -> float:
    """pass@k averaged over problems, from a boolean matrix (problems x samples per problem)."""
    correct_PxN = np.asarray(correct_PxN, bool)
    if correct_PxN.ndim != 2 or correct_PxN.shape[0] == 0:
        raise ValueError(f"mean_pass_at_k: need a non-empty (problems, samples) matrix, got {correct_PxN.shape}")
    n = correct_PxN.shape[1]
    return float(np.mean([pass_at_k(n, int(c), k) for c in correct_PxN.sum(axis=1)]))


def avg_at_k(correct_PxN: np.ndarray) -> float:
    """Mean correctness over all samples of all problems (avg@k; pass@1 when there is one sample)."""
    correct_PxN = np.asarray(correct_PxN, bool)
    if correct_PxN.size == 0:
        raise ValueError("avg_at_k: no samples")
    return float(correct_PxN.mean())


def report_ks(n: int) -> list[int]:
    """The k values worth reporting for n samples: powers of two up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ks + ([n] if n not in ks else [])
