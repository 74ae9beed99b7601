"""Batches of scikit-learn's 8x8 digits for `mnist_dp.yaml` (`data.source:
function`): `batches(batch_size=..., seed=...)` yields global batches forever,
reshuffled every epoch, `{"x": float32 (B, 8, 8), "y": int32 (B,)}`, standardized.
"""

from collections.abc import Iterator

import numpy as np


def batches(*, batch_size: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Global batches of the 1,797 digits, in a seeded order, forever."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)  # (N, 8, 8)
    x = (x - x.mean()) / x.std()
    y = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(y))
        for start in range(0, len(y) - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield {"x": x[rows], "y": y[rows]}
