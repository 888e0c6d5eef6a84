"""Rank a meta-training run's snapshots on a suite, to pick one to ship.

``python -m meta_train ... --snapshot-every N`` keeps the net every N outer
steps under ``RUN/snapshots/``. This runs every snapshot (and the run's final
``optimizer.pt``) through :mod:`benchmarks.compare` at the horizon only and
ranks them by the bar's speed measure: the mean over tasks of the steps each
needs to reach tuned Adam's loss at the horizon and stay there, as a
fraction of it (a task where it never does counts as ``NEVER``; a run that
dips below and climbs back has not reached it); ties go to the geometric mean of
their loss over Adam's (learned_optimization's normalised loss), each task's
ratio clipped to [1/CLIP, CLIP], then to the tasks they win, then to the
unclipped mean. Both are bounded per task because a task whose loss nears 0
makes its ratio swing by orders of magnitude between neighbouring snapshots
(``mlp-gmm16-gelu``: 0.00 to 8.9), and an unclipped mean over tasks then
ranks by that task alone. Pick on a suite of tasks the family samples
(``validation``), never on the held-out suite the pick is then judged on:

    python -m benchmarks.compare --suite validation --steps 200 --seeds 3 --factors 1 \\
        --out runs/val-base                                  # tuned Adam, once
    python -m benchmarks.snapshots runs/my-nfn --baselines-from runs/val-base \\
        --out runs/val-my-nfn

Writes the comparison's files to ``--out`` and ``ranking.md`` (the table it
prints); the best snapshot's path is its last line. Several runs (one per
seed, say) are ranked together, to pick the one net to ship among them;
``--set`` applies to every net as in :mod:`benchmarks.compare`:

    python -m benchmarks.snapshots runs/a-s46 runs/a-s47 --every 1500 --set nf_scale=0 \\
        --baselines-from runs/val-base --out runs/val-a

On a suite whose tasks have step budgets (``validation-real``), the nets run
through :mod:`benchmarks.real` instead, each task at its budget and told it
(``--steps`` does not apply), and rank the same way on the final
loss over tuned Adam's (the better of constant and cosine) and the steps to
reach it (fractions of the budget):

    python -m benchmarks.real --suite validation-real --seeds 2 --out runs/val-real-base
    python -m benchmarks.snapshots runs/nfn-real --suite validation-real --seeds 2 \\
        --baselines-from runs/val-real-base --out runs/val-real-nfn

``--hide-budget`` runs them there without ``total_steps``, to rank how a
net does when a user does not give it the run's length; ``--hide-loss``
without each step's loss, for a net that reads it. A net trained on
``real-broad-family`` is picked on ``validation-broad`` (validation-real
and three small-family tasks), so that a pick cannot trade one side away.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import lopt
from benchmarks import compare, real
from lopt import cli
from tasks import TASK_STEPS, get_suite

SNAPSHOT = re.compile(r"optimizer-(\d+)\.pt$")
CLIP = 2.0  # a task's loss ratio counts within [1 / CLIP, CLIP]
NEVER = 2.0  # steps to Adam's loss (fractions of the horizon) of a run that never gets there


def snapshots(
    run: Path, every: int = 0, max_step: int | None = None, min_step: int = 0
) -> list[tuple[str, Path]]:
    """``(label, path)`` of a run's snapshots in step order, then its final
    ``optimizer.pt`` (labelled ``final``) when it exists; a snapshot of the
    final's own step is left out (the same net twice). ``every``: only the
    snapshots whose step is a multiple of it (0: all), for a long run with
    many of them. ``max_step``: only the snapshots up to that outer step (the
    final net too, if it is no later), to pick from two runs at the same
    meta-training budget when one ran further. ``min_step``: only the
    snapshots (and final net) from that outer step on."""
    if every < 0:
        raise SystemExit(f"--every must be >= 0, got {every}")
    if max_step is not None and max_step < 0:
        raise SystemExit(f"--max-step must be >= 0, got {max_step}")
    if min_step < 0 or (max_step is not None and min_step > max_step):
        raise SystemExit(f"--min-step must be >= 0 and at most --max-step, got {min_step}")
    found = []
    for p in (run / "snapshots").glob("optimizer-*.pt"):
        m = SNAPSHOT.search(p.name)
        step = int(m.group(1)) if m else None
        in_range = min_step <= step <= (max_step if max_step is not None else step) if m else False
        if in_range and (not every or step % every == 0):
            found.append((step, p))
    final = run / "optimizer.pt"
    last = lopt.load(final)[1].get("outer_steps") if final.exists() else None
    keep_final = final.exists() and (max_step is None or (last is not None and last <= max_step))
    keep_final = keep_final and (last is None or last >= min_step)
    out = [(f"step{step}", p) for step, p in sorted(found) if not (keep_final and step == last)]
    if keep_final:
        out.append(("final", final))
    return out


def _entries(summary: dict, label: str) -> list[dict]:
    return [e for (_task, opt), e in summary["per_task"].items() if opt == label]


def clipped_geomean(ratios: list[float], clip: float | None = CLIP) -> float:
    """Geometric mean of loss ratios, each clipped to [1 / clip, clip] (None:
    not clipped); inf when one is not finite."""
    logs = []
    for r in ratios:
        if not (math.isfinite(r) and r > 0):
            logs.append(math.inf)
            continue
        logs.append(math.log(r if clip is None else min(max(r, 1 / clip), clip)))
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


def score(summary: dict, label: str, clip: float | None = CLIP) -> float:
    """Geometric mean over tasks of the loss at the horizon over Adam's, each
    clipped to [1 / clip, clip] (None: not clipped); inf when a run is not
    finite."""
    return clipped_geomean([e["normalised"] for e in _entries(summary, label)], clip)


def speed(summary: dict, label: str) -> float:
    """Mean over tasks of the steps to Adam's loss at the horizon, as a
    fraction of the horizon (NEVER where it is not reached)."""
    steps = [min(e["steps_to_baseline"], NEVER) for e in _entries(summary, label)]
    return sum(steps) / len(steps) if steps else math.nan


def ranking(summary: dict, labels: list[str]) -> list[tuple[str, float, float, int, int]]:
    """``(label, speed, score, tasks beaten at 1x, diverged)``, best first."""
    rows = []
    for label in labels:
        c = summary["counts"][label]
        rows.append(
            (label, speed(summary, label), score(summary, label), c["beats@1x"], c["diverged"])
        )
    # A net that is not finite on some task goes last, whatever its speed;
    # the unclipped ratio only breaks what is still tied.
    return sorted(
        rows,
        key=lambda r: (not math.isfinite(r[2]), r[1], r[2], -r[3], score(summary, r[0], None)),
    )


def budget_ranking(summary: dict, labels: list[str]) -> list[tuple[str, float, float, int, int]]:
    """:func:`ranking` on a :func:`benchmarks.real.summarise` summary:
    ``(label, speed, clipped geometric-mean ratio, tasks beaten, diverged)``."""
    rows = []
    for label in labels:
        entries = [e for e in summary["per_task"].values() if label in e["ratio"]]
        fracs = [min(e["steps_to_adam"][label], NEVER) for e in entries]
        c = summary["counts"][label]
        rows.append((
            label,
            sum(fracs) / len(fracs) if fracs else math.nan,
            clipped_geomean([e["ratio"][label] for e in entries]),
            c["beats"],
            c["diverged"],
        ))  # fmt: skip
    return sorted(rows, key=lambda r: (not math.isfinite(r[2]), r[1], r[2], -r[3]))


def with_budgets(suite: str) -> bool:
    """Whether every task of ``suite`` has a step budget (``tasks.TASK_STEPS``)."""
    try:
        return all(name in TASK_STEPS for name in get_suite(suite))
    except KeyError:
        return False


def main(argv: list[str] | None = None) -> Path:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.snapshots",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "run",
        type=Path,
        nargs="+",
        help="a meta_train --out folder; several (e.g. one per seed) are ranked together, "
        "each net labelled FOLDER-LABEL",
    )
    p.add_argument("--suite", default="validation", help="the tasks to rank on (validation)")
    p.add_argument("--steps", type=int, default=200, help="the horizon (200)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--baselines-from", type=Path, default=None, metavar="DIR")
    p.add_argument(
        "--every",
        type=int,
        default=0,
        metavar="N",
        help="rank only the snapshots of steps that are multiples of N, and the final net",
    )
    p.add_argument(
        "--max-step",
        type=int,
        default=None,
        metavar="N",
        help="rank only the snapshots up to outer step N (and the final net if it is no "
        "later): two runs picked at the same meta-training budget",
    )
    p.add_argument(
        "--min-step",
        type=int,
        default=0,
        metavar="N",
        help="rank only the snapshots (and final net) from outer step N on",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="as in benchmarks.compare, on every net (e.g. nf_scale=0)",
    )
    p.add_argument(
        "--hide-budget",
        action="store_true",
        help="on a suite with step budgets, run the nets without total_steps",
    )
    p.add_argument(
        "--hide-loss",
        action="store_true",
        help="on a suite with step budgets, run the nets without each step's loss",
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for flag, on in (("--hide-budget", args.hide_budget), ("--hide-loss", args.hide_loss)):
        if on and not with_budgets(args.suite):
            p.error(f"{flag} needs a suite whose tasks have step budgets, not {args.suite}")
    if len({r.name for r in args.run}) != len(args.run):
        raise SystemExit(f"runs must have distinct folder names, got {[str(r) for r in args.run]}")
    found = []
    for run in args.run:
        nets = snapshots(run, args.every, args.max_step, args.min_step)
        if not nets:
            raise SystemExit(
                f"{run}: no snapshots/optimizer-*.pt and no optimizer.pt "
                "(meta-train with --snapshot-every N)"
            )
        found += [(f"{run.name}-{lab}" if len(args.run) > 1 else lab, p) for lab, p in nets]
    budgets = with_budgets(args.suite)
    weights = [f"{label}={path}" for label, path in found]
    base = [] if args.baselines_from is None else ["--baselines-from", str(args.baselines_from)]
    labels = [label for label, _ in found]
    if budgets:
        cmd = ["--suite", args.suite, "--seeds", str(args.seeds), "--out", str(args.out)]
        extra = ["--set", *args.set] if args.set else []
        extra += ["--hide-budget"] if args.hide_budget else []
        extra += ["--hide-loss"] if args.hide_loss else []
        summary = real.main([*cmd, *base, *extra, "--weights", *weights])
        ranked = budget_ranking(summary, labels)
        where = "each task at its step budget" + (", not told it" if args.hide_budget else "")
        where += ", not told the loss" if args.hide_loss else ""
    else:
        cmd = ["--suite", args.suite, "--steps", str(args.steps), "--seeds", str(args.seeds)]
        cmd += ["--factors", "1", "--out", str(args.out), "--weights", *weights, *base]
        if args.set:
            cmd += ["--set", *args.set]
        summary = compare.main(cmd)
        ranked = ranking(summary, labels)
        where = f"horizon {args.steps}"
    paths = dict(found)
    lines = [
        f"## Snapshots of {', '.join(map(str, args.run))} on {args.suite} "
        f"({where}, {args.seeds} seeds)",
        "",
        "| snapshot | steps to Adam's loss (mean) | loss / Adam's (geometric mean, "
        f"clipped to [{1 / CLIP:g}, {CLIP:g}]) | beats Adam | diverged |",
        "|---|---|---|---|---|",
    ]
    n = summary["counts"][ranked[0][0]]["tasks"]
    lines += [f"| {lab} | {v:.3f}x | {s:.3f} | {b}/{n} | {d} |" for lab, v, s, b, d in ranked]
    best = paths[ranked[0][0]]
    lines += ["", f"best: {best}"]
    text = "\n".join(lines) + "\n"
    (args.out / "ranking.md").write_text(text)
    print(text)
    return best


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.snapshots")
