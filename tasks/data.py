"""Datasets as tensors on the target device, sampled by index.

Built in and offline: MNIST-1D (generated with the ``mnist1d`` package),
scikit-learn's 8x8 digits, a teacher-student regression and a Gaussian
mixture. From a user's files: FashionMNIST (IDX files) and CIFAR-10 (the
python pickle batches), read by our own readers; torchvision is used only to
download them, and only when asked.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


def require(module: str, package: str):
    """Import ``module``, or say which install brings it: the task data come
    with the ``meta`` extra, not with the optimizer alone."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"this dataset needs {package}, which the base install leaves out: "
            "pip install 'lopt[meta]'"
        ) from None


def cache_dir() -> Path:
    """Where generated data is cached: ``$LOPT_CACHE`` or ``~/.cache/lopt``."""
    root = os.environ.get("LOPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lopt"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Dataset:
    """Train and held-out tensors. ``y`` holds class indices (classification)
    or targets (regression, ``n_classes == 0``)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def output_size(self) -> int:
        return self.n_classes if self.n_classes else self.y_train.shape[1]

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: torch.device | str) -> Dataset:
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )

    def sample(
        self, generator: torch.Generator, batch_size: int, split: str = "train"
    ) -> tuple[Tensor, Tensor]:
        """A batch drawn uniformly with replacement; deterministic in ``generator``."""
        x, y = self.split(split)
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        idx = idx.to(x.device)
        return x[idx], y[idx]

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _split(name, x, y, n_classes, test_fraction, seed) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = int(round(x.shape[0] * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset(name, x[tr], y[tr], x[te], y[te], n_classes)


# ------------------------------------------------------------------ built in
def mnist1d(num_samples: int = 5000, seed: int = 42, conv: bool = False) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated locally and cached. 5,000 samples
    (4,000 train) is the standard size; pass more for a larger set. Inputs are
    40-long sequences, shaped ``(1, 40)`` with ``conv=True``."""
    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10, got {num_samples}")
    path = cache_dir() / f"mnist1d-{num_samples}-{seed}.pt"
    if path.exists():
        d = torch.load(path, weights_only=True)
    else:
        mnist1d_data = require("mnist1d.data", "mnist1d")
        get_dataset_args, make_dataset = mnist1d_data.get_dataset_args, mnist1d_data.make_dataset
        args = get_dataset_args()
        args.num_samples, args.seed = num_samples, seed
        state = np.random.get_state()  # make_dataset seeds the global RNGs
        try:
            raw = make_dataset(args)
        finally:
            np.random.set_state(state)
        d = {
            "x": torch.tensor(raw["x"], dtype=torch.float32),
            "y": torch.tensor(raw["y"], dtype=torch.long),
            "x_test": torch.tensor(raw["x_test"], dtype=torch.float32),
            "y_test": torch.tensor(raw["y_test"], dtype=torch.long),
        }
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(d, tmp)
        os.replace(tmp, path)
    x, xt = d["x"], d["x_test"]
    if conv:
        x, xt = x[:, None], xt[:, None]
    return Dataset("mnist1d", x, d["y"], xt, d["y_test"], 10)


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images) as ``(1, 8, 8)`` in [0, 1]; 20% held out."""
    raw = require("sklearn.datasets", "scikit-learn").load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(raw.target, dtype=torch.long)
    return _split("digits", x, y, 10, 0.2, seed)


def _standardised(t: Tensor) -> Tensor:
    """Each column of a table at mean 0 and standard deviation 1."""
    return (t - t.mean(0)) / t.std(0)


def diabetes(seed: int = 0) -> Dataset:
    """scikit-learn's diabetes regression (442 patients, 10 features, one
    target), inputs and target standardised; 20% held out."""
    raw = require("sklearn.datasets", "scikit-learn").load_diabetes()
    x = torch.tensor(raw.data, dtype=torch.float32)
    y = torch.tensor(raw.target, dtype=torch.float32)[:, None]
    x, y = _standardised(x), _standardised(y)
    return _split("diabetes", x, y, 0, 0.2, seed)


def wine_alcohol(seed: int = 0) -> Dataset:
    """scikit-learn's wine data (178 wines) as a regression: the alcohol
    content from the 12 other measurements, inputs and target standardised;
    20% held out."""
    raw = require("sklearn.datasets", "scikit-learn").load_wine()
    table = torch.tensor(raw.data, dtype=torch.float32)
    col = raw.feature_names.index("alcohol")
    x = torch.cat([table[:, :col], table[:, col + 1 :]], 1)
    y = table[:, col : col + 1]
    x, y = _standardised(x), _standardised(y)
    return _split("wine-alcohol", x, y, 0, 0.2, seed)


def teacher_student(
    n: int = 4096, dim: int = 16, hidden: int = 32, out: int = 4, noise: float = 0.05, seed: int = 0
) -> Dataset:
    """Regression onto a random tanh MLP teacher, plus Gaussian noise."""
    for arg, v in (("n", n), ("dim", dim), ("hidden", hidden), ("out", out)):
        if v < 1:
            raise ValueError(f"{arg} must be >= 1, got {v}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, hidden, generator=g) / dim**0.5
    w2 = torch.randn(hidden, out, generator=g) / hidden**0.5
    y = torch.tanh(x @ w1) @ w2
    y = y + noise * torch.randn(y.shape, generator=g)
    return _split("teacher", x, y, 0, 0.2, seed)


def gaussian_mixture(
    n: int = 4096, dim: int = 8, classes: int = 4, spread: float = 1.0, seed: int = 0
) -> Dataset:
    """Classes drawn from Gaussians around random means."""
    if classes < 2:
        raise ValueError(f"classes must be >= 2, got {classes}")
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = means[y] + spread * torch.randn(n, dim, generator=g)
    return _split("gmm", x, y, classes, 0.2, seed)


# ---------------------------------------------------------------------- text
TEXT_VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
"""Characters of the text datasets: newline and printable ASCII (96 tokens);
any other character is read as a space."""


def _text_source(source: str) -> str:
    """Text that every Python installation carries, so it is built offline:
    ``"docs"``, the English reference topics behind ``help()``
    (``pydoc_data.topics``, about 0.46M characters); ``"code"``, the source
    of a fixed list of standard-library modules (about 0.5M characters)."""
    if source == "docs":
        from pydoc_data import topics

        return "\n".join(topics.topics[k] for k in sorted(topics.topics))
    if source == "code":
        import importlib
        import inspect

        names = (
            "argparse",
            "collections",
            "dataclasses",
            "difflib",
            "email.message",
            "fractions",
            "inspect",
            "json.decoder",
            "pathlib",
            "textwrap",
            "typing",
        )
        return "\n".join(inspect.getsource(importlib.import_module(n)) for n in names)
    raise ValueError(f"text source must be 'docs' or 'code', got {source!r}")


def text(source: str = "docs", context: int = 32, test_fraction: float = 0.1) -> Dataset:
    """Character-level language modelling on offline text (:func:`_text_source`):
    inputs are windows of ``context`` tokens of :data:`TEXT_VOCAB`, targets the
    same windows one character on (``(N, context)`` longs each). Windows do
    not overlap; the last ``test_fraction`` of the text is held out."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    raw = _text_source(source)
    index = {c: i for i, c in enumerate(TEXT_VOCAB)}
    space = index[" "]
    ids = torch.tensor([index.get(c, space) for c in raw], dtype=torch.long)
    cut = int(len(ids) * (1 - test_fraction))

    def windows(part: Tensor) -> tuple[Tensor, Tensor]:
        n = (len(part) - 1) // context
        x = part[: n * context].reshape(n, context)
        y = part[1 : n * context + 1].reshape(n, context)
        return x, y

    (x, y), (xt, yt) = windows(ids[:cut]), windows(ids[cut:])
    return Dataset(f"text-{source}", x, y, xt, yt, len(TEXT_VOCAB))


