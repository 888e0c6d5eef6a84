"""Ship a meta-trained net: copy a run's ``optimizer.pt`` into
``lopt/pretrained/NAME.pt`` (so ``weights="NAME"`` loads it) and print its
model card.

    python -m meta_train.ship runs/nfn-small nfn-small

The file is checked first (it loads, it is under ``--max-mb``), and its
metadata gains the run's recipe: the config, every session's command from
``history.jsonl`` (the first run and each ``--resume``), outer and inner
steps, wall time and machine. A net that started from another's weights
(``--init-from``) also gets the recipe of every earlier phase, followed
through each phase's ``init_from`` back to a shipped name or a net trained
from scratch (``phases``, oldest first; the files must still be where the
runs read them). The card printed is what the README's model card section
holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lopt
from lopt import cli
from lopt.checkpoint import PRETRAINED_DIR
from lopt.nets import NEURON_STATS, STAT_POOLS

# What a phase of a multi-phase recipe keeps of its net's metadata.
PHASE_KEYS = (
    "command", "history", "config", "outer_steps", "inner_steps",
    "train_seconds_total", "machine", "device", "torch",
)  # fmt: skip


def lineage(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The phases before a net's own run, oldest first: each ``--init-from``
    net's recipe, followed back until a net trained from scratch, a shipped
    name (one entry ``{"shipped": name}``: its own card holds its recipe) or
    a net that already carries its phases. Raises ``SystemExit`` for an
    ``init_from`` file that is not there: the recipe would be incomplete."""
    phases: list[dict[str, Any]] = []
    src = meta.get("config", {}).get("init_from")
    seen: set[str] = set()
    while src and src not in seen:
        seen.add(src)
        if not Path(src).is_file():
            if src in lopt.pretrained_names():
                phases.append({"shipped": src})
                break
            raise SystemExit(
                f"init_from {src!r}: no such file, so the recipe's earlier phases are "
                "unknown (ship from where the runs were trained)"
            )
        m = lopt.load(src)[1]
        phases.append({"from": src, **{k: m[k] for k in PHASE_KEYS if k in m}})
        if m.get("phases"):
            phases.extend(reversed(m["phases"]))
            break
        src = m.get("config", {}).get("init_from")
    return phases[::-1]


def _phase_line(i: int, ph: dict[str, Any]) -> str:
    if "shipped" in ph:
        return f"  {i}. the shipped `{ph['shipped']}` (its own card)"
    cfg = ph.get("config", {})
    commands = [h["command"] for h in ph.get("history") or [{"command": ph.get("command", "?")}]]
    wall = ph.get("train_seconds_total") or 0
    horizon = f"{cfg.get('horizon')}" + (f"-{cfg['horizon_max']}" if cfg.get("horizon_max") else "")
    return (
        f"  {i}. `{ph['from']}`: `{cfg.get('family', '?')}`, {cfg.get('estimator', '?').upper()}, "
        f"population {cfg.get('population')}, horizon {horizon}, meta lr {cfg.get('meta_lr')}, "
        f"{ph.get('outer_steps', 0):,} outer steps, "
        f"{wall / 60:.0f} min on {ph.get('machine', '?')} ({ph.get('device', '?')}, "
        f"torch {ph.get('torch', '?')}): " + "; ".join(f"`{c}`" for c in commands)
    )


def _ramp(cfg: dict) -> str:
    """The meta-loss ramp of a config, in words (empty when there is none)."""
    ramp = cfg.get("meta_loss_ramp") or 0
    return f" weighted by min(1, t / {ramp}) over inner step t" if ramp else ""


def decay_text(net: lopt.OptimizerNet) -> str:
    """The card's words for a net's ``decay_after`` and ``decay_power``."""
    d, p = f"{net.decay_after:g}", net.decay_power
    factor = f"({d} / step)" if p == 1 else f"({d} / step)^{p:g}"
    return f"every update multiplied by {factor} past step {d}"


def warmup_text(net: lopt.OptimizerNet) -> str:
    """The card's words for a net's ``warmup``."""
    return f"every update multiplied by step / {net.warmup:g} before step {net.warmup:g}"


def _snapshot(meta: dict[str, Any]) -> str:
    """Where a net taken before its recipe's end stands in it."""
    planned, at = meta.get("config", {}).get("outer_steps"), meta.get("outer_steps")
    if not planned or not at or at >= planned:
        return ""
    return f" (the net at outer step {at:,} of the recipe's {planned:,}, kept by --snapshot-every)"


