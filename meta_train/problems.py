"""What the outer loop optimizes: a truncated, resettable meta-objective.

A problem owns the inner runs: ``reset`` starts new ones (for a learned
optimizer: sample a task from the family, initialise it), ``unroll`` runs one
truncation for a population of flat parameter vectors. Both take a ``slot``:
the trainer may keep several inner runs at once (one task each), and a slot
names which one. All randomness comes
from counters (:func:`rng`), so a run is reproducible from its counters and a
resumed run continues exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lopt.nets import OptimizerNet
from meta_train.unroll import InnerState, MetaLoss, TaskUnroll
from tasks import TaskFamily

_TAGS = {"task": 1, "init": 2, "data": 3, "noise": 4, "heldout": 5, "horizon": 6, "budget": 7,
         "loss": 8}  # fmt: skip


def rng(seed: int, tag: str, counter: int) -> torch.Generator:
    """A generator determined by (seed, purpose, counter)."""
    mixed = (seed * 1_000_003 + _TAGS[tag] * 7_919 + counter * 104_729) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


HORIZON_WEIGHTINGS = ("runs", "steps")


class TruncatedProblem:
    """Interface of a meta-objective made of truncated inner runs."""

    truncation: int = 1
    horizon: int = 1
    horizon_max: int | None = None
    horizon_weighting: str = "runs"

    def initial_theta(self) -> Tensor:
        raise NotImplementedError

    def horizon_of(self, counter: int) -> int:
        """Inner steps of the ``counter``-th inner run: ``horizon``, or with
        ``horizon_max`` a draw from [horizon, horizon_max], a multiple of the
        truncation, so the net is judged at many lengths and a fixed one does
        not bias it toward its end. ``horizon_weighting`` "runs" draws it
        log-uniformly (as learned_optimization samples truncation lengths);
        a run then takes inner steps in proportion to its length, so runs
        over half of horizon_max take most of the meta-gradient. "steps"
        draws it with density 1 / L**2, so that lengths in [a, 2a] get the
        same share of inner steps for every a."""
        if self.horizon_max is None:
            return self.horizon
        u = torch.rand((), generator=rng(self.seed, "horizon", counter), dtype=torch.float64)
        lo, hi = self.horizon, self.horizon_max + 1
        if self.horizon_weighting == "steps":  # the inverse of the 1 / L**2 law's CDF
            steps = int(1.0 / (1.0 / lo - float(u) * (1.0 / lo - 1.0 / hi)))
        else:
            steps = int(math.exp(math.log(lo) + float(u) * (math.log(hi) - math.log(lo))))
        return min(self.horizon_max, max(self.horizon, steps)) // self.truncation * self.truncation

    def reset(self, counter: int, trajectories: int, slot: int = 0) -> InnerState:
        """Start the ``counter``-th inner run in ``slot`` (replacing the run
        that slot held) for ``trajectories`` trajectories."""
        raise NotImplementedError

    def unroll(self, thetas: Tensor, inner: InnerState, counter: int, slot: int = 0):
        """``(meta_losses (P,), losses (P, K), new_inner)`` for one truncation
        of ``slot``'s inner run; ``counter`` picks its data."""
        raise NotImplementedError

    def load_theta(self, theta: Tensor) -> None:
        """Write the meta-parameters back where users read them (e.g. a net)."""

    def task_name(self, counter: int) -> str | None:
        """The name of the ``counter``-th inner run's task (None: no tasks)."""
        return None

    def theta_layout(self) -> list[tuple[str, int]]:
        """``(name, size)`` of each run of entries of theta, in order (one
        run, ``("theta", D)``, unless a subclass names its parts)."""
        return [("theta", self.initial_theta().numel())]


