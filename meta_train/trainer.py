"""The outer loop: estimator -> meta-gradient -> clipped Adam step, with
logging, atomic checkpoints, exact resume and ``torch.distributed``.

An outer step advances ``tasks_per_step`` inner runs at once, each on its
own task (a task slot), the population's pairs split between them, so one
step's meta-gradient averages over several tasks and a stage of a few hundred
outer steps sees many more tasks than its inner runs are long. Inner runs
start from one global counter, so which tasks a run trains on does not depend
on how it is split over processes.

Under ``torch.distributed`` (``torchrun``) each rank unrolls its slice of the
population (contiguous pairs, in every slot they touch); the slices' sums of
gradient estimates and meta-losses are all-reduced, so every rank takes the
same step. Noise, tasks and data come from counter-based generators
(:func:`meta_train.problems.rng`), identical on every rank, so N processes
compute what one would.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from lopt.checkpoint import atomic_save, unreadable
from meta_train.estimators import Estimator, inner_size
from meta_train.problems import TruncatedProblem, rng
from meta_train.stopping import StopAtStepEnd, StopRequests
from meta_train.unroll import cat_inner, index_inner

CHECKPOINT = "checkpoint.pt"
VERSION = 2  # 2: one entry per task slot under "slots"; 1: one inner run at top level


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pair_slice(pairs: int, rank: int, size: int) -> tuple[int, int]:
    """The contiguous range of pairs a rank unrolls."""
    if pairs < size:
        raise ValueError(f"population of {pairs} pairs cannot be split over {size} processes")
    lo = rank * pairs // size
    return lo, (rank + 1) * pairs // size


def slot_pairs(pairs: int, slots: int) -> list[tuple[int, int]]:
    """The contiguous range of pairs each task slot's inner run holds."""
    return [(j * pairs // slots, (j + 1) * pairs // slots) for j in range(slots)]


@dataclass
class TaskSlot:
    """One inner run an outer step advances: the pairs ``[start, stop)`` of
    the population it holds, the part ``[lo, hi)`` this process unrolls (none
    when equal), and the run: its task counter (None before the first), the
    inner steps it takes, those taken, its inner and estimator state."""

    start: int
    stop: int
    lo: int
    hi: int
    counter: int | None = None
    end: int = 0
    inner_t: int = 0
    inner: Any = None
    est_state: dict = field(default_factory=dict)

    @property
    def held(self) -> bool:
        return self.hi > self.lo


def without_inner_runs(sd: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint whose inner runs are dropped: a resume starts fresh ones
    (new tasks) at the same outer step."""
    sd = dict(sd)
    if sd.get("version", 1) == 1:
        sd["inner"], sd["est_state"] = None, {}
    else:
        sd["slots"] = [
            {**slot, "counter": None, "end": 0, "inner_t": 0, "inner": None, "est_state": {}}
            for slot in sd["slots"]
        ]
    return sd


class MetaTrainer:
    """Meta-train ``problem``'s parameters with ``estimator``.

    Args:
        problem: the truncated meta-objective (see :mod:`meta_train.problems`).
        estimator: ES, PES or truncated backprop (:mod:`meta_train.estimators`).
        pairs: population size: antithetic pairs for ES / PES (2 trajectories
            each), trajectories for backprop.
        meta_lr, clip: Adam learning rate and gradient-norm clipping.
        seed: the noise stream (tasks and data come from the problem's seed).
        out_dir: TensorBoard logs and checkpoints go here (None: neither).
        checkpoint_every: outer steps between checkpoints (0: only at the end).
        eval_fn, eval_every: a periodic evaluation ``eval_fn(trainer) -> dict``
            whose numbers are logged under ``eval/``.
        config: saved with checkpoints.
        frozen: a bool mask over the meta-parameters held fixed: they are
            not perturbed and not stepped (None: all are trained).
        gains: a positive factor per meta-parameter (None: all 1). The outer
            loop trains ``theta / gains``: a meta-parameter of gain ``G`` is
            perturbed ``G`` times as far (ES, PES) and moves ``G`` times as
            far per outer step. A meta-parameter whose effect per unit is
            small (the learned schedule's weights, which truncated unrolls
            score only through the runs that reach a run's end) then moves
            within hundreds of outer steps, not thousands; its share of
            every pair's loss difference grows with ``G`` too, and so does
            the noise it adds to the others' estimates.
        snapshot_fn, snapshot_every: ``snapshot_fn(trainer)`` every
            ``snapshot_every`` outer steps on rank 0, after the checkpoint
            (the command line keeps the net there, to pick one later).
        per_task: ES and PES only: divide each task slot's estimate by the
            root mean square of its pairs' scaled loss differences ``(L+ -
            L-) / 2 sigma``, then average the slots. Every pair of a slot runs
            the same task, so each task drawn moves the net by a like amount: under the log
            meta-loss a run that nears loss 0 (an MLP that fits its data, a
            ResNet) otherwise gives differences ten to a hundred times a
            language model's, and sets the shared rates alone.
        meta_lr_decay_steps, meta_lr_final: cosine-decay the learning rate
            from ``meta_lr`` at outer step 0 to ``meta_lr_final * meta_lr``
            at outer step ``meta_lr_decay_steps``, constant after it (0: no
            decay). A function of the outer step alone, so a resumed run
            follows it exactly; ES and PES estimates are noisy, and a net
            taken at a late step otherwise still moves by a full step's
            worth between neighbouring snapshots.
        tasks_per_step: inner runs (task slots) each outer step advances,
            each on its own task with ``pairs / tasks_per_step`` of the pairs.
            A slot's inner run resets when it has run its horizon, taking the
            next task counter; slot j's first run stops at ``(tasks_per_step
            - j) / tasks_per_step`` of its horizon so the slots do not all
            reset at the same outer step (the net is told the whole horizon:
            that run is only cut short).
    """

    def __init__(
        self,
        problem: TruncatedProblem,
        estimator: Estimator,
        pairs: int = 8,
        meta_lr: float = 1e-3,
        clip: float = 1.0,
        seed: int = 0,
        out_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 50,
        eval_fn: Callable[[MetaTrainer], dict[str, float]] | None = None,
        eval_every: int = 0,
        config: dict[str, Any] | None = None,
        frozen: torch.Tensor | None = None,
        gains: torch.Tensor | None = None,
        snapshot_fn: Callable[[MetaTrainer], None] | None = None,
        snapshot_every: int = 0,
        per_task: bool = False,
        meta_lr_decay_steps: int = 0,
        meta_lr_final: float = 0.1,
        tasks_per_step: int = 1,
    ) -> None:
        if pairs < 1:
            raise ValueError(f"population must be >= 1, got {pairs}")
        if not 1 <= tasks_per_step <= pairs:
            raise ValueError(
                f"tasks_per_step must be in [1, population ({pairs})]: each task needs a pair, "
                f"got {tasks_per_step}"
            )
        if not meta_lr > 0 or not clip > 0:
            raise ValueError(f"meta_lr and clip must be > 0, got {meta_lr}, {clip}")
        if meta_lr_decay_steps < 0 or not 0 <= meta_lr_final <= 1:
            raise ValueError(
                "meta_lr_decay_steps must be >= 0 and meta_lr_final in [0, 1], got "
                f"{meta_lr_decay_steps}, {meta_lr_final}"
            )
        if per_task and not estimator.needs_noise:
            raise ValueError(
                f"per_task scales the pairs of ES or PES; {estimator.name} has no pairs"
            )
        self.problem, self.estimator = problem, estimator
        self.per_task = per_task
        self.pairs, self.clip, self.seed = pairs, clip, seed
        self.rank, self.world_size = world()
        self.lo, self.hi = pair_slice(pairs, self.rank, self.world_size)
        self.slots = []
        for start, stop in slot_pairs(pairs, tasks_per_step):
            lo = min(max(self.lo, start), stop)
            self.slots.append(TaskSlot(start, stop, lo, max(min(self.hi, stop), lo)))
        self.theta = torch.nn.Parameter(problem.initial_theta())
        if frozen is not None and frozen.shape != self.theta.shape:
            raise ValueError(f"frozen mask {tuple(frozen.shape)} != {tuple(self.theta.shape)}")
        self.frozen = None if frozen is None else frozen.to(self.theta.device)
        if gains is not None:
            if gains.shape != self.theta.shape:
                raise ValueError(f"gains {tuple(gains.shape)} != {tuple(self.theta.shape)}")
            if not (torch.isfinite(gains).all() and (gains > 0).all()):
                raise ValueError("gains must be finite and > 0")
            gains = gains.to(self.theta)
        self.gains = gains
        self.meta_opt = torch.optim.Adam([self.theta], lr=meta_lr)
        self.meta_lr, self.meta_lr_decay_steps = meta_lr, meta_lr_decay_steps
        self.meta_lr_final = meta_lr_final
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every, self.eval_every, self.eval_fn = checkpoint_every, eval_every, eval_fn
        self.snapshot_every, self.snapshot_fn = snapshot_every, snapshot_fn
        self.config = dict(config or {})
        self.step = 0  # outer steps taken
        self.resets = 0  # inner runs started, all slots (the task counter)
        self._task_names: list[str | None] = []  # by counter, filled as tasks_drawn asks
        self.skipped = 0
        self.inner_steps = 0  # inner steps run, all trajectories, all ranks
        # Wall time in outer steps, over the first process and every resume.
        self.train_seconds = 0.0
        self._writer = None

    # ------------------------------------------------------------ one step
    def meta_lr_at(self, step: int) -> float:
        """The outer loop's learning rate at outer step ``step``."""
        n = self.meta_lr_decay_steps
        if n == 0:
            return self.meta_lr
        cos = 0.5 * (1.0 + math.cos(math.pi * min(step, n) / n))
        return self.meta_lr * (self.meta_lr_final + (1.0 - self.meta_lr_final) * cos)

    # Slot 0's run, where a single inner run used to be kept.
    @property
    def inner(self):
        return self.slots[0].inner

    @property
    def inner_t(self) -> int:
        return self.slots[0].inner_t

    @property
    def est_state(self) -> dict:
        return self.slots[0].est_state

    @property
    def tasks_per_step(self) -> int:
        return len(self.slots)

    def _reset_slot(self, j: int) -> None:
        """Start slot ``j``'s next inner run on the next task counter."""
        s, k = self.slots[j], self.problem.truncation
        c, first = self.resets, s.counter is None
        self.resets += 1
        end = self.problem.horizon_of(c)
        if first and j:  # stagger the slots' resets over the outer steps
            end = max(k, end * (len(self.slots) - j) // len(self.slots) // k * k)
        s.counter, s.end, s.inner_t = c, end, 0
        s.inner, s.est_state = None, {}
        if s.held:
            n = s.hi - s.lo
            s.inner = self.problem.reset(c, self.estimator.trajectories(n), slot=j)
            s.est_state = self.estimator.init_state(n, self.theta.numel(), self.theta.detach())

    def tasks_drawn(self) -> list[str]:
        """The names of the tasks of every inner run started so far, in
        counter order (empty for a problem without named tasks)."""
        # A counter's task never changes: name each once, not on every save.
        names = self._task_names
        del names[self.resets :]  # a checkpoint loaded over a longer run
        names += [self.problem.task_name(c) for c in range(len(names), self.resets)]
        return [n for n in names if n is not None]

    def outer_step(self) -> dict[str, Any]:
        """One truncation for every task slot and one meta-optimizer step."""
        for j, s in enumerate(self.slots):  # in slot order: counters agree on every rank
            if s.counter is None or s.inner_t >= s.end:
                self._reset_slot(j)
        theta = self.theta.detach()
        noise = None
        if self.estimator.needs_noise:
            g = rng(self.seed, "noise", self.step)
            noise = torch.randn(self.pairs, theta.numel(), generator=g)[self.lo : self.hi]
            noise = noise.to(theta.device)
            if self.frozen is not None:
                noise = noise.masked_fill(self.frozen, 0.0)
            if self.gains is not None:
                noise = noise * self.gains
        t0 = time.perf_counter()
        n_slots, k = len(self.slots), self.problem.truncation
        # Per slot: gradient sum, meta-loss sum, squared norms, pairs,
        # trajectories, squared loss differences; all-reduced at once.
        rows = theta.new_zeros(n_slots, theta.numel() + 5)
        slot0_losses = theta.new_zeros(k + 1)  # slot 0's per-step loss sum, trajectories
        for j, s in enumerate(self.slots):
            if not s.held:
                continue
            counter = self.step * n_slots + j  # the data of this slot's truncation

            def unroll(thetas, inner, counter=counter, j=j):
                return self.problem.unroll(thetas, inner, counter, slot=j)

            part = None if noise is None else noise[s.lo - self.lo : s.hi - self.lo]
            est, s.inner, s.est_state = self.estimator.estimate(
                theta, part, s.est_state, s.inner, unroll
            )
            rows[j, :-5] = est.grad_sum.reshape(-1)
            rows[j, -5:] = torch.stack(
                [
                    est.loss_sum.to(theta),
                    est.grad_sq_sum.to(theta),
                    theta.new_tensor(float(est.count)),
                    theta.new_tensor(float(est.trajectories)),
                    est.diff_sq_sum.to(theta),
                ]
            )
            if j == 0:
                slot0_losses[:k] = est.losses.detach().sum(0).to(theta)
                slot0_losses[k] = est.trajectories
        if self.world_size > 1:
            dist.all_reduce(rows)
            dist.all_reduce(slot0_losses)
        losses_mean = slot0_losses[:k] / slot0_losses[k]
        grad_sums = rows[:, :-5]
        loss_sums, sq_sums, counts, trajs, diff_sq = rows[:, -5:].unbind(1)
        count, trajs = counts.sum(), trajs.sum()
        if self.per_task:
            # 0 / floor = 0 when no pair's loss moved, not 0 / 0.
            scale = (diff_sq / counts).sqrt().clamp(min=1e-12)
            grad = (grad_sums / counts[:, None] / scale[:, None]).mean(0)
            sq_sum = (sq_sums / scale.square()).sum()
        else:
            grad = grad_sums.sum(0) / count
            sq_sum = sq_sums.sum()
        if self.frozen is not None:  # backprop estimates them; drop them
            grad = grad.masked_fill(self.frozen, 0.0)
        meta_loss = (loss_sums.sum() / trajs).item()
        # Variance of the mean estimate (trace): per-unit second moment minus
        # the squared mean, over the number of units.
        variance = ((sq_sum / count - grad.square().sum()) / count).item()
        if self.gains is not None:
            # The gradient in theta / gains: ES and PES estimated it along
            # noise times the gains, so it is theirs over the gains; backprop's
            # is d/d theta, times the gains by the chain rule.
            grad = grad / self.gains if self.estimator.needs_noise else grad * self.gains
        grad_norm = grad.norm().item()
        elapsed = time.perf_counter() - t0
        self.inner_steps += int(trajs.item()) * k
        self.train_seconds += elapsed
        finite = math.isfinite(grad_norm) and math.isfinite(meta_loss)
        lr = self.meta_lr_at(self.step)
        if finite:
            self.meta_opt.zero_grad()
            for group in self.meta_opt.param_groups:
                group["lr"] = lr
            self.theta.grad = grad * min(1.0, self.clip / max(grad_norm, 1e-12))
            before = self.theta.detach().clone() if self.gains is not None else None
            self.meta_opt.step()
            if before is not None:  # Adam's step was one of theta / gains
                with torch.no_grad():
                    self.theta.copy_(before + (self.theta - before) * self.gains)
            self.problem.load_theta(self.theta.detach())
        else:
            self.skipped += 1
        metrics = {
            "step": self.step,
            "meta_loss": meta_loss,
            "grad_norm": grad_norm,
            "grad_variance": variance,
            "skipped": not finite,
            "inner_steps_per_s": int(trajs.item()) * k / max(elapsed, 1e-9),
            "inner_t": self.inner_t,
            "meta_lr": lr,
            "inner_losses": losses_mean.tolist(),
        }
        for s in self.slots:
            s.inner_t += k
        self.step += 1
        return metrics

    # ------------------------------------------------------------ the loop
    def train(
        self, outer_steps: int, progress: bool = True, stops: StopRequests | None = None
    ) -> list[dict[str, Any]]:
        """Run until ``outer_steps`` outer steps have been taken in all (so a
        resumed run continues to the same total). Ctrl-C, SIGINT or SIGTERM
        stop it at the end of the outer step it is in (a second signal: at
        once): a checkpoint is saved, then ``KeyboardInterrupt`` raised. Over
        several processes a stop at once saves none (the last periodic one
        stays): the ranks may be in different collectives then, and a
        checkpoint's gather would wait for ever.
        ``stops``: requests the caller collects already (the command line
        opens one before building the run); None: this call opens one."""
        history = []
        bar = tqdm(
            total=outer_steps,
            initial=self.step,
            desc="meta-train",
            disable=not progress or self.rank != 0,
            dynamic_ncols=True,
        )
        try:
            with StopRequests() if stops is None else nullcontext(stops) as stops:
                while self.step < outer_steps:
                    if self._stop_requested(stops):
                        raise StopAtStepEnd(stops.name or "a signal on another rank")
                    m = self.outer_step()
                    history.append(m)
                    self._log(m)
                    bar.update(1)
                    bar.set_postfix(
                        meta_loss=f"{m['meta_loss']:.4f}",
                        inner_steps_s=f"{m['inner_steps_per_s']:.0f}",
                    )
                    if (
                        self.eval_fn is not None
                        and self.eval_every
                        and self.step % self.eval_every == 0
                    ):
                        self._log_eval(self.eval_fn(self))
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self.save_checkpoint()
                    if (
                        self.snapshot_fn is not None
                        and self.snapshot_every
                        and self.step % self.snapshot_every == 0
                        and self.rank == 0
                    ):
                        self.snapshot_fn(self)
        except KeyboardInterrupt as e:
            if isinstance(e, StopAtStepEnd) or self.world_size == 1:
                self.save_checkpoint()
                said = f"checkpoint saved in {self.out_dir}"
            else:
                said = f"stopped at once: {self.out_dir} keeps its last periodic checkpoint"
            if self.rank == 0:
                print(f"\ninterrupted at outer step {self.step}; {said}")
            raise
        finally:
            bar.close()
        self.save_checkpoint()
        if self._writer:
            self._writer.flush()
        return history

    def _stop_requested(self, stops: StopRequests) -> bool:
        """Whether any rank got a stop signal: all ranks stop at the same
        step, or the others would wait in the next all-reduce for ever."""
        stop = stops.signum is not None
        if self.world_size > 1:
            flag = self.theta.new_tensor([float(stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def _log(self, m: dict[str, Any]) -> None:
        w = self.writer
        if w is None:
            return
        s = m["step"]
        for key in ("meta_loss", "grad_norm", "grad_variance", "inner_steps_per_s", "meta_lr"):
            if math.isfinite(m[key]):
                w.add_scalar(f"meta/{key}", m[key], s)
        w.add_scalar("meta/skipped_total", self.skipped, s)
        stride = self.problem.horizon_max or self.problem.horizon  # runs may end early
        base = self.slots[0].counter * stride + m["inner_t"]
        for i, loss in enumerate(m["inner_losses"]):
            w.add_scalar("inner/loss", loss, base + i)

    def _log_eval(self, results: dict[str, float]) -> None:
        w = self.writer
        if w is not None:
            for key, value in results.items():
                w.add_scalar(f"eval/{key}", value, self.step)

    @property
    def writer(self):
        if self._writer is None and self.out_dir is not None and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn(
                    "TensorBoard is not installed (pip install 'lopt[meta]'): no tb/ logs; "
                    "the checkpoints and optimizer.pt are written as usual",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._writer = False
            else:
                self._writer = SummaryWriter(str(self.out_dir / "tb"))
        return self._writer or None

    def close(self) -> None:
        if self._writer:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (every slot's inner state, the whole
        population's, gathered from every rank)."""

        def cpu(part):
            return torch.utils._pytree.tree_map(lambda x: x.detach().cpu(), part)

        local = [
            cpu({"inner": s.inner, "est_state": s.est_state}) if s.held else None
            for s in self.slots
        ]
        if self.world_size > 1:
            parts: list = [None] * self.world_size
            dist.all_gather_object(parts, local)
            local = [
                self._joined([p[j] for p in parts if p[j] is not None])
                for j in range(len(self.slots))
            ]
        slots = [
            {"counter": s.counter, "end": s.end, "inner_t": s.inner_t, **part}
            for s, part in zip(self.slots, local)
        ]
        return {
            "format": "lopt-meta-train",
            "version": VERSION,
            "config": self.config,
            "theta": self.theta.detach().cpu(),
            "theta_layout": self.problem.theta_layout(),
            "meta_opt": self.meta_opt.state_dict(),
            "step": self.step,
            "resets": self.resets,
            "skipped": self.skipped,
            "inner_steps": self.inner_steps,
            "train_seconds": self.train_seconds,
            "pairs": self.pairs,
            "tasks_per_step": len(self.slots),
            "slots": slots,
        }

    def _joined(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """One slot's inner and estimator state from its ranks' parts (in
        rank order, so in pair order)."""
        inners = [p["inner"] for p in parts]
        if inners[0] is None:
            return {"inner": None, "est_state": {}}
        if self.estimator.trajectories(1) == 2:  # global order: all +, then all -
            halves = [inner_size(i) // 2 for i in inners]
            pos = [index_inner(i, slice(0, h)) for i, h in zip(inners, halves)]
            neg = [index_inner(i, slice(h, 2 * h)) for i, h in zip(inners, halves)]
            inners = pos + neg
        states = [p["est_state"] for p in parts]
        return {"inner": cat_inner(inners), "est_state": cat_inner(states) if states[0] else {}}

    def _version_2(self, sd: dict[str, Any]) -> dict[str, Any]:
        """A version-1 checkpoint (one inner run) as one task slot."""
        if sd.get("version", 1) != 1:
            return sd
        started = sd["inner"] is not None
        slot = {
            "counter": sd["resets"] - 1 if started else None,
            "end": self.problem.horizon_of(sd["resets"] - 1) if started else 0,
            "inner_t": sd["inner_t"] if started else 0,
            "inner": sd["inner"],
            "est_state": sd["est_state"],
        }
        rest = {k: v for k, v in sd.items() if k not in ("inner", "est_state", "inner_t")}
        return {**rest, "version": VERSION, "tasks_per_step": 1, "slots": [slot]}

    def _relaid(self, sd: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint whose net had other meta-parameters (a newer version
        of the net adds NF-layer weights for new roles): every entry moved to
        its name's place in this run's theta, in theta, the meta-optimizer's
        moments and the estimator's state; names the checkpoint lacks start
        at 0 (no term, as the old net had none), names this net lacks go.
        The layout comes from the checkpoint, or for files written before
        it was stored, from the run's ``optimizer.pt`` (the same net)."""
        old = sd.get("theta_layout")
        if old is None:
            net_file = None if self.out_dir is None else self.out_dir / "optimizer.pt"
            if net_file is None or not net_file.is_file():
                raise ValueError(
                    f"{self.out_dir}: the checkpoint's meta-parameters ({sd['theta'].numel()}) "
                    f"do not fit this net ({self.theta.numel()}) and no optimizer.pt says "
                    "what they were"
                )
            state = torch.load(net_file, map_location="cpu", weights_only=True)["state_dict"]
            old = [(k, v.numel()) for k, v in state.items()]
        if sum(n for _, n in old) != sd["theta"].numel():
            raise ValueError(f"{self.out_dir}: the checkpoint's layout does not match its theta")
        starts, at = {}, 0
        for name, n in old:
            starts[name] = (at, n)
            at += n
        src, kept, added = [], 0, []
        for name, n in self.problem.theta_layout():
            if name in starts and starts[name][1] == n:
                src.append(torch.arange(starts[name][0], starts[name][0] + n))
                kept += 1
            else:
                src.append(torch.full((n,), -1))
                added.append(name)
        src = torch.cat(src)
        have = src >= 0
        dropped = sorted(set(starts) - {name for name, _ in self.problem.theta_layout()})
        old_n = sd["theta"].numel()

        def move(x):
            if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != old_n:
                return x
            out = x.new_zeros(*x.shape[:-1], src.numel())
            out[..., have] = x[..., src[have].to(x.device)]
            return out

        sd = dict(sd)
        sd["theta"] = move(sd["theta"])
        meta_opt = {**sd["meta_opt"], "state": {
            k: {kk: move(vv) for kk, vv in v.items()} for k, v in sd["meta_opt"]["state"].items()
        }}  # fmt: skip
        sd["meta_opt"] = meta_opt
        sd["slots"] = [
            {**slot, "est_state": {k: move(v) for k, v in slot["est_state"].items()}}
            for slot in sd["slots"]
        ]

        def few(names: list[str]) -> str:
            return ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")

        warnings.warn(
            f"{self.out_dir}: the net's meta-parameters changed since this checkpoint: "
            f"{kept} tensors carried over, {len(added)} new at 0 ({few(added)}), "
            f"{len(dropped)} dropped ({few(dropped)})",
            stacklevel=3,
        )
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("format") != "lopt-meta-train":
            raise ValueError(f"{self.out_dir}: not an lopt meta-training checkpoint")
        if sd["pairs"] != self.pairs:
            raise ValueError(f"checkpoint has a population of {sd['pairs']}, this run {self.pairs}")
        sd = self._version_2(sd)
        if sd["tasks_per_step"] != len(self.slots):
            raise ValueError(
                f"checkpoint has tasks_per_step={sd['tasks_per_step']}, this run {len(self.slots)}"
            )
        if sd["theta"].numel() != self.theta.numel() or (
            "theta_layout" in sd and sd["theta_layout"] != self.problem.theta_layout()
        ):
            sd = self._relaid(sd)
        device = self.theta.device
        with torch.no_grad():
            self.theta.copy_(sd["theta"].to(device))
        self.meta_opt.load_state_dict(sd["meta_opt"])
        self.problem.load_theta(self.theta.detach())
        self.step, self.resets = sd["step"], sd["resets"]
        self.skipped, self.inner_steps = sd["skipped"], sd["inner_steps"]
        self.train_seconds = float(sd.get("train_seconds", 0.0))
        to = lambda x: x.to(device)  # noqa: E731
        for j, (s, saved) in enumerate(zip(self.slots, sd["slots"])):
            s.counter, s.end, s.inner_t = saved["counter"], saved["end"], saved["inner_t"]
            s.inner, s.est_state = None, {}
            if saved["inner"] is None or not s.held:
                continue
            # Rebuild the slot's task; its state comes from the file.
            self.problem.reset(s.counter, self.estimator.trajectories(s.hi - s.lo), slot=j)
            a, b, size = s.lo - s.start, s.hi - s.start, s.stop - s.start
            if self.estimator.trajectories(1) == 2:  # ES / PES: members [a, b), [size + a, ...)
                full = saved["inner"]
                pos = index_inner(full, slice(a, b))
                neg = index_inner(full, slice(size + a, size + b))
                inner = cat_inner([pos, neg])
            else:
                inner = index_inner(saved["inner"], slice(a, b))
            s.inner = torch.utils._pytree.tree_map(to, inner)
            part = {k: v[a:b] for k, v in saved["est_state"].items()}
            s.est_state = torch.utils._pytree.tree_map(to, part)

    def save_checkpoint(self) -> Path | None:
        """Atomically write ``out_dir/checkpoint.pt`` (rank 0)."""
        if self.out_dir is None:
            return None
        sd = self.state_dict()  # every rank takes part in the gather
        if self.rank != 0:
            return None
        path = self.out_dir / CHECKPOINT
        atomic_save(sd, path)
        return path

    def resume(self, path: str | os.PathLike | None = None) -> None:
        path = Path(path) if path is not None else self.out_dir / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {path}")
        try:
            # The run's own file (inner state and generators are not plain
            # data): it is trusted as the run folder is.
            sd = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(unreadable(path, e)) from None
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: not an lopt meta-training checkpoint")
        self.load_state_dict(sd)
