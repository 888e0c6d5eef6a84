"""Sampled task families, and the registry of named tasks, families and suites.

Names are what users type on the command line: ``mlp-mnist1d``,
``cnn-digits``, ``mlp-family-small``, ``heldout``. ``python -m tasks list``
prints them all.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from tasks import data
from tasks.base import FixedFamily, Task, TaskFamily
from tasks.models import ACTIVATIONS, ResNet, TransformerLM, autoencoder, cnn, mlp

# ------------------------------------------------------------------ datasets
DATA_ROOT_ENV = "LOPT_DATA"


def data_root() -> str:
    """Where FashionMNIST / CIFAR-10 files are looked for: ``$LOPT_DATA`` or ``~/data``."""
    return os.environ.get(DATA_ROOT_ENV, os.path.expanduser("~/data"))


DATASETS: dict[str, Callable[[], data.Dataset]] = {
    "mnist1d": lambda: data.mnist1d(),
    "mnist1d-large": lambda: data.mnist1d(num_samples=20000),
    "mnist1d-conv": lambda: data.mnist1d(conv=True),
    "digits": data.digits,
    "teacher": data.teacher_student,
    "gmm": data.gaussian_mixture,
    "gmm-hard": lambda: data.gaussian_mixture(dim=16, classes=8, spread=1.5, seed=1),
    # Classification at other input widths, for families (gmm-hard stays held out).
    "gmm-16": lambda: data.gaussian_mixture(dim=16, classes=8, spread=1.0, seed=2),
    "gmm-32": lambda: data.gaussian_mixture(dim=32, classes=10, spread=2.0, seed=3),
    "fashion_mnist": lambda: data.fashion_mnist(os.path.join(data_root(), "fashion_mnist")),
    "fashion_mnist-8": lambda: data.fashion_mnist(os.path.join(data_root(), "fashion_mnist"), 8),
    "fashion_mnist-16": lambda: data.fashion_mnist(os.path.join(data_root(), "fashion_mnist"), 16),
    "cifar10": lambda: data.cifar10(os.path.join(data_root(), "cifar10")),
    "cifar10-8": lambda: data.cifar10(os.path.join(data_root(), "cifar10"), 8),
    "cifar10-16": lambda: data.cifar10(os.path.join(data_root(), "cifar10"), 16),
    # Character-level text built from what every Python installation carries.
    "text-docs": lambda: data.text("docs"),
    "text-code": lambda: data.text("code"),
    # Inputs as their own targets, for autoencoders.
    "digits-recon": lambda: data.reconstruction(data.digits()),
    "mnist1d-recon": lambda: data.reconstruction(data.mnist1d()),
    # A tabular regression: scikit-learn's diabetes data, standardised.
    "diabetes": data.diabetes,
    # Another: the alcohol content of scikit-learn's wines from their other measurements.
    "wine-alcohol": data.wine_alcohol,
}
CONV_DATASETS = {"mnist1d": "mnist1d-conv"}  # the CNN view of a dataset


@functools.cache
def _dataset_cpu(name: str) -> data.Dataset:
    return DATASETS[name]()


def get_dataset(name: str, device: torch.device | str = "cpu") -> data.Dataset:
    """A named dataset, built once per process and moved to ``device``."""
    if name not in DATASETS:
        raise KeyError(_unknown("dataset", name, DATASETS))
    d = _dataset_cpu(name)
    return d if torch.device(device) == d.device else d.to(device)


# ------------------------------------------------------------------ families
def _range(arg: str, r: Sequence[float], minimum: float) -> tuple:
    if len(r) != 2 or r[0] > r[1]:
        raise ValueError(f"{arg} must be a (low, high) pair with low <= high, got {tuple(r)}")
    if r[0] < minimum:
        raise ValueError(f"{arg} must be >= {minimum}, got {tuple(r)}")
    return tuple(r)


def _check_common(family) -> None:
    """Checks shared by the sampled families."""
    _range("batch_size", family.batch_size, 1)
    _range("init_scale", family.init_scale, 1e-6)
    if not family.datasets or not family.activations:
        raise ValueError("datasets and activations must not be empty")
    for a in family.activations:
        if a not in ACTIVATIONS:
            raise ValueError(f"activations: unknown {a!r} (known: {sorted(ACTIVATIONS)})")
    for d in family.datasets:
        if d not in DATASETS:
            raise ValueError(f"datasets: {_unknown('dataset', d, DATASETS)}")


def _choice(g: torch.Generator, items: Sequence):
    return items[int(torch.randint(0, len(items), (1,), generator=g))]


def _int_in(g: torch.Generator, lo: int, hi: int, log: bool = False) -> int:
    if log:
        u = torch.rand((), generator=g).item()
        return int(round(lo * (hi / lo) ** u))
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _float_in(g: torch.Generator, lo: float, hi: float) -> float:
    return lo * (hi / lo) ** torch.rand((), generator=g).item()


@dataclass
class MLPFamily(TaskFamily):
    """MLPs with depth (hidden layers), width, activation, batch size, dataset
    and initialisation scale sampled per task (widths log-uniform)."""

    name: str = "mlp-family"
    datasets: Sequence[str] = ("mnist1d",)
    depth: tuple[int, int] = (1, 3)
    width: tuple[int, int] = (16, 64)
    activations: Sequence[str] = ("relu", "tanh")
    batch_size: tuple[int, int] = (32, 128)
    init_scale: tuple[float, float] = (1.0, 1.0)
    device: str = "cpu"

    def __post_init__(self) -> None:
        _range("depth", self.depth, 0)
        _range("width", self.width, 1)
        _check_common(self)

    def sample(self, generator: torch.Generator) -> Task:
        ds = get_dataset(_choice(generator, list(self.datasets)), self.device)
        depth = _int_in(generator, *self.depth)
        widths = [_int_in(generator, *self.width, log=True) for _ in range(depth)]
        act = _choice(generator, list(self.activations))
        batch = _int_in(generator, *self.batch_size, log=True)
        scale = _float_in(generator, *self.init_scale)
        in_features = int(torch.tensor(ds.input_shape).prod())
        model = mlp(in_features, widths, ds.output_size, act)
        name = f"mlp-{ds.name}-{'x'.join(map(str, widths)) or 'linear'}-{act}"
        return Task(name, model, ds, batch, scale)


@dataclass
class CNNFamily(TaskFamily):
    """CNNs (Conv1d for sequences, Conv2d for images) with the number of conv
    layers, channels, kernel size, activation, batch size and dataset sampled."""

    name: str = "cnn-family"
    datasets: Sequence[str] = ("digits",)
    depth: tuple[int, int] = (1, 3)
    channels: tuple[int, int] = (4, 16)
    kernels: Sequence[int] = (3, 5)
    activations: Sequence[str] = ("relu", "tanh")
    batch_size: tuple[int, int] = (32, 128)
    init_scale: tuple[float, float] = (1.0, 1.0)
    device: str = "cpu"

    def __post_init__(self) -> None:
        _range("depth", self.depth, 1)
        _range("channels", self.channels, 1)
        if not self.kernels or min(self.kernels) < 1:
            raise ValueError(f"kernels must be >= 1, got {tuple(self.kernels)}")
        _check_common(self)

    def sample(self, generator: torch.Generator) -> Task:
        ds_name = _choice(generator, list(self.datasets))
        ds = get_dataset(CONV_DATASETS.get(ds_name, ds_name), self.device)
        depth = _int_in(generator, *self.depth)
        chans = [_int_in(generator, *self.channels, log=True) for _ in range(depth)]
        kernel = _choice(generator, list(self.kernels))
        act = _choice(generator, list(self.activations))
        batch = _int_in(generator, *self.batch_size, log=True)
        scale = _float_in(generator, *self.init_scale)
        model = cnn(ds.input_shape, chans, [kernel] * depth, ds.output_size, activation=act)
        name = f"cnn-{ds.name}-{'x'.join(map(str, chans))}-k{kernel}-{act}"
        return Task(name, model, ds, batch, scale)


@dataclass
class ResNetFamily(TaskFamily):
    """Residual CNNs with BatchNorm (:class:`~tasks.models.ResNet`): width,
    number of residual blocks, activation, batch size and dataset sampled."""

    name: str = "resnet-family"
    datasets: Sequence[str] = ("digits",)
    width: tuple[int, int] = (8, 32)
    blocks: tuple[int, int] = (1, 2)
    activations: Sequence[str] = ("relu", "gelu")
    batch_size: tuple[int, int] = (32, 64)
    init_scale: tuple[float, float] = (1.0, 1.0)
    device: str = "cpu"

    def __post_init__(self) -> None:
        _range("width", self.width, 1)
        _range("blocks", self.blocks, 1)
        _check_common(self)

    def sample(self, generator: torch.Generator) -> Task:
        ds_name = _choice(generator, list(self.datasets))
        ds = get_dataset(CONV_DATASETS.get(ds_name, ds_name), self.device)
        width = _int_in(generator, *self.width, log=True)
        blocks = _int_in(generator, *self.blocks)
        act = _choice(generator, list(self.activations))
        batch = _int_in(generator, *self.batch_size, log=True)
        scale = _float_in(generator, *self.init_scale)
        model = ResNet(ds.input_shape, width, blocks, ds.output_size, activation=act)
        name = f"resnet-{ds.name}-{width}x{blocks}-{act}"
        return Task(name, model, ds, batch, scale)


@dataclass
class TransformerFamily(TaskFamily):
    """Small causal transformer language models (:class:`~tasks.models.TransformerLM`)
    on character-level text: width (``d_model``, a multiple of the heads),
    heads, layers, batch size and dataset sampled; the context is the
    dataset's."""

    name: str = "transformer-family"
    datasets: Sequence[str] = ("text-docs",)
    width: tuple[int, int] = (16, 64)
    heads: Sequence[int] = (1, 2, 4)
    layers: tuple[int, int] = (1, 2)
    batch_size: tuple[int, int] = (8, 32)
    init_scale: tuple[float, float] = (1.0, 1.0)
    device: str = "cpu"

    def __post_init__(self) -> None:
        _range("width", self.width, 1)
        _range("layers", self.layers, 1)
        _range("batch_size", self.batch_size, 1)
        _range("init_scale", self.init_scale, 1e-6)
        if not self.heads or min(self.heads) < 1:
            raise ValueError(f"heads must be >= 1, got {tuple(self.heads)}")
        for d in self.datasets:
            if d not in DATASETS:
                raise ValueError(f"datasets: {_unknown('dataset', d, DATASETS)}")

    def sample(self, generator: torch.Generator) -> Task:
        ds = get_dataset(_choice(generator, list(self.datasets)), self.device)
        heads = _choice(generator, list(self.heads))
        width = _int_in(generator, *self.width, log=True)
        width = max(heads, width // heads * heads)
        layers = _int_in(generator, *self.layers)
        batch = _int_in(generator, *self.batch_size, log=True)
        scale = _float_in(generator, *self.init_scale)
        context = ds.input_shape[0]
        model = TransformerLM(ds.n_classes, context, width, heads, layers)
        name = f"lm-{ds.name}-d{width}h{heads}l{layers}"
        return Task(name, model, ds, batch, scale)


@dataclass
class AutoencoderFamily(TaskFamily):
    """MLP autoencoders trained with mean squared error on their input:
    hidden width, bottleneck, activation, batch size and dataset sampled."""

    name: str = "autoencoder-family"
    datasets: Sequence[str] = ("digits-recon",)
    width: tuple[int, int] = (16, 128)
    bottleneck: tuple[int, int] = (4, 16)
    activations: Sequence[str] = ("relu", "tanh", "gelu")
    batch_size: tuple[int, int] = (32, 128)
    init_scale: tuple[float, float] = (1.0, 1.0)
    device: str = "cpu"

    def __post_init__(self) -> None:
        _range("width", self.width, 1)
        _range("bottleneck", self.bottleneck, 1)
        _check_common(self)

    def sample(self, generator: torch.Generator) -> Task:
        ds = get_dataset(_choice(generator, list(self.datasets)), self.device)
        width = _int_in(generator, *self.width, log=True)
        neck = _int_in(generator, *self.bottleneck, log=True)
        act = _choice(generator, list(self.activations))
        batch = _int_in(generator, *self.batch_size, log=True)
        scale = _float_in(generator, *self.init_scale)
        model = autoencoder(_flat(ds), [width, neck, width], act)
        name = f"ae-{ds.name}-{width}x{neck}-{act}"
        return Task(name, model, ds, batch, scale)


class MixtureFamily(TaskFamily):
    """Sample a family with the given weights, then a task from it."""

    def __init__(
        self,
        families: Sequence[TaskFamily],
        weights: Sequence[float] | None = None,
        name: str = "mixture",
    ) -> None:
        if not families:
            raise ValueError("families must not be empty")
        weights = list(weights) if weights is not None else [1.0] * len(families)
        if len(weights) != len(families) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be {len(families)} non-negative numbers, not all 0")
        self.families = list(families)
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.name = name

    def sample(self, generator: torch.Generator) -> Task:
        i = int(torch.multinomial(self.weights, 1, generator=generator))
        return self.families[i].sample(generator)


# ------------------------------------------------------------------ registry
def _task(name, model_fn, dataset, batch=128) -> Callable[[], Task]:
    def make(device="cpu"):
        ds = get_dataset(dataset, device)
        return Task(name, model_fn(ds), ds, batch)

    return make


def _flat(ds) -> int:
    return int(torch.tensor(ds.input_shape).prod())


TASKS: dict[str, Callable[..., Task]] = {
    "mlp-mnist1d": _task("mlp-mnist1d", lambda d: mlp(40, [32, 32], 10), "mnist1d"),
    "cnn-mnist1d": _task(
        "cnn-mnist1d", lambda d: cnn((1, 40), [16, 16], [5, 5], 10), "mnist1d-conv"
    ),
    "mlp-digits": _task("mlp-digits", lambda d: mlp(64, [32], 10), "digits"),
    "cnn-digits": _task("cnn-digits", lambda d: cnn((1, 8, 8), [8, 16], [3, 3], 10), "digits"),
    "mlp-teacher": _task("mlp-teacher", lambda d: mlp(16, [32], 4, "tanh"), "teacher"),
    "mlp-gmm": _task("mlp-gmm", lambda d: mlp(8, [16], 4), "gmm", 64),
    # Held out from meta-training: wider, deeper, other data.
    "mlp-mnist1d-wide": _task("mlp-mnist1d-wide", lambda d: mlp(40, [256, 256], 10), "mnist1d"),
    "mlp-mnist1d-deep": _task("mlp-mnist1d-deep", lambda d: mlp(40, [48] * 5, 10), "mnist1d"),
    "mlp-digits-wide": _task("mlp-digits-wide", lambda d: mlp(64, [256], 10, "tanh"), "digits"),
    "cnn-digits-wide": _task(
        "cnn-digits-wide", lambda d: cnn((1, 8, 8), [32, 32, 32], [3] * 3, 10), "digits"
    ),
    "mlp-gmm-hard": _task("mlp-gmm-hard", lambda d: mlp(16, [128, 128], 8, "gelu"), "gmm-hard"),
    "cnn-mnist1d-deep": _task(
        "cnn-mnist1d-deep", lambda d: cnn((1, 40), [32] * 4, [3] * 4, 10), "mnist1d-conv"
    ),
    # 4x wider and one layer deeper than anything the small families sample.
    "mlp-mnist1d-4x-deeper": _task(
        "mlp-mnist1d-4x-deeper", lambda d: mlp(40, [256] * 4, 10), "mnist1d"
    ),
    "cnn-digits-4x-deeper": _task(
        "cnn-digits-4x-deeper", lambda d: cnn((1, 8, 8), [64] * 4, [3] * 4, 10), "digits"
    ),
    # 4x wider and one layer deeper than mlp-family-deep (its CNNs are cnn-family-small's).
    "mlp-mnist1d-256x5": _task("mlp-mnist1d-256x5", lambda d: mlp(40, [256] * 5, 10), "mnist1d"),
    # 4x wider and one layer deeper than mixed-family-wide's MLPs and CNNs.
    "mlp-mnist1d-512x5": _task("mlp-mnist1d-512x5", lambda d: mlp(40, [512] * 5, 10), "mnist1d"),
    "cnn-digits-96x4": _task(
        "cnn-digits-96x4", lambda d: cnn((1, 8, 8), [96] * 4, [3] * 4, 10), "digits"
    ),
    # 4x wider and one layer deeper than mlp-family-deeper.
    "mlp-mnist1d-256x7": _task("mlp-mnist1d-256x7", lambda d: mlp(40, [256] * 7, 10), "mnist1d"),
    # 4x wider and one layer deeper than mixed-family-broad's MLPs and CNNs, like
    # stress-deep, but on other data and activations.
    "mlp-digits-256x5": _task("mlp-digits-256x5", lambda d: mlp(64, [256] * 5, 10), "digits"),
    "mlp-gmm32-256x5-tanh": _task(
        "mlp-gmm32-256x5-tanh", lambda d: mlp(_flat(d), [256] * 5, d.output_size, "tanh"), "gmm-32"
    ),
    "cnn-mnist1d-64x4": _task(
        "cnn-mnist1d-64x4", lambda d: cnn((1, 40), [64] * 4, [3] * 4, 10), "mnist1d-conv"
    ),
    # stress-deep's sizes again, each differing from every stress-deep and
    # stress-unseen network in data or activation.
    "mlp-digits-256x5-gelu": _task(
        "mlp-digits-256x5-gelu", lambda d: mlp(64, [256] * 5, 10, "gelu"), "digits"
    ),
    "mlp-teacher-256x5-gelu": _task(
        "mlp-teacher-256x5-gelu",
        lambda d: mlp(_flat(d), [256] * 5, d.output_size, "gelu"),
        "teacher",
    ),
    "cnn-digits-64x4-tanh": _task(
        "cnn-digits-64x4-tanh",
        lambda d: cnn((1, 8, 8), [64] * 4, [3] * 4, 10, activation="tanh"),
        "digits",
    ),
    # Inside mlp-family-broad, at its edges (depth 4, width 64, GELU): validation.
    "mlp-mnist1d-64x4": _task("mlp-mnist1d-64x4", lambda d: mlp(40, [64] * 4, 10), "mnist1d"),
    "mlp-gmm16-gelu": _task("mlp-gmm16-gelu", lambda d: mlp(16, [64, 64], 8, "gelu"), "gmm-16"),
    # Inside mixed-family-wide, at its widths: validation-wide.
    "mlp-digits-128x2": _task("mlp-digits-128x2", lambda d: mlp(64, [128, 128], 10), "digits"),
    "cnn-mnist1d-24x3": _task(
        "cnn-mnist1d-24x3", lambda d: cnn((1, 40), [24] * 3, [3] * 3, 10), "mnist1d-conv"
    ),
    # From a user's files ($LOPT_DATA).
    "mlp-fashion-8": _task("mlp-fashion-8", lambda d: mlp(64, [64], 10), "fashion_mnist-8"),
    "cnn-fashion-16": _task(
        "cnn-fashion-16", lambda d: cnn((1, 16, 16), [16, 32], [3, 3], 10), "fashion_mnist-16"
    ),
    "cnn-cifar10-16": _task(
        "cnn-cifar10-16", lambda d: cnn((3, 16, 16), [16, 32], [3, 3], 10), "cifar10-16"
    ),
}
TASKS.update(
    {
        # Inside real-family: validation, to pick a snapshot on.
        "resnet-digits-16x2": _task(
            "resnet-digits-16x2", lambda d: ResNet(d.input_shape, 16, 2, 10), "digits", 64
        ),
        "lm-docs-d32h2l2": _task(
            "lm-docs-d32h2l2", lambda d: TransformerLM(d.n_classes, 32, 32, 2, 2), "text-docs", 16
        ),
        # At the held-out LMs' width and heads, 2 layers on the docs text
        # (transformer-family's widest): validation-lm.
        "lm-docs-d64h4l2": _task(
            "lm-docs-d64h4l2", lambda d: TransformerLM(d.n_classes, 32, 64, 4, 2), "text-docs", 16
        ),
        "ae-digits-64x8": _task(
            "ae-digits-64x8", lambda d: autoencoder(64, [64, 8, 64]), "digits-recon", 64
        ),
        # lm-docs-d32h2l2 at 1, 3 and 4 layers (suite depth-lm): how an
        # optimizer's best step moves with a transformer's depth.
        **{
            f"lm-docs-d32h2l{n}": _task(
                f"lm-docs-d32h2l{n}",
                lambda d, n=n: TransformerLM(d.n_classes, 32, 32, 2, n),
                "text-docs",
                16,
            )
            for n in (1, 3, 4)
        },
        "mlp-mnist1d-128x2": _task(
            "mlp-mnist1d-128x2", lambda d: mlp(40, [128, 128], 10, "gelu"), "mnist1d", 64
        ),
        # A long run (3,000 steps) that trains until it fits its split, as
        # the held-out tabular regression does: a pick must handle one.
        "mlp-digits-128x3": _task(
            "mlp-digits-128x3", lambda d: mlp(64, [128] * 3, 10), "digits", 64
        ),
        # Held out from real-family, each by architecture or data: the tasks
        # every claim about real models is made on.
        "resnet-mnist1d-32x3": _task(
            "resnet-mnist1d-32x3", lambda d: ResNet(d.input_shape, 32, 3, 10), "mnist1d-conv", 64
        ),
        "resnet-digits-32x3-gelu": _task(
            "resnet-digits-32x3-gelu",
            lambda d: ResNet(d.input_shape, 32, 3, 10, kernel=5, activation="gelu"),
            "digits",
            64,
        ),
        "lm-code-d64h4l2": _task(
            "lm-code-d64h4l2", lambda d: TransformerLM(d.n_classes, 32, 64, 4, 2), "text-code", 16
        ),
        "lm-docs-d64h4l3": _task(
            "lm-docs-d64h4l3", lambda d: TransformerLM(d.n_classes, 32, 64, 4, 3), "text-docs", 16
        ),
        "ae-mnist1d-128x16": _task(
            "ae-mnist1d-128x16", lambda d: autoencoder(40, [128, 16, 128], "gelu"), "mnist1d-recon"
        ),
        "mlp-diabetes-128x2": _task(
            "mlp-diabetes-128x2", lambda d: mlp(10, [128, 128], 1), "diabetes", 32
        ),
        # Outside real-family as the real suite's tasks are (a 1-D ResNet, a
        # tabular regression), at other sizes and data: to pick a net that
        # does well beyond its family without picking on the real suite.
        "resnet-mnist1d-16x1": _task(
            "resnet-mnist1d-16x1", lambda d: ResNet(d.input_shape, 16, 1, 10), "mnist1d-conv", 64
        ),
        "mlp-wine-64x2": _task("mlp-wine-64x2", lambda d: mlp(12, [64, 64], 1), "wine-alcohol", 32),
        # An MNIST-1D autoencoder half as wide as the real suite's.
        "ae-mnist1d-64x8": _task(
            "ae-mnist1d-64x8", lambda d: autoencoder(40, [64, 8, 64], "gelu"), "mnist1d-recon"
        ),
    }
)
# The run length each task of the real and held-out suites is judged at (its
# step budget).
# The small families' held-out suite: wider, deeper or on other data than
# mixed-family-broad samples.
HELDOUT = (
    "mlp-mnist1d-wide",
    "mlp-mnist1d-deep",
    "mlp-digits-wide",
    "cnn-digits-wide",
    "mlp-gmm-hard",
    "cnn-mnist1d-deep",
)
# Tasks real-family samples, at run lengths (suite validation-real).
VALIDATION_REAL = (
    "resnet-digits-16x2",
    "lm-docs-d32h2l2",
    "ae-digits-64x8",
    "mlp-mnist1d-128x2",
    "mlp-digits-128x3",
)
# Tasks mixed-family-broad samples, at run lengths (suite validation-small).
VALIDATION_SMALL = ("mlp-mnist1d-64x4", "cnn-mnist1d", "mlp-gmm16-gelu")
TASK_STEPS: dict[str, int] = {
    "resnet-digits-16x2": 500,
    "lm-docs-d32h2l2": 1000,
    "lm-docs-d64h4l2": 1000,
    **{f"lm-docs-d32h2l{n}": 1000 for n in (1, 3, 4)},
    "ae-digits-64x8": 500,
    "mlp-mnist1d-128x2": 1000,
    "mlp-digits-128x3": 3000,
    "resnet-mnist1d-32x3": 1000,
    "resnet-digits-32x3-gelu": 500,
    "lm-code-d64h4l2": 2000,
    "lm-docs-d64h4l3": 1000,
    "ae-mnist1d-128x16": 1000,
    "mlp-diabetes-128x2": 3000,
    "resnet-mnist1d-16x1": 1000,
    "mlp-wine-64x2": 3000,
    "ae-mnist1d-64x8": 1000,
    # The held-out suite of the small families, at 5x their 200-step unrolls
    # (``python -m benchmarks.real --suite heldout``: budget nets told it).
    **dict.fromkeys(HELDOUT, 1000),
    **dict.fromkeys(VALIDATION_SMALL, 1000),
}
FILE_TASKS = {"mlp-fashion-8", "cnn-fashion-16", "cnn-cifar10-16"}


def _mixed(mlp_family: str, device: str, cnn_family: str = "cnn-family-small") -> MixtureFamily:
    """``mixed-family-*``: 60% the named MLP family, 40% the CNN family."""
    fams = [FAMILIES[mlp_family](device), FAMILIES[cnn_family](device)]
    return MixtureFamily(fams, [0.6, 0.4], mlp_family.replace("mlp-", "mixed-"))


FAMILIES: dict[str, Callable[..., TaskFamily]] = {
    "mlp-family-small": lambda device="cpu": MLPFamily(
        "mlp-family-small",
        ("mnist1d", "digits", "teacher"),
        (1, 3),
        (8, 64),
        ("relu", "tanh"),
        (32, 128),
        device=device,
    ),
    "cnn-family-small": lambda device="cpu": CNNFamily(
        "cnn-family-small",
        ("digits", "mnist1d"),
        (1, 3),
        (4, 16),
        (3, 5),
        ("relu", "tanh"),
        (32, 128),
        device=device,
    ),
    "mixed-family-small": lambda device="cpu": _mixed("mlp-family-small", device),
    # The small MLP family one layer deeper and with GELU: the held-out suite's
    # 5-layer MLP and its GELU task stay outside it (depth 5, width 128, new data).
    "mlp-family-deep": lambda device="cpu": replace(
        FAMILIES["mlp-family-small"](device),
        name="mlp-family-deep",
        depth=(1, 4),
        activations=("relu", "tanh", "gelu"),
    ),
    "mixed-family-deep": lambda device="cpu": _mixed("mlp-family-deep", device),
    # The deep family on more data: classification with 8, 16 and 32 input
    # features besides MNIST-1D's 40 and digits' 64, so that a first layer's
    # fan-in varies apart from the hidden widths.
    "mlp-family-broad": lambda device="cpu": replace(
        FAMILIES["mlp-family-deep"](device),
        name="mlp-family-broad",
        datasets=("mnist1d", "digits", "teacher", "gmm", "gmm-16", "gmm-32"),
    ),
    "mixed-family-broad": lambda device="cpu": _mixed("mlp-family-broad", device),
    # The broad family, plus (30%) narrow MLPs of 5-6 hidden layers, so that
    # meta-training sees what a too-large step does to depth; the held-out
    # 5 x 48 MLP stays outside by width (8-32 at depth 5-6, 8-64 up to 4).
    "mlp-family-deeper": lambda device="cpu": MixtureFamily(
        [
            FAMILIES["mlp-family-broad"](device),
            replace(
                FAMILIES["mlp-family-broad"](device),
                name="mlp-family-deep-narrow",
                depth=(5, 6),
                width=(8, 32),
            ),
        ],
        [0.7, 0.3],
        "mlp-family-deeper",
    ),
    "mixed-family-deeper": lambda device="cpu": _mixed("mlp-family-deeper", device),
    # The broad family at twice the width (MLPs 8-128 wide, CNNs of 4-24
    # channels), so that an NF-layer's per-neuron terms are trained on layers
    # nearer the held-out ones; each held-out task stays outside it (256-wide
    # MLPs, 32-channel CNNs, 5 hidden layers, GELU on new data).
    "mlp-family-wide": lambda device="cpu": replace(
        FAMILIES["mlp-family-broad"](device), name="mlp-family-wide", width=(8, 128)
    ),
    "cnn-family-wide": lambda device="cpu": replace(
        FAMILIES["cnn-family-small"](device), name="cnn-family-wide", channels=(4, 24)
    ),
    "mixed-family-wide": lambda device="cpu": _mixed("mlp-family-wide", device, "cnn-family-wide"),
    "resnet-family": lambda device="cpu": ResNetFamily(device=device),
    "transformer-family": lambda device="cpu": TransformerFamily(device=device),
    "autoencoder-family": lambda device="cpu": AutoencoderFamily(device=device),
    # The architectures people train, at widths 16-512: MLPs and CNNs,
    # BatchNorm ResNets on digits, causal transformer LMs on the Python docs,
    # MLP autoencoders on digits. The real suite stays outside it by
    # architecture or data (1-D ResNets, 3-block ResNets, code text, 3-layer
    # LMs, MNIST-1D autoencoders, tabular regression).
    "real-family": lambda device="cpu": MixtureFamily(
        [
            replace(
                FAMILIES["mlp-family-broad"](device),
                name="mlp-family-real",
                depth=(1, 3),
                width=(16, 512),
            ),
            FAMILIES["cnn-family-wide"](device),
            ResNetFamily(device=device),
            TransformerFamily(device=device),
            AutoencoderFamily(device=device),
        ],
        [0.25, 0.15, 0.2, 0.25, 0.15],
        "real-family",
    ),
    # real-family plus (25%) mixed-family-broad, the family of the recipes'
    # early stages: a late stage on real architectures alone forgets what
    # those taught about deeper MLPs and small CNNs. The real suite stays
    # outside it; the small families' held-out suite does not wholly, as
    # real-family's MLPs already reach the widths of its two wide MLPs.
    "real-broad-family": lambda device="cpu": MixtureFamily(
        [FAMILIES["real-family"](device), FAMILIES["mixed-family-broad"](device)],
        [0.75, 0.25],
        "real-broad-family",
    ),
    # MLPs 64-512 wide on small classification sets they can fit: over a run
    # of a few hundred steps or more the training loss nears 0, where a step
    # that does not shrink with the gradient makes the loss bounce. In
    # real-family such runs are a few percent of the draws.
    "mlp-family-fit": lambda device="cpu": replace(
        FAMILIES["mlp-family-broad"](device),
        name="mlp-family-fit",
        datasets=("digits", "gmm-16", "gmm-32"),
        depth=(1, 3),
        width=(64, 512),
    ),
    # real-family plus (30%) mlp-family-fit, so that meta-training sees runs
    # that fit their data as often as it sees each architecture. The real
    # suite stays outside it (its tabular MLP regresses on held-out data).
    "real-fit-family": lambda device="cpu": MixtureFamily(
        [FAMILIES["real-family"](device), FAMILIES["mlp-family-fit"](device)],
        [0.7, 0.3],
        "real-fit-family",
    ),
}

VALIDATION = [
    "mlp-mnist1d",
    "cnn-mnist1d",
    "mlp-digits",
    "cnn-digits",
    "mlp-teacher",
    "mlp-gmm",
    "mlp-mnist1d-64x4",
    "mlp-gmm16-gelu",
]
SUITES: dict[str, list[str]] = {
    "builtin": ["mlp-mnist1d", "cnn-mnist1d", "mlp-digits", "cnn-digits", "mlp-teacher", "mlp-gmm"],
    "heldout": list(HELDOUT),
    # Tasks mixed-family-broad samples, to pick a checkpoint on (not held-out).
    "validation": VALIDATION,
    # validation and two tasks at mixed-family-wide's widths, for nets trained on it.
    "validation-wide": VALIDATION + ["mlp-digits-128x2", "cnn-mnist1d-24x3"],
    "quick": ["mlp-digits", "mlp-gmm"],
    "stress": ["mlp-mnist1d-4x-deeper", "cnn-digits-4x-deeper"],
    "stress-deep": ["mlp-mnist1d-256x5", "cnn-digits-4x-deeper"],
    "stress-deeper": ["mlp-mnist1d-256x7", "cnn-digits-4x-deeper"],
    "stress-wide": ["mlp-mnist1d-512x5", "cnn-digits-96x4"],
    # stress-deep's sizes on other data and activations, fixed before any net ran on it.
    "stress-unseen": ["mlp-digits-256x5", "mlp-gmm32-256x5-tanh", "cnn-mnist1d-64x4"],
    # The same sizes, differing from stress-deep and stress-unseen in data or activation.
    "stress-fresh": ["mlp-digits-256x5-gelu", "mlp-teacher-256x5-gelu", "cnn-digits-64x4-tanh"],
    # Inside real-family, to pick a snapshot on.
    "validation-real": list(VALIDATION_REAL),
    # Inside mixed-family-broad (the small families' side of real-broad-family),
    # at 5x their 200-step unrolls, with validation's deepest MLP: to pick a
    # snapshot of a net trained on real-broad-family, beside validation-real.
    "validation-small": list(VALIDATION_SMALL),
    # Both, to pick one snapshot of a net trained on real-broad-family.
    "validation-broad": [*VALIDATION_REAL, *VALIDATION_SMALL],
    # The LMs inside real-family, the narrow one and one at the held-out LMs'
    # width: a pick must not lose them (validation-broad's LM alone moves by
    # less than the held-out LMs do between snapshots).
    "validation-lm": ["lm-docs-d32h2l2", "lm-docs-d64h4l2"],
    # Outside real-family by architecture or data, as the real suite is, and
    # disjoint from it: a pick must hold beyond the family it was trained on.
    "validation-outside": ["resnet-mnist1d-16x1", "mlp-wine-64x2", "ae-mnist1d-64x8"],
    # One width, 1 to 4 layers (transformer-family samples 1 and 2): what
    # python -m benchmarks.update_scale runs by default.
    "depth-lm": [f"lm-docs-d32h2l{n}" for n in (1, 2, 3, 4)],
    # Held out from real-family by architecture or data; every run has the
    # length TASK_STEPS gives it.
    "real": [
        "resnet-mnist1d-32x3",
        "resnet-digits-32x3-gelu",
        "lm-code-d64h4l2",
        "lm-docs-d64h4l3",
        "ae-mnist1d-128x16",
        "mlp-diabetes-128x2",
    ],
}


def _unknown(kind: str, name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (python -m tasks list shows them all)"


def get_task(name: str, device: torch.device | str = "cpu") -> Task:
    """A named task (see ``python -m tasks list``)."""
    if name not in TASKS:
        raise KeyError(_unknown("task", name, list(TASKS) + list(FAMILIES) + list(SUITES)))
    return TASKS[name](device)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``"real-family=0.7,mlp-family-fit=0.3"``: the (family or task name,
    weight) parts of a mixture spec, checked without building anything.
    Weights are relative (they need not sum to 1). ValueError on a malformed
    part, KeyError on an unknown name."""
    parts = []
    for item in spec.split(","):
        name, sep, text = (x.strip() for x in item.partition("="))
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        if not sep or not name or not (math.isfinite(weight) and weight >= 0):
            raise ValueError(
                f"family mixture {spec!r}: each part must be NAME=WEIGHT with a finite "
                f"weight >= 0, got {item.strip()!r}"
            )
        if name not in FAMILIES and name not in TASKS:
            raise KeyError(_unknown("task family", name, list(FAMILIES) + list(TASKS)))
        parts.append((name, weight))
    if not sum(w for _, w in parts) > 0:
        raise ValueError(f"family mixture {spec!r}: the weights are all 0")
    return parts


def get_family(name: str, device: torch.device | str = "cpu") -> TaskFamily:
    """A named family; a task name gives the family of that one task;
    ``"NAME=WEIGHT,NAME=WEIGHT,..."`` samples those families (or tasks) with
    those relative weights (:func:`parse_mixture`)."""
    if "=" in name:
        parts = parse_mixture(name)
        return MixtureFamily([get_family(n, device) for n, _ in parts], [w for _, w in parts], name)
    if name in FAMILIES:
        return FAMILIES[name](str(device))
    if name in TASKS:
        return FixedFamily(lambda: get_task(name, device))
    raise KeyError(_unknown("task family", name, list(FAMILIES) + list(TASKS)))


def get_suite(name: str) -> list[str]:
    """Task names of a suite, or ``[name]`` for a single task."""
    if name in SUITES:
        return list(SUITES[name])
    if name in TASKS:
        return [name]
    raise KeyError(_unknown("suite", name, list(SUITES) + list(TASKS)))