def reconstruction(d: Dataset) -> Dataset:
    """``d``'s inputs, flattened, as their own regression targets (autoencoders)."""
    x, xt = d.x_train.flatten(1), d.x_test.flatten(1)
    return Dataset(f"{d.name}-recon", d.x_train, x, d.x_test, xt, 0)


# -------------------------------------------------------------- user files
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST / FashionMNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: IDX type {dtype_code:#x}, expected unsigned bytes (0x08)")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} values for shape {dims} (truncated?)")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (
        root / stem,
        root / f"{stem}.gz",
        root / "raw" / stem,
        root / "raw" / f"{stem}.gz",
    ):
        if candidate.exists():
            return candidate
    return None


def _missing(name: str, looked: list[Path], how: str) -> FileNotFoundError:
    where = "\n  ".join(str(p) for p in looked)
    return FileNotFoundError(f"{name} files not found; looked for:\n  {where}\n{how}")


def downsample(x: Tensor, size: int | None) -> Tensor:
    """Average-pool images ``(N, C, H, W)`` to ``size x size`` (None: unchanged)."""
    if size is None or x.shape[-1] == size:
        return x
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return F.adaptive_avg_pool2d(x, size)


def fashion_mnist(
    root: str | os.PathLike, size: int | None = None, download: bool = False
) -> Dataset:
    """FashionMNIST from IDX files under ``root`` (or ``root/FashionMNIST/raw``,
    torchvision's layout), as ``(1, 28, 28)`` in [0, 1], optionally downsampled
    to ``size``. ``download=True`` fetches them with torchvision first."""
    root = Path(root)
    if download:
        _torchvision_download("FashionMNIST", root)
    for base in (root, root / "FashionMNIST"):
        found = {s: [_find(base, f) for f in FASHION_FILES[s]] for s in FASHION_FILES}
        if all(p is not None for ps in found.values() for p in ps):
            break
    else:
        looked = [root / f for s in FASHION_FILES for f in FASHION_FILES[s]]
        raise _missing(
            "FashionMNIST",
            looked,
            "Place the four IDX files (optionally .gz) there, or pass download=True "
            "with torchvision installed (pip install 'lopt[vision]').",
        )
    arrays = {s: [read_idx(p) for p in found[s]] for s in found}
    x = torch.tensor(arrays["train"][0], dtype=torch.float32)[:, None] / 255.0
    xt = torch.tensor(arrays["test"][0], dtype=torch.float32)[:, None] / 255.0
    y = torch.tensor(arrays["train"][1], dtype=torch.long)
    yt = torch.tensor(arrays["test"][1], dtype=torch.long)
    return Dataset("fashion_mnist", downsample(x, size), y, downsample(xt, size), yt, 10)


