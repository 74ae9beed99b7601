"""Digit datasets for the MNIST example: MNIST IDX files or scikit-learn's digits.

Reading needs only numpy (and, for the fallback, scikit-learn); nothing is downloaded.

- `load_mnist(path)` reads the original gzipped IDX files. With the 60,000-image
  training files present (`train-*-ubyte.gz`), it uses MNIST's own train/test split.
  With only the 10,000-image test files (`t10k-*-ubyte.gz`, as in `../shared/data/
  mnist`), it splits those: the first 8,000 images train, the last 2,000 test.
- `load_sklearn_digits()` loads scikit-learn's bundled 8x8 digits (1,797 images) and
  splits them 80/20, stratified by label, with a fixed seed: 1,437 train, 360 test.

Both return `Split`s of float32 images `(N, H, W)`, standardized with the training
set's mean and standard deviation, and int32 labels `(N,)`. `pipeline(split, ...)`
turns a split into a `titanax.data.Pipeline` (shuffled per epoch for training, in
order for evaluation).
"""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np

import titanax as tx

# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_TRAIN = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
MNIST_TEST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# When only the MNIST test set is present, its first this many images train.
MNIST_TEST_ONLY_TRAIN = 8000


@dataclasses.dataclass(frozen=True)
class Split:
    """Images `(N, H, W)` float32 and labels `(N,)` int32."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in `.gz`) into a numpy array.

    The format: two zero bytes, a type code, the number of dims `d`, then `d`
    big-endian uint32 sizes, then the data, big-endian, row-major.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic {raw[:4].hex()}).")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{path}: header says shape {shape} ({count * dtype.itemsize} bytes of "
            f"data), but the file holds {len(raw) - offset}."
        )
    data = np.frombuffer(raw, dtype, count=count, offset=offset)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def read_mnist_pair(root: str | Path, names: tuple[str, str]) -> Split:
    """Raw MNIST images `(N, 28, 28)` uint8 and labels `(N,)` uint8."""
    root = Path(root)
    images, labels = read_idx(root / names[0]), read_idx(root / names[1])
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{root}: images {images.shape} and labels {labels.shape} do not match."
        )
    return Split(images, labels)


def _standardize(train: Split, test: Split) -> tuple[Split, Split]:
    x_train = train.x.astype(np.float32)
    mean, std = x_train.mean(), x_train.std()

    def norm(s: Split, x: np.ndarray) -> Split:
        return Split(((x - mean) / std).astype(np.float32), s.y.astype(np.int32))

    return norm(train, x_train), norm(test, test.x.astype(np.float32))


def load_mnist(root: str | Path) -> tuple[Split, Split]:
    """MNIST from the IDX gzip files in `root`: `(train, test)`.

    Uses MNIST's train/test files when both are present; with only the test files,
    their first 8,000 images train and the last 2,000 test.
    """
    root = Path(root)
    if not all((root / name).exists() for name in MNIST_TEST):
        raise FileNotFoundError(
            f"{root} does not hold the MNIST files {', '.join(MNIST_TEST)}."
        )
    test = read_mnist_pair(root, MNIST_TEST)
    if all((root / name).exists() for name in MNIST_TRAIN):
        train = read_mnist_pair(root, MNIST_TRAIN)
    else:
        n = MNIST_TEST_ONLY_TRAIN
        train = Split(test.x[:n], test.y[:n])
        test = Split(test.x[n:], test.y[n:])
    return _standardize(train, test)


def load_sklearn_digits(seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's 8x8 digits, split 80/20 stratified: `(train, test)`."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError(
            "Without `--data`, this example uses scikit-learn's digits: "
            "`pip install 'titanax[examples]'` (or pass `--data path/to/mnist`)."
        ) from e
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images,
        digits.target,
        test_size=0.2,
        random_state=seed,
        stratify=digits.target,
    )
    return _standardize(Split(x_train, y_train), Split(x_test, y_test))


def pipeline(
    split: Split, batch: int, *, seed: int = 0, train: bool = True
) -> tx.data.Pipeline:
    """A `titanax.data.Pipeline` of `{"x": (batch, H, W), "y": (batch,)}` batches.

    Training (`train=True`): every epoch shuffled by `(seed, epoch)`, endless; the
    trainer reads its own position of the stream (a resumed run continues at the
    same sample). Evaluation: the split in order, one pass; a last partial batch is
    dropped (`trainer.evaluate` needs the training batch shape and weights batches
    by rows).
    """
    source = {"x": split.x, "y": split.y}
    if train:
        return tx.data.Pipeline(source, batch, seed=seed)
    return tx.data.Pipeline(source, batch, shuffle=False, epochs=1)
