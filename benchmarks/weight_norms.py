"""How an optimizer moves a network's weights: norms and radial steps over time.

A learned optimizer meta-trained on short unrolls can learn to grow the
weights (larger logits lower the loss quickly), which later destabilises deep
networks. For each optimizer this trains one task from the same
initialisation on the same batches (as :mod:`benchmarks.compare` does) and
reports, every ``--every`` steps: the whole-split training loss, the norm of
each weight (tensors of 2 or more axes, in model order), the mean over the
window of ``cos(step, weight)``, the radial share of each step (0: the step
is orthogonal to the weight; > 0: it grows it), and the mean relative step
``|step| / |weight|`` per weight: how far each layer moves per step, to set
a learned optimizer's per-layer step sizes (its width factor) beside
Adam's, and the largest ``|step| / |weight|`` of any weight in the window:
a single step that moves a layer by a large part of its norm, which a mean
over the window hides. For a learned optimizer it also reports, per weight,
the mean ratio of the learned term to Adam's part of the step
(``|update - base| / |base|``, :meth:`lopt.LearnedOptimizer.base_updates`):
the scale for ``adam_cap``, and whether the learned term shrinks as Adam's
step does.

    python -m benchmarks.weight_norms --task mlp-mnist1d-deep --steps 1000 \\
        --weights nfn-small mlp-small --adam-lr 1e-2 --out runs/weight-norms
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import lopt
from benchmarks import compare
from lopt import cli
from tasks import Task, get_task
from tasks.runs import start


def trace(
    task: Task,
    make: Callable[[nn.Module], torch.optim.Optimizer],
    steps: int,
    every: int,
    seed: int = 0,
) -> list[dict]:
    """One run's rows: ``step``, ``loss`` (whole training split), ``norms``
    (one per weight), ``radial`` (mean cos(step, weight) per weight over
    the steps since the previous row), ``rel_step`` (mean |step| /
    |weight| per weight over the same steps), ``max_rel_step`` (the
    largest |step| / |weight| of any weight in any of those steps) and, for
    a learned optimizer, ``learned_share`` (mean |learned term| / |base
    part| per weight over the same steps; empty for others)."""
    model, opt, batches = start(task, make, seed)
    learned = isinstance(opt, lopt.LearnedOptimizer)
    weights = [p for p in model.parameters() if p.dim() >= 2]
    is_weight = [p.dim() >= 2 for p in model.parameters()]
    radial = torch.zeros(len(weights))
    rel_step = torch.zeros(len(weights))
    share = torch.zeros(len(weights))
    max_rel = 0.0
    count = 0
    rows = []

    def row(step: int) -> None:
        params = dict(model.named_parameters())
        rows.append(
            {
                "step": step,
                "loss": task.eval_loss(params, "train").item(),
                "norms": [w.detach().norm().item() for w in weights],
                "radial": (radial / max(count, 1)).tolist(),
                "rel_step": (rel_step / max(count, 1)).tolist(),
                "max_rel_step": max_rel,
                "learned_share": (share / max(count, 1)).tolist() if learned else [],
            }
        )

    row(0)
    for step in range(1, steps + 1):
        before = [w.detach().clone() for w in weights]
        opt.zero_grad()
        loss = task.loss(dict(model.named_parameters()), task.sample_batch(batches))
        loss.backward()
        if learned:
            bases = [b for b, w in zip(opt.base_updates(), is_weight) if w]
        opt.step()
        deltas = [w.detach() - b for w, b in zip(weights, before)]
        if learned:
            share += torch.stack(
                [(d - b).norm() / b.norm().clamp(min=1e-30) for d, b in zip(deltas, bases)]
            )
        radial += torch.stack(
            [F.cosine_similarity(d.flatten(), b.flatten(), dim=0) for d, b in zip(deltas, before)]
        )
        rel = torch.stack([d.norm() / b.norm().clamp(min=1e-30) for d, b in zip(deltas, before)])
        rel_step += rel
        max_rel = max(max_rel, rel.max().item())
        count += 1
        if step % every == 0 or step == steps:
            row(step)
            radial.zero_()
            rel_step.zero_()
            share.zero_()
            max_rel = 0.0
            count = 0
    return rows


def markdown(task: str, results: dict[str, list[dict]]) -> str:
    lines = [
        f"## {task}: weight norms and cos(step, weight) per layer",
        "",
        "| optimizer | step | train loss | weight norms | mean cos(step, weight) since last row "
        "| mean abs(step) / abs(weight) since last row | largest since last row "
        "| mean abs(learned) / abs(Adam's part) since last row |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in results.items():
        for r in rows:
            norms = ", ".join(f"{n:.1f}" for n in r["norms"])
            radial = ", ".join(f"{c:.3f}" for c in r["radial"]) if r["step"] else "-"
            rel = ", ".join(f"{c:.1e}" for c in r["rel_step"]) if r["step"] else "-"
            top = f"{r['max_rel_step']:.2g}" if r["step"] else "-"
            share = ", ".join(f"{c:.2g}" for c in r["learned_share"])
            share = share if r["step"] and share else "-"
            lines.append(
                f"| {label} | {r['step']} | {r['loss']:.3f} | {norms} | {radial} | {rel} | {top} "
                f"| {share} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.weight_norms",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--task", default="mlp-mnist1d-deep")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=250, help="steps between rows (250)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--weights", nargs="*", default=[], help="learned optimizers ([LABEL=]NAME_OR_PATH)"
    )
    p.add_argument(
        "--adam-lr", type=float, default=1e-2, help="Adam's learning rate (1e-2; 0: no Adam)"
    )
    p.add_argument(
        "--set", nargs="+", default=[], metavar="NAME=VALUE", help="as in benchmarks.compare"
    )
    p.add_argument("--out", type=Path, default=None, help="also write weight_norms.md here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        raise SystemExit(f"--steps and --every must be >= 1, got {args.steps}, {args.every}")
    task = get_task(args.task)
    optimizers = []
    if args.adam_lr > 0:
        optimizers.append(
            (f"adam {args.adam_lr:g}", lambda m: torch.optim.Adam(m.parameters(), lr=args.adam_lr))
        )
    if args.weights:
        optimizers += compare.learned_all(args.weights, compare.parse_overrides(args.set))
    if not optimizers:
        raise SystemExit("nothing to run: give --weights or an --adam-lr above 0")
    results = {
        label: trace(task, make, args.steps, args.every, args.seed) for label, make in optimizers
    }
    text = markdown(args.task, results)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "weight_norms.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.weight_norms")
