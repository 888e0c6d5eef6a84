"""Train a small CNN on scikit-learn's 8x8 digits with an NFN learned optimizer
and with Adam, side by side, in an ordinary PyTorch loop.

    python examples/quickstart.py [--steps 300] [--weights NAME_OR_PATH] [--plot out.png]

By default the optimizer is the recommended shipped, meta-trained NFN (the
README's default net, see Shipped nets), told the run's length
(``total_steps``); ``--weights`` takes another shipped name (``mlp-real``, the
per-parameter baseline) or a checkpoint from ``python -m meta_train``.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.nn import functional as F

import lopt
from lopt import cli
from tasks import get_task


def main() -> None:
    p = cli.ArgumentParser(
        prog="python examples/quickstart.py",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=300)
    default = lopt.checkpoint.RECOMMENDED["NFNNet"]
    shipped = default if default in lopt.pretrained_names() else None
    p.add_argument(
        "--weights",
        default=shipped,
        help=f"a shipped name or a checkpoint path (default: {shipped or 'a fresh net'})",
    )
    p.add_argument("--adam-lr", type=float, default=1e-2)
    p.add_argument("--plot", default=None, help="write a loss plot here (needs matplotlib)")
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps must be a whole number >= 1, got {args.steps}")
    if not args.adam_lr > 0:
        p.error(f"--adam-lr must be > 0, got {args.adam_lr}")
    if args.weights is not None:
        try:
            lopt.load(args.weights)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--weights: {e}")

    task = get_task("cnn-digits")
    torch.manual_seed(0)
    model = task.module_with(task.init(torch.Generator().manual_seed(0)))
    twin = copy.deepcopy(model)
    runs = {
        # LearnedOptimizer takes any shipped net (NFN or MLP); a fresh one is an NFN.
        args.weights or "nfn (fresh)": (
            model,
            lopt.LearnedOptimizer(
                model.parameters(), model=model, weights=args.weights, total_steps=args.steps
            )
            if args.weights
            else lopt.NFNOptimizer(model.parameters(), model=model, weights=None),
        ),
        "adam": (twin, torch.optim.Adam(twin.parameters(), lr=args.adam_lr)),
    }
    x_all, y_all = task.dataset.x_train, task.dataset.y_train
    losses = {k: [] for k in runs}
    g = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        idx = torch.randint(0, len(x_all), (128,), generator=g)
        x, y = x_all[idx], y_all[idx]
        for name, (net, opt) in runs.items():  # the same batch for both
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            if isinstance(opt, lopt.LearnedOptimizer):
                opt.step(loss=loss)  # read by nets that take the loss; torch's Adam takes none
            else:
                opt.step()
            losses[name].append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  " + "  ".join(f"{k} {v[-1]:.4f}" for k, v in losses.items()))
    xt, yt = task.dataset.x_test, task.dataset.y_test
    for name, (net, _) in runs.items():
        with torch.no_grad():
            acc = (net(xt).argmax(1) == yt).float().mean().item()
        print(f"{name}: final train loss {losses[name][-1]:.4f}, test accuracy {acc:.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, v in losses.items():
            plt.plot(v, label=name)
        plt.yscale("log")
        plt.xlabel("step")
        plt.ylabel("training loss (batch)")
        plt.legend()
        plt.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    cli.run(main, "python examples/quickstart.py")
