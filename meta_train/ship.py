"""Ship a meta-trained net: copy a run's ``optimizer.pt`` into
``lopt/pretrained/NAME.pt`` (so ``weights="NAME"`` loads it) and print its
model card.

    python -m meta_train.ship runs/my-nfn my-nfn

The file is checked first (it loads, it is under ``--max-mb``), the recipe
that remakes it goes to ``configs/NAME.json`` (stages, see
:mod:`meta_train.recipes`), and its metadata gains the run's recipe: the
config, every command of the run from ``history.jsonl`` (the first run and
each ``--resume``), outer and inner steps, wall time and machine. A net that
started from another's weights (``--init-from``) also gets the recipe of
every earlier phase, followed through each phase's ``init_from`` back to a
net trained from scratch (``phases``, oldest first; a shipped net's file
carries its own phases, and other files must still be where the runs read
them), so a card holds the whole recipe. The card printed is the
one ``python -m meta_train.cards`` writes to ``docs/cards``."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import lopt
from lopt import cli
from lopt.checkpoint import PRETRAINED_DIR
from lopt.features import LOSS_DECAYS, budget_features, step_features
from lopt.nets import (
    MAX_LOG_SCHEDULE,
    NEURON_STATS,
    ORTHO_SNR_GAIN,
    STAT_POOLS,
    schedule_prior,
)
from meta_train import options
from meta_train.recipes import check as check_recipe
from meta_train.recipes import from_phases, recipe_output

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the repository's recipes
# Where a card reads a net's learned schedule: places t / N in a run of N steps.
SCHEDULE_STEPS = 1000
SCHEDULE_FRACTIONS = (0.01, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0)
# What a phase of a multi-phase recipe keeps of its net's metadata.
PHASE_KEYS = (
    "command", "history", "config", "outer_steps", "inner_steps",
    "train_seconds_total", "machine", "device", "torch", "tasks_drawn",
)  # fmt: skip


def task_kinds(names: list[str]) -> dict[str, int]:
    """How many of ``names`` (task names, e.g. ``lm-text-docs-d34h1l1``)
    fall in each kind (the first two words: ``lm-text``), most first."""
    counts = Counter("-".join(n.split("-")[:2]) for n in names)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _tasks(meta: dict[str, Any]) -> str:
    """The tasks a run's inner runs drew, in words (empty where unrecorded)."""
    drawn = meta.get("tasks_drawn")
    if not drawn:
        return ""
    kinds = ", ".join(f"{kind} {n}" for kind, n in drawn.items())
    return f"* Inner runs: {sum(drawn.values()):,} tasks drawn ({kinds})."


