"""The outer loop: estimator -> meta-gradient -> clipped Adam step, with
logging, atomic checkpoints, exact resume and ``torch.distributed``.

Under ``torch.distributed`` (``torchrun``) each rank unrolls its slice of the
population (contiguous pairs); the slices' sums of gradient estimates and
meta-losses are all-reduced, so every rank takes the same step. Noise, tasks
and data come from counter-based generators (:func:`meta_train.problems.rng`),
identical on every rank, so N processes compute what one would.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
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
        snapshot_fn, snapshot_every: ``snapshot_fn(trainer)`` every
            ``snapshot_every`` outer steps on rank 0, after the checkpoint
            (the command line keeps the net there, to pick one later).
        per_task: ES and PES only: divide each outer step's estimate by the
            root mean square of its pairs' scaled loss differences ``(L+ -
            L-) / 2 sigma``. Every pair of a step runs the same task, so each
            task drawn moves the net by a like amount: under the log
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
        snapshot_fn: Callable[[MetaTrainer], None] | None = None,
        snapshot_every: int = 0,
        per_task: bool = False,
        meta_lr_decay_steps: int = 0,
        meta_lr_final: float = 0.1,
    ) -> None:
        if pairs < 1:
            raise ValueError(f"population must be >= 1, got {pairs}")
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
        self.theta = torch.nn.Parameter(problem.initial_theta())
        if frozen is not None and frozen.shape != self.theta.shape:
            raise ValueError(f"frozen mask {tuple(frozen.shape)} != {tuple(self.theta.shape)}")
        self.frozen = None if frozen is None else frozen.to(self.theta.device)
        self.meta_opt = torch.optim.Adam([self.theta], lr=meta_lr)
        self.meta_lr, self.meta_lr_decay_steps = meta_lr, meta_lr_decay_steps
        self.meta_lr_final = meta_lr_final
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every, self.eval_every, self.eval_fn = checkpoint_every, eval_every, eval_fn
        self.snapshot_every, self.snapshot_fn = snapshot_every, snapshot_fn
        self.config = dict(config or {})
        self.step = 0  # outer steps taken
        self.resets = 0  # inner runs started (the task counter)
        self.inner_t = 0  # inner steps into the current inner runs
        self.inner = None
        self.est_state: dict = {}
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

    def _reset_inner(self) -> None:
        n = self.hi - self.lo
        self.inner = self.problem.reset(self.resets, self.estimator.trajectories(n))
        self.est_state = self.estimator.init_state(n, self.theta.numel(), self.theta.detach())
        self.resets += 1
        self.inner_t = 0

    def outer_step(self) -> dict[str, Any]:
        """One truncation for the population and one meta-optimizer step."""
        if self.inner is None or self.inner_t >= self.problem.horizon_of(self.resets - 1):
            self._reset_inner()
        theta = self.theta.detach()
        noise = None
        if self.estimator.needs_noise:
            g = rng(self.seed, "noise", self.step)
            noise = torch.randn(self.pairs, theta.numel(), generator=g)[self.lo : self.hi]
            noise = noise.to(theta.device)
            if self.frozen is not None:
                noise = noise.masked_fill(self.frozen, 0.0)
        t0 = time.perf_counter()
        counter = self.step

        def unroll(thetas, inner):
            return self.problem.unroll(thetas, inner, counter)

        est, self.inner, self.est_state = self.estimator.estimate(
            theta, noise, self.est_state, self.inner, unroll
        )
        sums = torch.cat(
            [
                est.grad_sum.reshape(-1),
                torch.stack(
                    [
                        est.loss_sum.to(theta),
                        est.grad_sq_sum.to(theta),
                        theta.new_tensor(float(est.count)),
                        theta.new_tensor(float(est.trajectories)),
                        est.diff_sq_sum.to(theta),
                    ]
                ),
            ]
        )
        losses_mean = est.losses.detach().mean(0)
        if self.world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(losses_mean)
            losses_mean /= self.world_size
        grad_sum, (loss_sum, sq_sum, count, trajs, diff_sq) = sums[:-5], sums[-5:]
        grad = grad_sum / count
        if self.per_task:
            # 0 / floor = 0 when no pair's loss moved, not 0 / 0.
            scale = (diff_sq / count).sqrt().clamp(min=1e-12)
            grad, sq_sum = grad / scale, sq_sum / scale.square()
        if self.frozen is not None:  # backprop estimates them; drop them
            grad = grad.masked_fill(self.frozen, 0.0)
        meta_loss = (loss_sum / trajs).item()
        grad_norm = grad.norm().item()
        # Variance of the mean estimate (trace): per-unit second moment minus
        # the squared mean, over the number of units.
        variance = ((sq_sum / count - grad.square().sum()) / count).item()
        elapsed = time.perf_counter() - t0
        k = self.problem.truncation
        self.inner_steps += int(trajs.item()) * k
        self.train_seconds += elapsed
        finite = math.isfinite(grad_norm) and math.isfinite(meta_loss)
        lr = self.meta_lr_at(self.step)
        if finite:
            self.meta_opt.zero_grad()
            for group in self.meta_opt.param_groups:
                group["lr"] = lr
            self.theta.grad = grad * min(1.0, self.clip / max(grad_norm, 1e-12))
            self.meta_opt.step()
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
        self.inner_t += k
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
        base = (self.resets - 1) * stride + m["inner_t"]
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
        """Everything a resumed run needs (the whole population's inner state,
        gathered from every rank)."""
        local = {"inner": self.inner, "est_state": self.est_state}
        local = torch.utils._pytree.tree_map(lambda x: x.detach().cpu(), local)
        if self.world_size > 1:
            parts: list = [None] * self.world_size
            dist.all_gather_object(parts, local)
            if self.inner is not None:
                inners = [p["inner"] for p in parts]
                if self.estimator.trajectories(1) == 2:  # global order: all +, then all -
                    halves = [inner_size(i) // 2 for i in inners]
                    pos = [index_inner(i, slice(0, h)) for i, h in zip(inners, halves)]
                    neg = [index_inner(i, slice(h, 2 * h)) for i, h in zip(inners, halves)]
                    inners = pos + neg
                local = {
                    "inner": cat_inner(inners),
                    "est_state": cat_inner([p["est_state"] for p in parts])
                    if self.est_state
                    else {},
                }
        return {
            "format": "lopt-meta-train",
            "version": 1,
            "config": self.config,
            "theta": self.theta.detach().cpu(),
            "theta_layout": self.problem.theta_layout(),
            "meta_opt": self.meta_opt.state_dict(),
            "step": self.step,
            "resets": self.resets,
            "inner_t": self.inner_t,
            "skipped": self.skipped,
            "inner_steps": self.inner_steps,
            "train_seconds": self.train_seconds,
            "pairs": self.pairs,
            **local,
        }

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
        if sd.get("est_state"):
            sd["est_state"] = {k: move(v) for k, v in sd["est_state"].items()}

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
        if sd["theta"].numel() != self.theta.numel() or (
            "theta_layout" in sd and sd["theta_layout"] != self.problem.theta_layout()
        ):
            sd = self._relaid(sd)
        device = self.theta.device
        with torch.no_grad():
            self.theta.copy_(sd["theta"].to(device))
        self.meta_opt.load_state_dict(sd["meta_opt"])
        self.problem.load_theta(self.theta.detach())
        self.step, self.resets, self.inner_t = sd["step"], sd["resets"], sd["inner_t"]
        self.skipped, self.inner_steps = sd["skipped"], sd["inner_steps"]
        self.train_seconds = float(sd.get("train_seconds", 0.0))
        if sd["inner"] is None:
            self.inner = None
            return
        n = self.hi - self.lo
        # Rebuild the current task (counter resets - 1); the state comes from the file.
        self.problem.reset(self.resets - 1, self.estimator.trajectories(n))
        mult = self.estimator.trajectories(1)
        if mult == 2:  # ES / PES: members [lo, hi) and [N + lo, N + hi)
            half = sd["inner"]
            pos = index_inner(half, slice(self.lo, self.hi))
            neg = index_inner(half, slice(self.pairs + self.lo, self.pairs + self.hi))
            inner = cat_inner([pos, neg])
        else:
            inner = index_inner(sd["inner"], slice(self.lo, self.hi))
        to = lambda x: x.to(device)  # noqa: E731
        self.inner = torch.utils._pytree.tree_map(to, inner)
        self.est_state = torch.utils._pytree.tree_map(
            lambda x: to(x[self.lo : self.hi]), sd["est_state"]
        )

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