class LearnedOptimizerProblem(TruncatedProblem):
    """Meta-train an optimizer net on tasks sampled from a family.

    Args:
        net: the optimizer net; its parameters are the meta-parameters.
        family: where each inner run's task comes from.
        truncation: inner steps per truncation (K).
        horizon: inner steps before an inner run is reset.
        horizon_max: if given, each inner run's horizon is drawn from
            [horizon, horizon_max] (:meth:`~TruncatedProblem.horizon_of`).
        horizon_weighting: how it is drawn: "runs" (log-uniform per run) or
            "steps" (log-uniform per inner step).
        meta_loss: see :class:`~meta_train.unroll.MetaLoss`.
        seed: all sampling derives from it.
        vectorise: ``torch.func.vmap`` over the population (False: a loop).
        budget_hidden: the fraction of inner runs whose step budget (their
            horizon) the net is not told, so it also learns to run without
            ``total_steps``; the others are told it.
        loss_hidden: the fraction of inner runs whose training loss a net
            that reads it is not told (for runs without ``step(loss=...)``).
    """

    def __init__(
        self,
        net: OptimizerNet,
        family: TaskFamily,
        truncation: int = 20,
        horizon: int = 200,
        meta_loss: MetaLoss | None = None,
        seed: int = 0,
        vectorise: bool = True,
        horizon_max: int | None = None,
        budget_hidden: float = 0.0,
        horizon_weighting: str = "runs",
        loss_hidden: float = 0.0,
    ) -> None:
        if truncation < 1 or horizon < truncation:
            raise ValueError(
                f"need 1 <= truncation <= horizon, got truncation={truncation}, horizon={horizon}"
            )
        if horizon_max is not None and horizon_max < horizon:
            raise ValueError(f"need horizon_max >= horizon, got {horizon_max} < {horizon}")
        if horizon_weighting not in HORIZON_WEIGHTINGS:
            raise ValueError(
                f"horizon_weighting must be one of {HORIZON_WEIGHTINGS}, got {horizon_weighting!r}"
            )
        self.horizon_weighting = horizon_weighting
        self.net, self.family = net, family
        self.truncation, self.horizon, self.horizon_max = truncation, horizon, horizon_max
        if not 0.0 <= budget_hidden <= 1.0:
            raise ValueError(f"budget_hidden must be in [0, 1], got {budget_hidden}")
        self.budget_hidden = budget_hidden
        if not 0.0 <= loss_hidden <= 1.0:
            raise ValueError(f"loss_hidden must be in [0, 1], got {loss_hidden}")
        self.loss_hidden = loss_hidden
        self.meta_loss = meta_loss or MetaLoss()
        self.seed, self.vectorise = seed, vectorise
        self.unrollers: dict[int, TaskUnroll] = {}  # slot -> its current inner run
        self.counters: dict[int, int] = {}  # slot -> that run's counter

    def initial_theta(self) -> Tensor:
        return nn.utils.parameters_to_vector(self.net.parameters()).detach().clone()

    def load_theta(self, theta: Tensor) -> None:
        nn.utils.vector_to_parameters(theta.detach().clone(), self.net.parameters())

    def theta_layout(self) -> list[tuple[str, int]]:
        return [(name, p.numel()) for name, p in self.net.named_parameters()]

    def reset(self, counter: int, trajectories: int, slot: int = 0) -> InnerState:
        u = TaskUnroll(self.net, self.task_of(counter), self.meta_loss, self.horizon_of(counter))
        self.unrollers[slot], self.counters[slot] = u, counter
        return u.init_inner(
            trajectories,
            rng(self.seed, "init", counter),
            self.budget_of(counter),
            self.loss_told(counter),
        )

    def loss_told(self, counter: int) -> bool:
        """Whether the net is told the training loss in the ``counter``-th
        inner run (not in a ``loss_hidden`` share of runs)."""
        return not self._hidden(self.loss_hidden, "loss", counter)

    def _hidden(self, share: float, tag: str, counter: int) -> bool:
        """Whether the ``counter``-th inner run falls in the ``share`` of runs
        that hide what ``tag`` names from the net (drawn from its own stream)."""
        return bool(share) and torch.rand((), generator=rng(self.seed, tag, counter)).item() < share

    def budget_of(self, counter: int) -> int | None:
        """The step budget the net is told in the ``counter``-th inner run:
        its horizon, or None in a ``budget_hidden`` share of runs."""
        if self._hidden(self.budget_hidden, "budget", counter):
            return None
        return self.horizon_of(counter)

    def task_of(self, counter: int):
        """The task of the ``counter``-th inner run."""
        return self.family.sample(rng(self.seed, "task", counter))

    def task_name(self, counter: int) -> str:
        for slot, c in self.counters.items():
            if c == counter:  # built already: do not sample it again
                return self.unrollers[slot].task.name
        return self.task_of(counter).name

    @property
    def unroller(self) -> TaskUnroll | None:
        """Slot 0's inner run (the only one unless the trainer keeps several)."""
        return self.unrollers.get(0)

    @property
    def task(self):
        return None if self.unroller is None else self.unroller.task

    def unroll(self, thetas: Tensor, inner: InnerState, counter: int, slot: int = 0):
        u = self.unrollers[slot]
        batches = u.sample_batches(self.truncation, rng(self.seed, "data", counter))
        heldout = None
        if self.meta_loss.kind == "heldout":
            heldout = u.sample_batches(self.truncation, rng(self.seed, "heldout", counter), "test")
        run = u.unroll if self.vectorise else u.unroll_loop
        return run(thetas, inner, batches, heldout)