def model_card(name: str, meta: dict[str, Any], net: lopt.OptimizerNet, size: int) -> str:
    """A markdown model card from a shipped net's metadata."""
    cfg = meta.get("config", {})
    history = meta.get("history") or [
        {"command": meta.get("command", "?"), "outer_steps": meta.get("outer_steps")}
    ]
    # Training time summed over every session (killed ones included) when the
    # run recorded it; else the finished sessions' wall times.
    wall = meta.get("train_seconds_total") or sum(
        h.get("wall_time_s_this_session") or 0 for h in history
    )
    n_params = sum(p.numel() for p in net.parameters())
    horizon = f"horizon {cfg.get('horizon')} steps"
    if cfg.get("horizon_max"):
        horizon = f"horizon {cfg['horizon']}-{cfg['horizon_max']} steps (log-uniform per run)"
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
        f"truncation {cfg.get('truncation')}, `{cfg.get('meta_loss')}` meta-loss{_ramp(cfg)}, "
        f"meta lr {cfg.get('meta_lr')}.",
        f"* Outer steps: {meta.get('outer_steps'):,}{_snapshot(meta)}; "
        f"inner steps: {meta.get('inner_steps', 0):,}; "
        f"training time {wall / 60:.0f} min on {meta.get('machine', '?')} "
        f"({meta.get('device', '?')}, torch {meta.get('torch', '?')}).",
        "* Commands:",
        "",
        "```bash",
        *[h["command"] for h in history],
        "```",
        "",
        f"* Learned scalars: lr {net.log_lr.exp().item():.4g}, "
        f"step_mult {net.log_step_mult.exp().item():.3g}, "
        f"fan_in_exp {net.fan_in_exp.item():.3f}"
        + (
            f"; weights between hidden groups step along their orthogonalised momentum "
            f"at {net.log_ortho_lr.exp().item():.4g} instead of Adam's direction"
            if net.ortho
            else ""
        )
        + ("" if net.input_width_factor else "; input layers keep width factor 1")
        + ("" if net.radial_correction else "; learned term tangent to weight rows")
        + (
            f"; learned term capped at {net.step_cap:g} of each weight's norm per step"
            if net.step_cap
            else ""
        )
        + (
            f"; learned term capped at {net.adam_cap:g} times Adam's part of each update"
            if net.adam_cap
            else ""
        )
        + (
            "; reads the step budget (total_steps) and multiplies every update by a "
            "learned schedule"
            if net.reads_budget
            else ""
        )
        + (f"; {decay_text(net)}" if net.decay_after else "")
        + (f"; {warmup_text(net)}" if net.warmup else "")
        + ".",
    ]
    shipped_with = meta.get("set_when_shipped") or {}
    if shipped_with:
        lines.append(
            "* Set when shipped, after meta-training without it: "
            + ", ".join(f"{k} {v:g}" for k, v in shipped_with.items())
            + "."
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
                "; the weights' log RMS read relative to a width-scaled init."
                if net.width_free_stats
                else "."
            )
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
    p.add_argument(
        "--step-cap",
        type=float,
        help="ship the net with this step_cap (each weight's learned step at most this "
        "fraction of its norm), a guard chosen after meta-training; recorded in the file "
        "and the card",
    )
    p.add_argument(
        "--adam-cap",
        type=float,
        help="ship the net with this adam_cap (each tensor's learned term at most this "
        "multiple of Adam's part of its update); recorded in the file and the card",
    )
    p.add_argument(
        "--decay-after",
        type=float,
        help="ship the net with this decay_after (past that step every update is "
        "multiplied by (DECAY_AFTER / step) ** decay_power; give the meta-training "
        "horizon); recorded in the file and the card",
    )
    p.add_argument(
        "--decay-power",
        type=float,
        help="ship the net with this decay_power (default 1); recorded in the file and the card",
    )
    p.add_argument(
        "--warmup",
        type=float,
        help="ship the net with this warmup (before that step every update is multiplied by "
        "step / WARMUP); recorded in the file and the card",
    )
    p.add_argument("--dest", type=Path, default=PRETRAINED_DIR, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    src = args.run / "optimizer.pt" if args.run.is_dir() else args.run
    if not src.is_file():
        raise SystemExit(f"{src}: no such file (did the run finish? it writes optimizer.pt)")
    if not args.name or "/" in args.name or args.name.endswith(".pt"):
        raise SystemExit(f"name {args.name!r}: give a bare name like nfn-small")
    net, meta = lopt.load(src)
    for name in lopt.OptimizerNet.CONSTANTS:
        value = getattr(args, name)
        if value is None or value == getattr(net, name):
            continue
        try:
            setattr(net, name, value)
        except ValueError as e:
            raise SystemExit(f"--{name.replace('_', '-')}: {e}") from e
        meta["set_when_shipped"] = {**meta.get("set_when_shipped", {}), name: getattr(net, name)}
    history_file = src.parent / "history.jsonl"
    if "history" not in meta and history_file.is_file():
        meta["history"] = [json.loads(x) for x in history_file.read_text().splitlines() if x]
    if "phases" not in meta:
        meta["phases"] = lineage(meta)
    args.dest.mkdir(parents=True, exist_ok=True)
    dest = args.dest / f"{args.name}.pt"
    lopt.save(net, dest, meta)
    size = dest.stat().st_size
    if size > args.max_mb * 2**20:
        dest.unlink()
        raise SystemExit(f"{src}: {size / 2**20:.1f} MB is over --max-mb {args.max_mb}")
    lopt.load(dest)  # what users will load
    print(f"wrote {dest}\n")
    print(model_card(args.name, meta, net, size))
    return 0


if __name__ == "__main__":
    cli.run(main, "python -m meta_train.ship")
