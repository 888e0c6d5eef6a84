"""How much of an NFN net's update its NF-layer makes.

An NFN net is a per-entry net plus an NF-layer (:class:`lopt.NFNNet`);
``nf_scale=0`` ablates the layer. When a meta-trained NFN is level with its
ablation, either the layer learned nothing useful or it barely acts. This
tells the two apart: it trains each task with the net (the same
initialisation and batches as :mod:`benchmarks.compare`, seed 0) and, every
step, computes on the same optimizer state the update ``u``, the update
``u0`` with the NF-layer off and the base ``b`` (Adam's or the orthogonalised
direction alone: the learned term off). Over the whole weight space it
reports the NF-layer's share of the update, ``|u - u0| / |u0|``, and of the
learned term, ``|u - u0| / |u0 - b|``, at a few steps and as the mean over
the run:

    python -m benchmarks.nf_share --weights nfn-ortho-v2 nfn-broad \\
        --tasks mlp-mnist1d-wide cnn-digits-wide --steps 200 --out runs/nf-share
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

import lopt
from benchmarks.compare import weights_label
from lopt import cli, functional
from tasks import get_task
from tasks.runs import seed_start


@contextmanager
def nf_off(net: lopt.NFNNet) -> Iterator[None]:
    """The net with its NF-layer off (``nf_scale`` 0) inside the block."""
    scale = net.nf_scale
    net.nf_scale = 0.0
    try:
        yield
    finally:
        net.nf_scale = scale


@contextmanager
def learned_term_off(net: lopt.NFNNet) -> Iterator[None]:
    """The net with its learned term off (step multiplier 0): the base
    direction alone, inside the block."""
    saved = net.log_step_mult.detach().clone()
    with torch.no_grad():
        net.log_step_mult.fill_(-math.inf)
    try:
        yield
    finally:
        with torch.no_grad():
            net.log_step_mult.copy_(saved)


def _norm(xs: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((x.double() ** 2).sum()) for x in xs))


def nf_share(net: lopt.NFNNet, task_name: str, steps: int, seed: int = 0) -> dict:
    """Train ``task_name`` for ``steps`` steps with ``net`` and return, per
    step, the NF-layer's share of the update and of the learned term, and the
    final whole-split training loss."""
    if not isinstance(net, lopt.NFNNet):
        raise TypeError(f"{type(net).__name__} has no NF-layer: nf_share reads an NFN net")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    task = get_task(task_name)
    params, batches = seed_start(task, seed)
    names = list(params)
    ps = [params[n].detach() for n in names]
    state = functional.init(ps)
    share_update, share_learned = [], []
    for _ in range(steps):
        leaves = [p.clone().requires_grad_() for p in ps]
        loss = task.loss(dict(zip(names, leaves)), task.sample_batch(batches))
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            with nf_off(net):
                u0, _ = functional.update(net, task.spec, None, grads, state, ps)
            with nf_off(net), learned_term_off(net):
                base, _ = functional.update(net, task.spec, None, grads, state, ps)
            u, state = functional.update(net, task.spec, None, grads, state, ps)
            nf = _norm([a - b for a, b in zip(u, u0)])
            share_update.append(nf / max(_norm(u0), 1e-30))
            share_learned.append(nf / max(_norm([a - b for a, b in zip(u0, base)]), 1e-30))
            ps = [p + x for p, x in zip(ps, u)]
    final = task.eval_loss(dict(zip(names, ps)), "train").item()
    return {"of_update": share_update, "of_learned": share_learned, "final_loss": final}


def markdown(results: dict, at: list[int]) -> str:
    head = " | ".join(f"step {s}" for s in at)
    lines = [
        "## The NF-layer's share: |u - u(nf_scale=0)| / |u(nf_scale=0)| "
        "(and / |learned term|), whole weight space",
        "",
        f"| net | task | {head} | mean over the run | final train loss |",
        "|---|---|" + "---|" * len(at) + "---|---|",
    ]
    for (label, task), r in results.items():
        cells = " | ".join(
            f"{r['of_update'][s - 1]:.3f} ({r['of_learned'][s - 1]:.3f})" for s in at
        )
        mean_u, mean_l = statistics.fmean(r["of_update"]), statistics.fmean(r["of_learned"])
        lines.append(
            f"| {label} | {task} | {cells} | {mean_u:.3f} ({mean_l:.3f}) | {r['final_loss']:.4g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.nf_share",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "--weights", nargs="+", required=True, help="NFN nets: [LABEL=]NAME or checkpoint path"
    )
    p.add_argument(
        "--tasks", nargs="+", default=["mlp-mnist1d-wide", "cnn-digits-wide", "mlp-digits-wide"]
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50, help="steps between the table's columns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for nf_share.md and .json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        raise SystemExit(f"--steps and --every must be positive, got {args.steps}, {args.every}")
    nets = {}
    for spec in args.weights:
        label, path = weights_label(spec)
        try:
            net, _ = lopt.load(path)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--weights {spec}: {e}") from e
        if not isinstance(net, lopt.NFNNet):
            raise SystemExit(f"--weights {spec}: a {type(net).__name__}, which has no NF-layer")
        nets[label] = net
    for t in args.tasks:
        get_task(t)  # an unknown name fails here, before any work
    at = sorted({*range(args.every, args.steps + 1, args.every), 1, args.steps})
    results = {}
    jobs = [(label, t) for label in nets for t in args.tasks]
    for label, t in tqdm(jobs, desc="nets x tasks", disable=args.no_progress):
        results[(label, t)] = nf_share(nets[label], t, args.steps, args.seed)
    text = markdown(results, at)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "nf_share.md").write_text(text)
        payload = {
            "command": "python -m benchmarks.nf_share "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "steps": args.steps,
            "seed": args.seed,
            "results": [{"net": k[0], "task": k[1], **v} for k, v in results.items()],
        }
        (args.out / "nf_share.json").write_text(json.dumps(payload, indent=1))
    return results


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.nf_share")