def lineage(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The phases before a net's own run, oldest first: each ``--init-from``
    net's recipe, followed back until a net trained from scratch or a net
    (a shipped one, say) that already carries its phases. Raises
    ``SystemExit`` for an ``init_from`` that is not there: the recipe would
    be incomplete."""
    phases: list[dict[str, Any]] = []
    src = meta.get("config", {}).get("init_from")
    seen: set[str] = set()
    while src and src not in seen:
        seen.add(src)
        if not Path(src).is_file() and src not in lopt.pretrained_names():
            raise SystemExit(
                f"init_from {src!r}: no such file, so the recipe's earlier phases are "
                "unknown (ship from where the runs were trained)"
            )
        m = lopt.load(src)[1]
        phases.append({"from": src, **{k: m[k] for k in PHASE_KEYS if k in m}})
        if m.get("phases"):
            phases.extend(reversed(expand(m["phases"])))
            break
        src = m.get("config", {}).get("init_from")
    return phases[::-1]


def expand(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``phases`` with every ``{"shipped": name}`` entry (files written by
    older versions pointed at a shipped net's card) replaced by that net's
    own phases and run, read from its file while it is shipped."""
    out: list[dict[str, Any]] = []
    for ph in phases:
        if "shipped" not in ph:
            out.append(ph)
            continue
        m = lopt.load(ph["shipped"])[1]
        out += expand(m.get("phases") or [])
        out.append({"from": ph["shipped"], **{k: m[k] for k in PHASE_KEYS if k in m}})
    return out


def _phase_line(i: int, ph: dict[str, Any]) -> str:
    cfg = ph.get("config", {})
    commands = [h["command"] for h in ph.get("history") or [{"command": ph.get("command", "?")}]]
    wall = _wall(ph)
    timed = f"{wall / 60:.0f} min" if wall else "time not recorded"
    horizon = f"{cfg.get('horizon')}" + (f"-{cfg['horizon_max']}" if cfg.get("horizon_max") else "")
    return (
        f"  {i}. `{ph['from']}`: `{cfg.get('family', '?')}`, {cfg.get('estimator', '?').upper()}, "
        f"population {cfg.get('population')}, horizon {horizon}, meta lr {cfg.get('meta_lr')}, "
        f"{ph.get('outer_steps', 0):,} outer steps, "
        f"{timed} on {machine_label(ph.get('machine', '?'))} ({ph.get('device', '?')}, "
        f"torch {ph.get('torch', '?')}): " + "; ".join(f"`{c}`" for c in commands)
    )


def machine_label(*words: str) -> str:
    """The words naming a machine (host, architecture, processor), each said
    once: on some systems ``platform.processor()`` repeats the architecture,
    and runs recorded there read "vm x86_64 x86_64"."""
    said: list[str] = []
    for part in " ".join(words).split():
        if part not in said:
            said.append(part)
    return " ".join(said)


def _meta_loss_terms(cfg: dict) -> str:
    """The meta-loss offset, stay-below rule, ramp and end weight of a config,
    in words (empty when there are none)."""
    offset = cfg.get("meta_loss_offset") or 0
    text = f" of L + {offset:g} L0 (L0 the run's initial loss)" if offset else ""
    weights = []
    ramp = cfg.get("meta_loss_ramp") or 0
    fraction = cfg.get("meta_loss_ramp_fraction") or 0
    if ramp:
        weights.append(f"min(1, t / {ramp})")
    elif fraction:
        weights.append(f"min(1, t / ({fraction:g} N))")
    end = cfg.get("meta_loss_end_weight", 1.0)
    if end < 1.0:
        weights.append(f"(1 - {1 - end:g} t / N)")
    if weights:
        where = " of a run of N steps" if fraction or end < 1.0 else ""
        text += f" weighted by {' '.join(weights)} over inner step t{where}"
    if cfg.get("meta_loss_stay"):
        text += ", each step's loss counted as the highest from it to its truncation's end"
    return text


def _meta_lr(cfg: dict) -> str:
    """The outer loop's learning rate and its decay, in words."""
    text = f"meta lr {cfg.get('meta_lr')}"
    steps = cfg.get("meta_lr_decay_steps") or 0
    if steps:
        final = cfg.get("meta_lr_final", 0.1)
        text += f" cosine-decayed to {final:g}x of it over outer steps 0-{steps}"
    gains = cfg.get("gain") or []
    if gains:
        named = ", ".join(f"`{n}` x{g}" for n, _, g in (item.partition("=") for item in gains))
        text += f" (perturbed and stepped at gains {named})"
    return text


def _per_task(cfg: dict) -> str:
    """The tasks per outer step and the meta-gradient's scaling per task, in
    words (empty for one task, unscaled)."""
    k = cfg.get("tasks_per_step") or 1
    slots = f", {k} tasks per outer step" if k > 1 else ""
    if not cfg.get("per_task"):
        return slots
    if k > 1:
        return (
            f"{slots}, each task's meta-gradient divided by the RMS of its pairs' loss "
            "differences, then averaged"
        )
    return ", each outer step's meta-gradient divided by the RMS of its pairs' loss differences"


def _wall(run: dict[str, Any]) -> float:
    """A run's training seconds: summed over every process (killed ones
    included) when it recorded them, else its processes' wall times."""
    history = run.get("history") or []
    return run.get("train_seconds_total") or sum(h.get("wall_time_s") or 0 for h in history)


def recipe_cost(meta: dict[str, Any]) -> str:
    """What the whole recipe of a net took as it was run, every phase and
    the net's own run: outer and inner steps, and training time by device."""
    runs = [*(meta.get("phases") or []), meta]
    outer = sum(r.get("outer_steps") or 0 for r in runs)
    inner = sum(r.get("inner_steps") or 0 for r in runs)
    minutes: dict[str, float] = {}
    untimed = 0
    for r in runs:
        seconds = _wall(r)
        untimed += not seconds
        device = str(r.get("device") or "?").split(":")[0]
        minutes[device] = minutes.get(device, 0.0) + seconds / 60
    times = " + ".join(f"{m:.0f} min on {d}" for d, m in sorted(minutes.items()))
    return (
        f"{len(runs)} runs, {outer:,} outer steps, {inner:,} inner steps"
        + (" (not counted where unrecorded)" if any("inner_steps" not in r for r in runs) else "")
        + f", training time {times or 'not recorded'}"
        + (f" ({untimed} run{'s' if untimed > 1 else ''} not timed)" if untimed else "")
    )


def _snapshot(meta: dict[str, Any]) -> str:
    """Where a net taken before its recipe's end stands in it."""
    planned, at = meta.get("config", {}).get("outer_steps"), meta.get("outer_steps")
    if not planned or not at or at >= planned:
        return ""
    return f" (the net at outer step {at:,} of the recipe's {planned:,}, kept by --snapshot-every)"


def learned_schedule(
    net: lopt.OptimizerNet,
    total_steps: int = SCHEDULE_STEPS,
    fractions: tuple[float, ...] = SCHEDULE_FRACTIONS,
    prior: bool = False,
) -> list[float]:
    """A budget net's learned schedule (its factor on every update, with the
    loss features at rest) at step ``round(f * total_steps)`` (at least 1)
    of a run told ``total_steps``, for each ``f`` of ``fractions``; with
    ``prior``, the schedule every budget net starts from
    (:func:`~lopt.nets.schedule_prior`), to read how far meta-training
    moved it."""
    out = []
    weight, bias = schedule_prior()
    with torch.no_grad():
        for f in fractions:
            t = torch.tensor(float(max(1, round(f * total_steps))))
            steps_in, budget_in = step_features(t), budget_features(t, total_steps)
            if prior:
                log = weight[0] @ torch.cat([steps_in, budget_in]) + bias[0]
                out.append(log.clamp(max=MAX_LOG_SCHEDULE).exp().item())
            else:
                out.append(net.schedule_scale(steps_in, budget_in).item())
    return out


# The loss features of a run whose loss sits a fraction d below both its
# running averages and at its best, read by anneal_powers.
ANNEAL_DROPS = (0.0, 0.05, 0.2)


def anneal_powers(net: lopt.OptimizerNet) -> list[float]:
    """The power ``g`` on a ``loss_anneal`` net's anneal
    (:meth:`~lopt.OptimizerNet.schedule_scale`) for each drop ``d`` of
    :data:`ANNEAL_DROPS`: the loss features ``(tanh(log(1 - d)),
    tanh(log(1 - d)), 0, 1)``."""
    out = []
    with torch.no_grad():
        for d in ANNEAL_DROPS:
            rel = math.tanh(math.log(1 - d))
            features = torch.tensor([rel] * len(LOSS_DECAYS) + [0.0, 1.0])
            out.append(net.anneal_power(features).item())
    return out


def depth_factors(net: lopt.OptimizerNet, writers: tuple[int, ...] = (2, 4, 6, 8)) -> str:
    """``"2: 1.1, 4: 0.9, ..."``: the depth factor of a net built with
    ``depth_factor=True``, ``exp(residual_log_rate) * n ** -depth_exp``, at
    ``n`` writers of a residual stream (a 1-block ResNet has 2, a 3-layer
    transformer 8)."""
    return ", ".join(f"{n}: {net.depth_log_factor(math.log(n)).exp().item():.3g}" for n in writers)


def model_card(name: str, meta: dict[str, Any], net: lopt.OptimizerNet, size: int) -> str:
    """A markdown model card from a shipped net's metadata."""
    cfg = meta.get("config", {})
    history = meta.get("history") or [
        {"command": meta.get("command", "?"), "outer_steps": meta.get("outer_steps")}
    ]
    wall = _wall({**meta, "history": history})
    tasks = _tasks(meta)
    n_params = sum(p.numel() for p in net.parameters())
    horizon = f"horizon {cfg.get('horizon')} steps"
    if cfg.get("horizon_max"):
        per = "inner step" if cfg.get("horizon_weighting") == "steps" else "run"
        horizon = f"horizon {cfg['horizon']}-{cfg['horizon_max']} steps (log-uniform per {per})"
    phases = meta.get("phases") or []
    lines = [
        f"**`{name}`** ({type(net).__name__}, {n_params:,} meta-parameters, {size / 1024:.0f} KiB)",
        "",
        *(
            [
                f"* Phases 1-{len(phases)} (oldest first; each starts from the net before it):",
                *[_phase_line(i, ph) for i, ph in enumerate(phases, 1)],
                f"* Phase {len(phases) + 1}, this net's run, from `{cfg.get('init_from')}`:",
            ]
            if phases
            else []
        ),
        f"* Trained on: `{cfg.get('family', '?')}`, {horizon}, "
        f"{cfg.get('estimator', '?').upper()} with {cfg.get('population')} antithetic pairs, "
        f"truncation {cfg.get('truncation')}, "
        f"`{cfg.get('meta_loss')}` meta-loss{_meta_loss_terms(cfg)}, "
        f"{_meta_lr(cfg)}{_per_task(cfg)}.",
        f"* Outer steps: {meta.get('outer_steps'):,}{_snapshot(meta)}; "
        f"inner steps: {meta.get('inner_steps', 0):,}; "
        f"training time {wall / 60:.0f} min on {machine_label(meta.get('machine', '?'))} "
        f"({meta.get('device', '?')}, torch {meta.get('torch', '?')}).",
        *([tasks] if tasks else []),
        "* Commands:",
        "",
        "```bash",
        *[h["command"] for h in history],
        "```",
        "",
        *(
            [
                f"* Recipe: `python -m meta_train --config configs/{name}.json --out runs/{name}` "
                "runs every phase above in order, one stage each, from the net the stage "
                "before wrote; the commands above are the runs as they were first made.",
                f"* The whole recipe as run: {recipe_cost(meta)}.",
            ]
            if (CONFIGS / f"{name}.json").is_file()
            else []
        ),
        f"* Learned scalars: lr {net.log_lr.exp().item():.4g}, "
        f"step_mult {net.log_step_mult.exp().item():.3g}, "
        f"fan_in_exp {net.fan_in_exp.item():.3f}"
        + (
            "; input layers get the width factor"
            if net.rule.width_factor_on_input_layers
            else "; input layers keep width factor 1"
        )
        + (
            "; learned term tangent to weight rows"
            if net.rule.learned_term_tangent
            else "; learned term free to change weight rows' norms"
        )
        + (
            "; reads the step budget (total_steps) and multiplies every update by a "
            "learned schedule"
            if net.reads_budget
            else ""
        )
        + (
            "; reads the training loss (step(loss=...) or a closure), as ratios to its "
            "running averages and its best, in its trunk and as a brake on its schedule"
            + (" and to time its anneal" if net.has_loss_anneal else "")
            if net.reads_loss
            else ""
        )
        + ".",
    ]
    if net.reads_budget:
        at = ", ".join(f"{f:g}" for f in SCHEDULE_FRACTIONS)
        lines.append(
            f"* Learned schedule, the factor on every update in a run told {SCHEDULE_STEPS:,} "
            f"steps, at t / N = {at}: "
            + ", ".join(f"{v:.3g}" for v in learned_schedule(net))
            + "; the schedule it started from: "
            + ", ".join(f"{v:.3g}" for v in learned_schedule(net, prior=True))
            + "."
        )
    if net.has_loss_anneal:
        lines.append(
            "* The anneal (the part of that schedule below 1 that reads the budget) is raised "
            "to the power g of the loss features: g = "
            + ", ".join(f"{g:.3g}" for g in anneal_powers(net))
            + " while the loss sits 0, 5% and 20% below its running averages (and at its "
            "best), 1 without the loss."
        )
    if hasattr(net, "role_log_rate"):
        rates = {k: v.item() for k, v in net.role_log_rate.items()}
        moved = sorted((k for k in rates if abs(rates[k]) >= 0.01), key=lambda k: rates[k])
        lines.append(
            "* Learned factor on the update, per role of tensor (axis kinds; 1 for the rest): "
            + (", ".join(f"{k} {math.exp(rates[k]):.3g}" for k in moved) or "all still 1")
            + "."
        )
    if net.reads_depth:
        lines.append(
            "* Learned factor on the update of a network with a residual stream, by the "
            f"number of weight tensors that write it (`stream_writers`): {depth_factors(net)}; "
            "1 without a residual stream."
        )
    if net.has_orthogonal_term:
        lines.append(
            "* A hidden layer's weight matrix steps along its orthogonalised 0.9-momentum "
            f"(unit RMS) times its rate and a learned weight of {net.ortho_weight.item():.3g}, "
            f"and along Adam's direction times a learned share of {net.ortho_adam_keep.item():.3g}."
        )
    if net.reads_ortho_snr:
        lines.append(
            "* That orthogonalised step is times the tensor's gradient signal-to-noise ratio "
            f"(`log_signal_to_noise`) to the power {ORTHO_SNR_GAIN * net.ortho_snr_exp.item():.3g}."
        )
    if getattr(net, "neuron_stats", False):
        rows = [
            f"{pool} ({', '.join(f'{w:+.3f}' for w in ws.tolist())})"
            for pool, ws in zip(STAT_POOLS, net.stat_weight.detach())
        ]
        lines.append(
            "* Neuron statistics' coefficients on the log-magnitude, per pool ("
            + ", ".join(NEURON_STATS)
            + "): "
            + "; ".join(rows)
            + (
                "; the weights' log RMS read relative to a width-scaled init"
                if net.width_free_stats
                else ""
            )
            + (
                "; plus a fixed 1 on Adam's direction over the whole tensor (the learned "
                "term in units of Adam's step)"
                if net.term_in_adam_units
                else ""
            )
            + "."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m meta_train.ship",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("run", type=Path, help="a meta_train output folder (or an optimizer.pt)")
    p.add_argument("name", help="the shipped name: lopt/pretrained/NAME.pt")
    p.add_argument("--max-mb", type=float, default=5.0, help="refuse larger files (5)")
    p.add_argument("--dest", type=Path, default=PRETRAINED_DIR, help=argparse.SUPPRESS)
    p.add_argument(
        "--phases-from",
        type=Path,
        default=None,
        metavar="FILE",
        help="take the phases before the run from FILE, a net of the same run shipped "
        "before (when the files the run started from are gone)",
    )
    p.add_argument(
        "--recipes",
        type=Path,
        default=None,
        help="where the net's recipe goes, NAME.json (configs/ when shipping into lopt/pretrained)",
    )
    args = p.parse_args(argv)
    src = recipe_output(args.run) if args.run.is_dir() else args.run
    if not src.is_file():
        raise SystemExit(f"{src}: no such file (did the run finish? it writes optimizer.pt)")
    if not args.name or "/" in args.name or args.name.endswith(".pt"):
        raise SystemExit(f"name {args.name!r}: give a bare name like my-nfn")
    net, meta = lopt.load(src)
    history_file = src.parent / "history.jsonl"
    if "history" not in meta and history_file.is_file():
        meta["history"] = [json.loads(x) for x in history_file.read_text().splitlines() if x]
    if args.phases_from is not None:
        theirs = lopt.load(args.phases_from)[1]
        start = meta.get("config", {}).get("init_from")
        if theirs.get("config", {}).get("init_from") != start:
            raise SystemExit(
                f"--phases-from {args.phases_from}: its run started from "
                f"{theirs.get('config', {}).get('init_from')!r}, this one from {start!r}"
            )
        meta["phases"] = expand(theirs.get("phases") or [])
    meta["phases"] = expand(meta["phases"]) if "phases" in meta else lineage(meta)
    runs = [meta, *meta["phases"]]
    for h in (x for m in runs for x in m.get("history", [])):
        if "wall_time_s_this_session" in h:  # the key's name in older files
            h["wall_time_s"] = h.pop("wall_time_s_this_session")
    from meta_train.__main__ import DEFAULTS  # the command line's defaults (a late import)

    try:
        recipe = from_phases(
            args.name, meta, DEFAULTS, lambda c: options.upgrade(c, args.name, saved_run=True)
        )
    except ValueError as e:
        raise SystemExit(f"{src}: its recipe cannot be written: {e}") from None
    check_recipe(recipe, args.name)
    args.dest.mkdir(parents=True, exist_ok=True)
    dest = args.dest / f"{args.name}.pt"
    lopt.save(net, dest, meta)
    size = dest.stat().st_size
    if size > args.max_mb * 2**20:
        dest.unlink()
        raise SystemExit(f"{src}: {size / 2**20:.1f} MB is over --max-mb {args.max_mb}")
    lopt.load(dest)  # what users will load
    recipes = args.recipes or (CONFIGS if args.dest == PRETRAINED_DIR else args.dest)
    recipes.mkdir(parents=True, exist_ok=True)
    (recipes / f"{args.name}.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(f"wrote {dest} and its recipe, {recipes / f'{args.name}.json'}\n")
    print(model_card(args.name, meta, net, size))
    return 0


if __name__ == "__main__":
    cli.run(main, "python -m meta_train.ship")
