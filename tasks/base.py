"""Task and TaskFamily, in the spirit of learned_optimization.

A :class:`Task` is a model, a dataset and a batch size, seen functionally:
parameters are a dict of tensors, ``loss(params, batch)`` is pure (built on
``torch.func.functional_call``), so ``torch.func.vmap`` runs a batch of tasks
of the same architecture (different initialisations and batches) at once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lopt.weightspace import WeightSpaceSpec
from tasks.data import Dataset

Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]


class Task:
    """One training problem.

    Args:
        name: a short name for logs and tables.
        model: the architecture (its own parameters are never trained; see
            :meth:`init`). Must be a stack of layers the weight-space spec
            understands for the NFN optimizer to see its structure.
        dataset: a :class:`~tasks.data.Dataset`; classification uses cross
            entropy, regression (``n_classes == 0``) mean squared error.
        batch_size: examples per :meth:`sample_batch`.
        init_scale: multiplies the default (PyTorch-style) initial weights.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        dataset: Dataset,
        batch_size: int = 128,
        init_scale: float = 1.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.name = name
        self.model = model.to(dataset.device)
        self.dataset = dataset
        self.batch_size = batch_size
        self.init_scale = init_scale
        self.param_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        with warnings.catch_warnings():
            # Read once per sampled task: a fallback warning would repeat for
            # every task of a family (the registry's models are read fully).
            warnings.simplefilter("ignore")
            self.spec = WeightSpaceSpec.from_module(model)
        self._fan_in = _fan_ins(model)
        self._fixed = _fixed_inits(model)

    def __repr__(self) -> str:
        return (
            f"Task({self.name!r}, params={self.num_params:,}, data={self.dataset.name}, "
            f"batch={self.batch_size})"
        )

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes.values())

    @property
    def device(self) -> torch.device:
        return self.dataset.device

    @property
    def is_classification(self) -> bool:
        return self.dataset.n_classes > 0

    def init(self, generator: torch.Generator) -> Params:
        """Fresh parameters, deterministic in ``generator``: uniform in
        +-init_scale/sqrt(fan_in), PyTorch's default for Linear and Conv
        layers; normalisation layers' scales 1 and shifts 0 (PyTorch's
        defaults); embeddings normal with std ``init_scale`` (PyTorch's
        default std is 1)."""
        out = {}
        for name, shape in self.param_shapes.items():
            rule = self._fixed.get(name)
            if rule == "normal":
                z = torch.randn(shape, generator=generator)
                out[name] = (z * self.init_scale).to(self.device)
                continue
            if rule is not None:
                out[name] = torch.full(shape, float(rule), device=self.device)
                continue
            bound = self.init_scale / math.sqrt(self._fan_in.get(name, shape[-1] if shape else 1))
            u = torch.rand(shape, generator=generator)
            out[name] = ((2 * u - 1) * bound).to(self.device)
        return out

    def loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """Mean loss of ``params`` on ``batch``: pure, vmap- and grad-able."""
        x, y = batch
        out = torch.func.functional_call(self.model, dict(params), (x,))
        if self.is_classification:
            # A sequence model's (batch, positions, classes) counts every position.
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.mse_loss(out, y)

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> Batch:
        return self.dataset.sample(generator, self.batch_size, split)

    @torch.no_grad()
    def eval_loss(
        self, params: Mapping[str, Tensor], split: str = "test", max_examples: int = 2048
    ) -> Tensor:
        """Loss on (the first ``max_examples`` of) a whole split."""
        x, y = self.dataset.split(split)
        return self.loss(params, (x[:max_examples], y[:max_examples]))

    @torch.no_grad()
    def accuracy(self, params: Mapping[str, Tensor], split: str = "test") -> float:
        if not self.is_classification:
            raise ValueError(f"task {self.name!r} is a regression task")
        x, y = self.dataset.split(split)
        out = torch.func.functional_call(self.model, dict(params), (x,))
        return (out.argmax(-1) == y).float().mean().item()

    def module_with(self, params: Mapping[str, Tensor]) -> nn.Module:
        """A copy of the model holding ``params`` as trainable parameters."""
        import copy

        m = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(params[name])
        return m


def _fan_ins(model: nn.Module) -> dict[str, int]:
    """Fan-in of every Linear / Conv weight, shared with its bias."""
    out = {}
    for mod_name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) and weight is not None:
            fan_in = math.prod(weight.shape[1:])
            prefix = f"{mod_name}." if mod_name else ""
            out[f"{prefix}weight"] = fan_in
            out[f"{prefix}bias"] = fan_in
    return out


NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _fixed_inits(model: nn.Module) -> dict[str, float | str]:
    """Parameters not drawn uniformly: a normalisation layer's scale (1) and
    shift (0), and embeddings (``"normal"``)."""
    out: dict[str, float | str] = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, NORMS):
            for p_name, value in (("weight", 1.0), ("bias", 0.0)):
                if getattr(mod, p_name, None) is not None:
                    out[prefix + p_name] = value
        elif isinstance(mod, nn.Embedding):
            out[prefix + "weight"] = "normal"
    return out


class TaskFamily:
    """A distribution over tasks. ``sample(generator)`` returns a :class:`Task`."""

    name: str = "family"

    def sample(self, generator: torch.Generator) -> Task:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class FixedFamily(TaskFamily):
    """A family of one task (for meta-training on a single problem)."""

    def __init__(self, task: Task | Callable[[], Task]) -> None:
        self._task = task if isinstance(task, Task) else None
        self._make = task if not isinstance(task, Task) else None
        self.name = self._task.name if self._task else "fixed"

    def sample(self, generator: torch.Generator) -> Task:
        if self._task is None:
            self._task = self._make()
            self.name = self._task.name
        return self._task