CIFAR_DIR = "cifar-10-batches-py"


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            d = pickle.load(f, encoding="bytes")
        except Exception as e:
            raise ValueError(f"{path}: not a CIFAR-10 batch file ({e})") from e
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR-10 batch without 'data' / 'labels'")
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels)


def cifar10(root: str | os.PathLike, size: int | None = None, download: bool = False) -> Dataset:
    """CIFAR-10 from the python batches (``root/cifar-10-batches-py``), as
    ``(3, 32, 32)`` in [0, 1], optionally downsampled to ``size`` (8, 16)."""
    root = Path(root)
    if download:
        _torchvision_download("CIFAR10", root)
    base = root / CIFAR_DIR if (root / CIFAR_DIR).exists() else root
    train = [base / f"data_batch_{i}" for i in range(1, 6)]
    test = [base / "test_batch"]
    missing = [p for p in train + test if not p.exists()]
    if missing:
        raise _missing(
            "CIFAR-10",
            missing,
            "Extract cifar-10-python.tar.gz there, or pass download=True with "
            "torchvision installed (pip install 'lopt[vision]').",
        )
    tr = [_read_cifar_batch(p) for p in train]
    te = _read_cifar_batch(test[0])
    x = torch.tensor(np.concatenate([a for a, _ in tr]), dtype=torch.float32) / 255.0
    y = torch.tensor(np.concatenate([b for _, b in tr]), dtype=torch.long)
    xt = torch.tensor(te[0], dtype=torch.float32) / 255.0
    yt = torch.tensor(te[1], dtype=torch.long)
    return Dataset("cifar10", downsample(x, size), y, downsample(xt, size), yt, 10)


def _torchvision_download(name: str, root: Path) -> None:
    try:
        import torchvision
    except Exception as e:
        raise RuntimeError(
            f"download=True needs torchvision (pip install 'lopt[vision]'): {e}"
        ) from e
    cls = getattr(torchvision.datasets, name)
    for train in (True, False):
        cls(str(root), train=train, download=True)
