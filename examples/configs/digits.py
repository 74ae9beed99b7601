"""scikit-learn's 8x8 digits for `mnist_dp.yaml` (`data.source: function`).

`load()` returns the samples as a dict of arrays, `{"x": float32 (N, 8, 8), "y":
int32 (N,)}` (standardized); the config's `titanax.data.Pipeline` shuffles them by
`data.seed` each epoch, batches them and gives each process its rows.
"""

import numpy as np


def load() -> dict[str, np.ndarray]:
    """The 1,797 digits: images standardized to mean 0 and variance 1, labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)  # (N, 8, 8)
    x = (x - x.mean()) / x.std()
    return {"x": x, "y": digits.target.astype(np.int32)}
