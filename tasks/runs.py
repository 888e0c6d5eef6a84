"""Run an optimizer on a task: the loop every benchmark, and meta-training's
periodic evaluation, share.

Every optimizer sees the same initial parameters and the same batches for a
given seed, so curves differ only by the optimizer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lopt import LearnedOptimizer
from tasks import Task

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]
# A learning-rate schedule for a run: (optimizer, the run's steps) -> a
# scheduler stepped after every optimizer step.
MakeSchedule = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]
ADAM_GRID: tuple[float, ...] = tuple(10 ** (-4 + 0.5 * i) for i in range(7))  # 1e-4 .. 1e-1


@dataclass
class Curve:
    """Losses of one run: ``train`` per step (the batch loss), ``eval_steps`` /
    ``train_eval`` / ``test_eval`` on whole splits every few steps."""

    train: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    train_eval: list[float] = field(default_factory=list)
    test_eval: list[float] = field(default_factory=list)
    seconds_per_step: float = 0.0

    @property
    def final_train(self) -> float:
        return self.train_eval[-1]

    @property
    def initial_train(self) -> float:
        return self.train_eval[0]


def seed_start(task: Task, seed: int) -> tuple[dict[str, torch.Tensor], torch.Generator]:
    """The seed's initial parameters and its batch stream: what every run of
    that seed starts from."""
    return task.init(torch.Generator().manual_seed(seed)), torch.Generator().manual_seed(
        10_000 + seed
    )


def start(
    task: Task, make_optimizer: MakeOptimizer, seed: int
) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    """The model at the seed's initialisation, its optimizer and the seed's
    batch stream (:func:`seed_start`)."""
    params, batches = seed_start(task, seed)
    model = task.module_with(params)
    return model, make_optimizer(model), batches


def run(
    task: Task,
    make_optimizer: MakeOptimizer,
    steps: int,
    seed: int,
    eval_every: int = 0,
    schedule: MakeSchedule | None = None,
    tell_loss: bool = True,
) -> Curve:
    """Train ``task`` from the seed's initialisation for ``steps`` steps,
    with the learning rate following ``schedule`` over them if given. A
    learned optimizer is told each step's loss (``step(loss=...)``) unless
    ``tell_loss`` is False, as in a loop that calls ``step()`` alone."""
    model, opt, batches = start(task, make_optimizer, seed)
    scheduler = schedule(opt, steps) if schedule is not None else None
    eval_every = eval_every or max(1, steps // 20)
    curve = Curve()
    # Nets that read the loss use it; other optimizers are never given one.
    tells_loss = tell_loss and isinstance(opt, LearnedOptimizer)

    def evaluate(step: int) -> None:
        params = dict(model.named_parameters())
        curve.eval_steps.append(step)
        curve.train_eval.append(_finite(task.eval_loss(params, "train").item()))
        curve.test_eval.append(_finite(task.eval_loss(params, "test").item()))

    evaluate(0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = task.sample_batch(batches)
        opt.zero_grad()
        loss = task.loss(dict(model.named_parameters()), (x, y))
        loss.backward()
        if tells_loss:
            opt.step(loss=loss)
        else:
            opt.step()
        if scheduler is not None:
            scheduler.step()
        curve.train.append(_finite(loss.item()))
        if step % eval_every == 0 or step == steps:
            evaluate(step)
        if not math.isfinite(curve.train[-1]):
            break
    curve.seconds_per_step = (time.perf_counter() - t0) / max(1, len(curve.train))
    while len(curve.train) < steps:  # diverged: the rest is infinite
        curve.train.append(math.inf)
    if curve.eval_steps[-1] != steps:
        curve.eval_steps.append(steps)
        curve.train_eval.append(math.inf)
        curve.test_eval.append(math.inf)
    return curve


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def adam(lr: float) -> MakeOptimizer:
    return lambda model: torch.optim.Adam(model.parameters(), lr=lr)


def sgdm(lr: float) -> MakeOptimizer:
    return lambda model: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay of the learning rate from its value to 0 over the run."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)


def tune(
    task: Task,
    make: Callable[[float], MakeOptimizer],
    steps: int,
    seeds: Sequence[int],
    grid: Sequence[float] = ADAM_GRID,
    schedule: MakeSchedule | None = None,
    on_run: Callable[[], None] | None = None,
) -> tuple[float, dict[float, float]]:
    """The grid point with the lowest mean final training loss over seeds, and
    every grid point's score; ``on_run()`` is called after each run (a
    progress bar)."""
    scores = {}
    for lr in grid:
        finals = []
        for s in seeds:
            finals.append(run(task, make(lr), steps, s, schedule=schedule).final_train)
            if on_run is not None:
                on_run()
        scores[lr] = sum(finals) / len(finals)
    best = min(scores, key=lambda lr: (scores[lr], lr))
    return best, scores
