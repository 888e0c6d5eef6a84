"""Truncated inner training, vectorised over a population of optimizer nets.

Every member of the population trains its own copy of one task with
:func:`lopt.functional.update` driven by its own optimizer-net parameters.
``torch.func.vmap`` runs all members at once; :meth:`TaskUnroll.unroll_loop`
is the same computation as a Python loop (for tests and benchmarks).

The inner state (task parameters, optimizer state, initial loss) is a dict of
tensors with a leading population axis; it persists across truncations and the
trainer resets it when an inner run reaches its horizon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lopt import functional
from lopt.nets import OptimizerNet
from tasks import Task

META_LOSSES = ("mean", "log", "final", "heldout")
# The optimizer state's entries in an inner state (loss_stats: absent from older ones).
STATE_KEYS = ("momenta", "second_moment", "step", "skipped", "loss_stats")
InnerState = dict[str, object]


@dataclass(frozen=True)
class MetaLoss:
    """How a truncation's per-step losses become one meta-loss per member.

    ``kind``: ``mean`` training loss over the truncation, mean ``log`` loss,
    ``final`` loss, or ``heldout``: mean loss on held-out batches. Each
    per-step loss is capped at ``cap`` times the member's initial loss, and a
    NaN or infinite loss counts as the cap (learned_optimization's protection
    against divergence).

    ``ramp``: if positive, the loss (or log loss) after inner step ``t`` of a
    run is weighted by ``min(1, t / ramp)``, so the first ``ramp`` steps of
    every run count less, linearly, than the rest. With ``ramp`` equal to the
    horizon the meta-objective leans on the loss late in the run, which is
    what the steps-to-a-target benchmark measures; 0 (the default) weighs
    every step alike.

    ``ramp_fraction``: the same ramp measured in each run's own length: if
    positive, step ``t`` of a run of ``N`` steps is weighted by
    ``min(1, t / (ramp_fraction * N))``. Runs of every length then lean on
    their own end alike, which an absolute ramp cannot do when lengths are
    drawn from 200 to 5,000 steps. At most one of the two ramps is set.

    ``offset``: ``log`` only: the loss ``L`` counts as ``log(L + offset *
    initial)``, so once a run's loss is far below ``offset`` times its
    initial loss, going lower still is worth little. Under the plain log
    loss (0, the default) a fall from 1e-4 to 1e-5 of the initial loss at a
    run's end is worth as much as one from 1e-1 to 1e-2 mid-run; the offset
    moves that weight to reaching a low loss early.

    ``end_weight``: if below 1, step ``t`` of a run of ``N`` steps is also
    weighted by ``1 - (1 - end_weight) t / N``, falling linearly from 1 at the
    start to ``end_weight`` at the last step. The mean log loss rewards a
    fall at a run's end as much as one mid-run, which favours a high rate
    held long and a sharp late anneal; a lower end weight asks for a low
    loss sooner. 1 (the default) is off.

    ``stay``: if true, each step's (log) loss counts as the highest of it and
    the losses after it in the truncation, before any weighting. A loss that
    dips and climbs back within the truncation then earns nothing for the
    dip, as in the steps-to-a-target benchmark, where a target counts as
    reached only once the loss stays below it; a spike costs as much as the
    steps before it in the truncation. Not for ``final``, whose one step has
    nothing after it."""

    kind: str = "mean"
    cap: float = 3.0
    ramp: int = 0
    ramp_fraction: float = 0.0
    offset: float = 0.0
    end_weight: float = 1.0
    stay: bool = False

    def __post_init__(self) -> None:
        if self.kind not in META_LOSSES:
            raise ValueError(f"meta-loss must be one of {META_LOSSES}, got {self.kind!r}")
        if not self.cap > 0:
            raise ValueError(f"loss cap must be > 0, got {self.cap}")
        if self.ramp < 0 or int(self.ramp) != self.ramp:
            raise ValueError(
                f"meta-loss ramp must be a whole number of steps >= 0, got {self.ramp}"
            )
        if not 0.0 <= self.ramp_fraction <= 1.0:
            raise ValueError(f"meta-loss ramp fraction must be in [0, 1], got {self.ramp_fraction}")
        if self.ramp and self.ramp_fraction:
            raise ValueError("give the meta-loss ramp in steps or as a run fraction, not both")
        if not (math.isfinite(self.offset) and 0.0 <= self.offset < 1.0):
            raise ValueError(f"meta-loss offset must be in [0, 1), got {self.offset}")
        if self.offset and self.kind != "log":
            raise ValueError(f"a meta-loss offset is for the log meta-loss, not {self.kind!r}")
        if not (math.isfinite(self.end_weight) and 0.0 < self.end_weight <= 1.0):
            raise ValueError(f"meta-loss end weight must be in (0, 1], got {self.end_weight}")
        if self.stay and self.kind == "final":
            raise ValueError("a meta-loss that stays below is for a loss over steps, not 'final'")

    def __call__(
        self,
        losses: Tensor,
        initial: Tensor,
        start: Tensor | None = None,
        horizon: int | None = None,
    ) -> Tensor:
        """``losses``: ``(..., K)`` the losses of a truncation's K steps;
        ``start``: the inner steps taken before it (needed by either ramp and
        by ``end_weight``); ``horizon``: the run's length in steps (needed by
        ``ramp_fraction`` and ``end_weight``)."""
        initial = initial.clamp(min=1e-8)
        cap = self.cap * initial
        clipped = torch.where(torch.isfinite(losses), torch.minimum(losses, cap), cap)
        if self.kind == "log":
            values = (clipped + self.offset * initial).clamp(min=1e-12).log()
        else:
            values = clipped
        if self.stay:
            # the running maximum from the truncation's end backwards
            values = values.flip(-1).cummax(-1).values.flip(-1)
        tapered = self.end_weight < 1.0
        if self.ramp or self.ramp_fraction or tapered:
            if start is None:
                raise ValueError("a meta-loss weighted by step needs the truncation's start step")
            if (self.ramp_fraction or tapered) and not (horizon and horizon > 0):
                raise ValueError(
                    "a meta-loss weighted by run fraction (ramp fraction, end weight) "
                    "needs the run's horizon"
                )
            k = torch.arange(1, losses.shape[-1] + 1, device=losses.device, dtype=losses.dtype)
            t = torch.as_tensor(start, dtype=losses.dtype, device=losses.device)[..., None] + k
            if self.ramp or self.ramp_fraction:
                ramp = self.ramp or self.ramp_fraction * horizon
                values = values * (t / ramp).clamp(max=1.0)
            if tapered:
                values = values * (1.0 - (1.0 - self.end_weight) * (t / horizon).clamp(max=1.0))
        if self.kind == "final":
            return values[..., -1]
        return values.mean(-1)


class TaskUnroll:
    """Truncated unrolls of one task for a population of optimizer nets.

    Args:
        net: the optimizer net architecture (its own parameters are replaced
            by each member's).
        task: the task every member trains (same architecture, so vmap works).
        meta_loss: see :class:`MetaLoss`.
        horizon: the inner run's length in steps (what a meta-loss ramped by
            run fraction reads; None when unknown).
    """

    def __init__(
        self,
        net: OptimizerNet,
        task: Task,
        meta_loss: MetaLoss | None = None,
        horizon: int | None = None,
    ) -> None:
        self.net = net
        self.task = task
        self.meta_loss = meta_loss or MetaLoss()
        self.horizon = horizon
        self.names = list(task.param_shapes)
        self.net_names = [n for n, _ in net.named_parameters()]
        self.net_shapes = [p.shape for _, p in net.named_parameters()]

    # --------------------------------------------------------------- theta
    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """A flat parameter vector of the net as a dict for functional_call."""
        out, i = {}, 0
        for name, shape in zip(self.net_names, self.net_shapes):
            n = shape.numel()
            out[name] = theta[i : i + n].reshape(shape)
            i += n
        return out

    # --------------------------------------------------------- inner state
    def init_inner(
        self,
        population: int,
        generator: torch.Generator,
        total_steps: int | None = None,
        loss_told: bool = True,
    ) -> InnerState:
        """Every member starts from the same initial parameters (common random
        numbers: antithetic pairs differ only by their perturbation).
        ``total_steps`` is the run's budget as the net is told it (None: not
        told); ``loss_told``, whether a net that reads the loss is told it."""
        params = self.task.init(generator)
        state = functional.init([params[n] for n in self.names])
        batch = self.task.sample_batch(generator)
        initial = self.task.loss(params, batch).detach()

        def rep(x: Tensor) -> Tensor:
            return x.unsqueeze(0).expand(population, *x.shape).clone()

        return {
            "params": {n: rep(p) for n, p in params.items()},
            "momenta": [rep(m) for m in state["momenta"]],
            "second_moment": [rep(v) for v in state["second_moment"]],
            "step": rep(state["step"]),
            "skipped": rep(state["skipped"]),
            "loss_stats": rep(state["loss_stats"]),
            "loss_told": rep(torch.tensor(float(loss_told), device=initial.device)),
            "initial_loss": rep(initial),
            "total_steps": rep(torch.tensor(float(total_steps or -1), device=initial.device)),
        }

    def sample_batches(self, steps: int, generator: torch.Generator, split: str = "train"):
        """``steps`` batches stacked: ``(steps, batch, ...)``, shared by all members."""
        bs = [self.task.sample_batch(generator, split) for _ in range(steps)]
        return torch.stack([b[0] for b in bs]), torch.stack([b[1] for b in bs])

    # ---------------------------------------------------------- one member
    def _member(
        self,
        theta: Tensor,
        inner: Mapping[str, object],
        batches: tuple[Tensor, Tensor],
        heldout: tuple[Tensor, Tensor] | None,
    ):
        net_params = self.unflatten(theta)
        params = dict(inner["params"])
        state = {k: inner[k] for k in STATE_KEYS if k in inner}
        start = state["step"] + state["skipped"]  # inner steps taken, good or not
        grad_fn = torch.func.grad_and_value(self.task.loss)
        losses = []
        for k in range(batches[0].shape[0]):
            grads, loss = grad_fn(params, (batches[0][k], batches[1][k]))
            # The loss as a feature: a value, not a path for the meta-gradient;
            # NaN (not read) in runs whose loss the net is not told.
            told = loss.detach()
            if "loss_told" in inner:
                told = torch.where(inner["loss_told"] > 0, told, torch.nan)
            updates, state = functional.update(
                self.net,
                self.task.spec,
                net_params,
                [grads[n] for n in self.names],
                state,
                [params[n] for n in self.names],
                total_steps=inner.get("total_steps"),
                loss=told,
            )
            params = {n: params[n] + u for n, u in zip(self.names, updates)}
            if heldout is not None:
                loss = self.task.loss(params, (heldout[0][k], heldout[1][k]))
            losses.append(loss)
        losses = torch.stack(losses)
        new_inner = {"params": params, **state, "initial_loss": inner["initial_loss"]}
        for key in ("total_steps", "loss_told"):
            if key in inner:
                new_inner[key] = inner[key]
        return self.meta_loss(losses, inner["initial_loss"], start, self.horizon), losses, new_inner

    # ------------------------------------------------------------ population
    def unroll(self, thetas: Tensor, inner: InnerState, batches, heldout=None):
        """Run every member for one truncation, vectorised.

        Args:
            thetas: ``(population, D)`` flat net parameters, one row per member.
            inner: the population's inner state.
            batches: ``(xs, ys)`` of shape ``(K, batch, ...)``: K inner steps.
            heldout: batches of the same shape for the ``heldout`` meta-loss.

        Returns ``(meta_losses (population,), losses (population, K), inner)``.
        """
        if self.meta_loss.kind == "heldout" and heldout is None:
            raise ValueError("the heldout meta-loss needs held-out batches")
        fn = torch.func.vmap(self._member, in_dims=(0, 0, None, None))
        return fn(thetas, inner, batches, heldout)

    def unroll_loop(self, thetas: Tensor, inner: InnerState, batches, heldout=None):
        """:meth:`unroll` as a Python loop over members (the reference)."""
        results = [
            self._member(thetas[i], index_inner(inner, i), batches, heldout)
            for i in range(thetas.shape[0])
        ]
        metas = torch.stack([r[0] for r in results])
        losses = torch.stack([r[1] for r in results])
        new_inner = stack_inner([r[2] for r in results])
        return metas, losses, new_inner


def index_inner(inner: InnerState, index) -> InnerState:
    """Select members (an int or a slice) of an inner state."""
    return torch.utils._pytree.tree_map(lambda x: x[index], inner)


def stack_inner(members: list[InnerState]) -> InnerState:
    return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *members)


def cat_inner(parts: list[InnerState]) -> InnerState:
    return torch.utils._pytree.tree_map(lambda *xs: torch.cat(xs), *parts)


def detach_inner(inner: InnerState) -> InnerState:
    return torch.utils._pytree.tree_map(lambda x: x.detach(), inner)
