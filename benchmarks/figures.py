"""Loss-curve figures shared by the benchmarks."""

from __future__ import annotations

import math
import statistics
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on a file backend, or None (with a note) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures (pip install 'lopt[plots]')")
        return None
    return plt


def loss_curves(
    curves: dict, tasks: list[str], optimizers: list[str], path: Path, marks: dict | None = None
) -> None:
    """One panel per task: each optimizer's loss (``curves[(task, opt)]``:
    ``{step: [loss per seed]}``) against the step, the mean with the seeds'
    range shaded, on a log scale; ``marks[task]`` draws a vertical line
    there (a horizon)."""
    plt = pyplot()
    if plt is None:
        return
    cols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for opt in optimizers:
            c = curves.get((task, opt))
            if not c:
                continue
            steps = sorted(c)
            ax.plot(steps, [statistics.fmean(c[s]) for s in steps], label=opt)
            ax.fill_between(
                steps, [min(c[s]) for s in steps], [max(c[s]) for s in steps], alpha=0.2
            )
        if marks and task in marks:
            ax.axvline(marks[task], color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("training loss (mean, min-max over seeds)")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
