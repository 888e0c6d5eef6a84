"""Two learned optimizers head to head, paired by task and seed.

``benchmarks.compare`` counts the tasks each optimizer wins against tuned
Adam, from losses averaged over seeds. Whether one learned optimizer beats
another (the NFN against the per-parameter MLP meta-trained with the same
budget) is a paired question: every seed of a task starts both from the same
initialisation and feeds them the same batches, so the two final losses of
one (task, seed) differ only by the optimizer. This reads compare runs and,
at a multiple of the horizon, reports per task the geometric mean over seeds
of A's loss over B's, with A's wins; overall, A's wins over all (task, seed)
pairs with an exact two-sided sign test, the same over tasks (a task's sign
is that of its mean log ratio), and the geometric mean ratio with a 95%
interval (seeds resampled within each task: the tasks are the suite's, the
seeds a sample; a pair count and a ratio can disagree, one task's large
ratios outweighing many small wins, and the interval says whether the
ratio is told apart from 1):

    python -m benchmarks.head_to_head runs/compare-nfn runs/compare-mlp \\
        --a nfn --b mlp --out runs/nfn-vs-mlp.md

The runs may be several ``--out`` folders of compare (one per optimizer,
with the same baselines), read as one as ``compare --merge`` does, or runs
on other seeds with other multiples of the horizon (a ``--factors 1`` run
on more seeds): their pairs are pooled at the multiples every run has.

A recipe is judged by more than one meta-training seed. Give ``--a`` (or
``--b``, or both, pairing them in order) several times, one net per
meta-training seed, and the pairs of every pair of nets are pooled: the
table lists each pair of nets, and the pooled ratio gets two intervals,
one with the nets fixed (seeds resampled within each net's tasks) and one
that also resamples the nets, the meta-training seeds (a few nets make
that interval coarse, but it is the one that speaks for the recipe):

    python -m benchmarks.head_to_head runs/compare-* --a nfn-s43 --a nfn-s44 \\
        --a nfn-s45 --b mlp-start
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.compare import merge_runs, same_loss
from lopt import cli


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the probability, were each pair a fair coin,
    of a split at least as uneven as ``wins`` to ``losses`` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def ratio_interval(
    task_logs: list[list[float]], level: float = 0.95, resamples: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """A ``level`` percentile-bootstrap interval for the geometric mean ratio
    ``exp(mean of every log ratio)``: each resample redraws every task's log
    ratios from that task's own (stratified), so the task mix stays the
    suite's. Seeded: the same numbers give the same interval. NaNs when
    there are no ratios. (:func:`recipe_interval` of one net.)"""
    return recipe_interval([task_logs], level, resamples, seed)


def recipe_interval(
    net_task_logs: list[list[list[float]]],
    level: float = 0.95,
    resamples: int = 4000,
    seed: int = 0,
) -> tuple[float, float]:
    """As :func:`ratio_interval`, for log ratios of several nets (one list of
    per-task lists each, e.g. one net per meta-training seed): each resample
    first redraws the nets with replacement, then every drawn net's tasks'
    seeds as :func:`ratio_interval` does. The spread between nets widens it."""
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1, got {level}, {resamples}")
    nets = [[np.asarray(x, dtype=np.float64) for x in tl if len(x)] for tl in net_task_logs]
    nets = [n for n in nets if n]
    if not nets:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    sums = np.zeros((len(nets), resamples))
    counts = np.array([sum(len(x) for x in n) for n in nets], dtype=np.float64)
    for i, net in enumerate(nets):
        for x in net:
            sums[i] += x[rng.integers(0, len(x), size=(resamples, len(x)))].sum(1)
    drawn = rng.integers(0, len(nets), size=(resamples, len(nets)))
    means = sums[drawn, np.arange(resamples)[:, None]].sum(1) / counts[drawn].sum(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return math.exp(lo), math.exp(hi)


def paired_losses(rows, a: str, b: str, step: int) -> dict[str, dict[int, tuple[float, float]]]:
    """Per task and seed, (A's, B's) whole-split training loss at ``step``.
    Only (task, seed) pairs both optimizers ran are kept."""
    at: dict = defaultdict(dict)
    for task, opt, seed, s, split, loss in rows:
        if split == "train" and s == step and opt in (a, b):
            at[(task, seed)][opt] = loss
    out: dict = defaultdict(dict)
    for (task, seed), v in sorted(at.items()):
        if a in v and b in v:
            out[task][seed] = (v[a], v[b])
    return dict(out)


def relabel(rows, aliases: dict[str, str]) -> list[tuple]:
    """``rows`` with each optimizer label in ``aliases`` replaced by its value:
    one net run under different labels in different runs. A (task, seed,
    step, split) the net has under two labels must have the same loss under
    both (runs are deterministic), else SystemExit."""
    out: dict[tuple, float] = {}
    for task, opt, seed, step, split, loss in rows:
        key = (task, aliases.get(opt, opt), seed, step, split)
        if key in out and not same_loss(out[key], loss):
            names = sorted({key[1], *(x for x, y in aliases.items() if y == key[1])})
            raise SystemExit(
                f"{', '.join(names)} differ on {task} seed {seed} step {step}: not the same net"
            )
        out[key] = loss
    return [(*k, v) for k, v in out.items()]


def _sign(la: float, lb: float) -> int:
    """-1 when A's loss is the lower, 1 when B's, 0 for a tie; a non-finite
    loss loses to a finite one."""
    fa, fb = math.isfinite(la), math.isfinite(lb)
    if fa and fb:
        return (la > lb) - (la < lb)
    return 0 if fa == fb else (1 if not fa else -1)


def _log_ratio(la: float, lb: float) -> float:
    """log(A / B), losses floored at 1e-30 (a loss may reach 0)."""
    return math.log(max(la, 1e-30) / max(lb, 1e-30))


def _geomean(logs: list[float]) -> float:
    return math.exp(statistics.fmean(logs)) if logs else math.nan


def head_to_head(rows, a: str, b: str, step: int) -> dict:
    """The paired comparison of A against B at ``step`` (see the module).
    Wins count every pair; the geometric mean ratios count the pairs where
    both losses are finite (``nonfinite`` says how many are not)."""
    pairs = paired_losses(rows, a, b, step)
    if not pairs:
        opts = sorted({r[1] for r in rows})
        raise ValueError(
            f"no task has train losses of both {a!r} and {b!r} at step {step} "
            f"(optimizers in these runs: {', '.join(opts)})"
        )
    per_task, signs, task_logs = {}, [], []
    for task, seeds in pairs.items():
        sg = [_sign(la, lb) for la, lb in seeds.values()]
        lr = [_log_ratio(*p) for p in seeds.values() if all(map(math.isfinite, p))]
        signs += sg
        task_logs.append(lr)
        per_task[task] = {
            "seeds": len(sg),
            "ratio": _geomean(lr),
            "wins": sg.count(-1),
            "losses": sg.count(1),
            "finite": len(lr),
        }
    logs = [x for lr in task_logs for x in lr]
    wins, losses = signs.count(-1), signs.count(1)
    task_signs = [_task_sign(e) for e in per_task.values()]
    task_wins, task_losses = task_signs.count(-1), task_signs.count(1)
    return {
        "a": a,
        "b": b,
        "step": step,
        "per_task": per_task,
        "pairs": len(signs),
        "wins": wins,
        "losses": losses,
        "nonfinite": len(signs) - len(logs),
        "p_pairs": sign_test(wins, losses),
        "task_wins": task_wins,
        "task_losses": task_losses,
        "p_tasks": sign_test(task_wins, task_losses),
        "ratio": _geomean(logs),
        "ratio_interval": ratio_interval(task_logs),
        "task_logs": task_logs,
    }


def pooled_head_to_head(rows, pairs: list[tuple[str, str]], step: int) -> dict:
    """:func:`head_to_head` of every pair of nets ``(a, b)`` in ``pairs`` at
    ``step`` (``per_pair``), and their (task, seed) pairs pooled: wins, the
    sign test, the geometric mean ratio with ``ratio_interval`` (the nets as
    they are) and ``recipe_interval`` (the nets resampled too)."""
    if not pairs:
        raise ValueError("no pair of nets to compare")
    per = [head_to_head(rows, a, b, step) for a, b in pairs]
    wins, losses = sum(r["wins"] for r in per), sum(r["losses"] for r in per)
    logs = [x for r in per for tl in r["task_logs"] for x in tl]
    return {
        "step": step,
        "per_pair": per,
        "pairs": sum(r["pairs"] for r in per),
        "wins": wins,
        "losses": losses,
        "nonfinite": sum(r["nonfinite"] for r in per),
        "p_pairs": sign_test(wins, losses),
        "ratio": _geomean(logs),
        "ratio_interval": ratio_interval([tl for r in per for tl in r["task_logs"]]),
        "recipe_interval": recipe_interval([r["task_logs"] for r in per]),
    }


def _task_sign(e: dict) -> int:
    """A task's sign: that of its mean log ratio, or, when a loss there is
    not finite, of its pair wins."""
    if e["finite"] == e["seeds"]:
        return (e["ratio"] > 1) - (e["ratio"] < 1)
    return (e["losses"] > e["wins"]) - (e["losses"] < e["wins"])


def markdown(r: dict, factor: int) -> str:
    a, b = r["a"], r["b"]
    lines = [
        f"## {a} against {b} at {factor}x the horizon (step {r['step']}), paired by seed",
        "",
        f"| task | seeds | {a} / {b} (geometric mean) | {a} lower | {b} lower |",
        "|---|---|---|---|---|",
    ]
    for task, e in r["per_task"].items():
        lines.append(f"| {task} | {e['seeds']} | {e['ratio']:.3f} | {e['wins']} | {e['losses']} |")
    lines += [
        "",
        f"- (task, seed) pairs: {a} lower on {r['wins']} of {r['pairs']}, {b} on "
        f"{r['losses']}; sign test p = {r['p_pairs']:.3g}",
        f"- tasks (mean over seeds): {a} lower on {r['task_wins']} of {len(r['per_task'])}, "
        f"{b} on {r['task_losses']}; sign test p = {r['p_tasks']:.3g}",
        f"- geometric mean of {a}'s loss over {b}'s, over the {r['pairs'] - r['nonfinite']} "
        f"pairs where both are finite: {r['ratio']:.3f} (95% interval "
        f"{r['ratio_interval'][0]:.3f}-{r['ratio_interval'][1]:.3f}, seeds resampled within tasks)",
    ]
    return "\n".join(lines) + "\n"


def pooled_markdown(r: dict, factor: int) -> str:
    per = r["per_pair"]
    lines = [
        f"## {len(per)} pairs of nets at {factor}x the horizon (step {r['step']}), "
        "paired by seed, then pooled",
        "",
        "| A | B | pairs | A lower | B lower | A / B (geometric mean, 95% interval) |",
        "|---|---|---|---|---|---|",
    ]
    for e in per:
        lo, hi = e["ratio_interval"]
        lines.append(
            f"| {e['a']} | {e['b']} | {e['pairs']} | {e['wins']} | {e['losses']} | "
            f"{e['ratio']:.3f} ({lo:.3f}-{hi:.3f}) |"
        )
    (lo, hi), (rlo, rhi) = r["ratio_interval"], r["recipe_interval"]
    lines += [
        "",
        f"- pooled (task, seed) pairs: A lower on {r['wins']} of {r['pairs']}, B on "
        f"{r['losses']}; sign test p = {r['p_pairs']:.3g}",
        f"- geometric mean of A's loss over B's, over the {r['pairs'] - r['nonfinite']} pairs "
        f"where both are finite: {r['ratio']:.3f}; 95% interval {lo:.3f}-{hi:.3f} with these "
        f"nets (seeds resampled within tasks), {rlo:.3f}-{rhi:.3f} with the nets resampled too",
    ]
    return "\n".join(lines) + "\n"


def pair_specs(a_specs: list[str], b_specs: list[str]) -> tuple[list[tuple[str, str]], dict]:
    """The pairs of nets ``--a`` and ``--b`` name (in order; one side may
    name a single net, paired with each of the other's) and the aliases
    their ``LABEL,OTHER,...`` forms give. SystemExit on a bad pairing."""
    if len(a_specs) != len(b_specs) and 1 not in (len(a_specs), len(b_specs)):
        raise SystemExit(
            f"--a is given {len(a_specs)} times and --b {len(b_specs)}: give them as often "
            "(paired in order), or one of them once"
        )
    n = max(len(a_specs), len(b_specs))
    aliases: dict[str, str] = {}
    pairs = []
    a_specs = a_specs * n if len(a_specs) == 1 else a_specs
    b_specs = b_specs * n if len(b_specs) == 1 else b_specs
    for sa, sb in zip(a_specs, b_specs):
        (a, *a_al), (b, *b_al) = sa.split(","), sb.split(",")
        if {a, *a_al} & {b, *b_al}:
            raise SystemExit("--a and --b must name two different optimizers")
        for name, al in ((a, a_al), (b, b_al)):
            for x in al:
                if aliases.setdefault(x, name) != name:
                    raise SystemExit(
                        f"{x} is given as another label of both {aliases[x]} and {name}"
                    )
        pairs.append((a, b))
    return pairs, aliases


def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.head_to_head",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("runs", type=Path, nargs="+", help="benchmarks.compare --out folders")
    p.add_argument(
        "--a",
        required=True,
        action="append",
        help="optimizer label A (e.g. the NFN); LABEL,OTHER,... when the same net has other "
        "labels in some of the runs; several times: one net per meta-training seed, pooled",
    )
    p.add_argument(
        "--b",
        required=True,
        action="append",
        help="optimizer label B (e.g. the MLP); the same (given as often as --a, the nets "
        "are paired in order)",
    )
    p.add_argument(
        "--factors",
        type=int,
        nargs="+",
        default=None,
        help="multiples of the horizon (default: every one the runs have)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = p.parse_args(argv)
    pairs, aliases = pair_specs(args.a, args.b)
    # Runs on other seeds may have other multiples (a --factors 1 run on
    # more seeds): pairs are pooled at the multiples every run has.
    rows, meta = merge_runs(args.runs, common_factors=True)
    rows = relabel(rows, aliases)
    factors = args.factors or meta["factors"]
    missing = sorted(set(factors) - set(meta["factors"]))
    if missing:
        raise SystemExit(
            f"--factors {' '.join(map(str, missing))}: not in every run "
            f"(the runs have {' '.join(map(str, meta['factors'])) or 'none'} in common)"
        )
    if len(pairs) == 1:
        compare_at, describe = (lambda step: head_to_head(rows, *pairs[0], step)), markdown
    else:
        compare_at, describe = (
            (lambda step: pooled_head_to_head(rows, pairs, step)),
            pooled_markdown,
        )
    texts, results = [], {}
    for f in factors:
        try:
            results[f] = compare_at(meta["horizon"] * f)
        except ValueError as e:
            raise SystemExit(str(e)) from e
        texts.append(describe(results[f], f))
    text = "\n".join(texts)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.head_to_head")
