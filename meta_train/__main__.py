"""Meta-train a learned optimizer.

    python -m meta_train --net nfn --family mlp-family-small --estimator pes \\
        --outer-steps 1000 --out runs/nfn
    python -m meta_train --resume runs/nfn --outer-steps 2000     # continue
    torchrun --nproc_per_node 2 -m meta_train ... --out runs/nfn  # 2 processes

Writes, in --out: config.json, TensorBoard logs (tb/), checkpoint.pt (every
--checkpoint-every steps, atomically, and on Ctrl-C or SIGTERM at the end of
the outer step it came in) and optimizer.pt, the trained optimizer net,
loadable with ``NFNOptimizer(params, weights=PATH)``. A second signal stops at
once (over several processes the last periodic checkpoint then stays);
under torchrun, signal the torchrun process: it passes SIGTERM on.
Options may also come from a JSON file (--config); flags override it. A
--config file of several stages (``{"stages": [...]}``, see
``meta_train.recipes``) runs them in order, each in its own folder under --out.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import lopt
from lopt import cli
from lopt.checkpoint import resolve as resolve_weights
from lopt.nets import NFNNet, PerParamMLP
from meta_train import options, recipes
from meta_train.estimators import ESTIMATORS, make_estimator
from meta_train.problems import HORIZON_WEIGHTINGS, LearnedOptimizerProblem
from meta_train.ship import machine_label, task_kinds
from meta_train.stopping import StopRequests
from meta_train.trainer import CHECKPOINT, MetaTrainer
from meta_train.unroll import META_LOSSES, MetaLoss
from tasks import FAMILIES, TASKS, get_family, parse_mixture

DEFAULTS: dict[str, Any] = {
    "net": "nfn",
    "width": 16,
    "depth": 1,
    "init_lr": 1e-3,
    "init_step_mult": 1e-3,
    "init_fan_in_exp": 0.0,
    # The net's UpdateRule (lopt.update_rule), its defaults.
    "learned_term_tangent": True,
    "width_factor_on_input_layers": False,
    "nf_channels": None,
    "nf_scale": 1.0,
    "nf_outputs": "both",
    "neuron_stats": False,
    "width_free_stats": False,
    "role_rates": False,
    "embedding_roles": False,
    "budget": False,
    "term_schedule": False,
    "loss_features": False,
    "loss_anneal": False,
    "depth_factor": False,
    "orthogonal": False,
    "orthogonal_snr": False,
    "term_in_adam_units": False,
    "family": "mlp-family-small",
    "estimator": "pes",
    "population": 8,
    "truncation": 20,
    "horizon": 200,
    "horizon_max": None,
    "horizon_weighting": "runs",
    "budget_hidden": 0.0,
    "loss_hidden": 0.0,
    "sigma": 0.01,
    "meta_lr": 3e-3,
    "clip": 1.0,
    "meta_lr_decay_steps": 0,
    "meta_lr_final": 0.1,
    "per_task": False,
    "tasks_per_step": 1,
    "meta_loss": "mean",
    "loss_cap": 3.0,
    "meta_loss_ramp": 0,
    "meta_loss_ramp_fraction": 0.0,
    "meta_loss_offset": 0.0,
    "meta_loss_end_weight": 1.0,
    "meta_loss_stay": False,
    "outer_steps": 100,
    "seed": 0,
    "device": "cpu",
    "checkpoint_every": 50,
    "snapshot_every": 0,
    "eval_every": 0,
    "eval_task": "mlp-digits",
    "eval_steps": 200,
    "vectorise": True,
    "init_from": None,
    "freeze": [],
    "gain": [],
}
NETS = {"nfn": NFNNet, "mlp": PerParamMLP}
STOPPED = 130  # the exit status of a run stopped by a signal (128 + SIGINT), as a shell's
_positive = options.number(0, strict=True)
TASK_LIST = "python -m tasks list shows them all"
RULES: dict[str, Any] = {
    "net": options.choice(sorted(NETS)),
    "width": options.integer(1),
    "depth": options.integer(1),
    "init_lr": _positive,
    "init_step_mult": _positive,
    "init_fan_in_exp": options.number(),
    "learned_term_tangent": options.boolean,
    "width_factor_on_input_layers": options.boolean,
    "nf_channels": options.integer(1, optional=True),
    "nf_scale": options.number(),
    "nf_outputs": options.choice(list(NFNNet.NF_OUTPUTS)),
    "neuron_stats": options.boolean,
    "width_free_stats": options.boolean,
    "role_rates": options.boolean,
    "embedding_roles": options.boolean,
    "budget": options.boolean,
    "term_schedule": options.boolean,
    "loss_features": options.boolean,
    "loss_anneal": options.boolean,
    "depth_factor": options.boolean,
    "orthogonal": options.boolean,
    "orthogonal_snr": options.boolean,
    "term_in_adam_units": options.boolean,
    "family": options.family(lambda: list(FAMILIES) + list(TASKS), parse_mixture, TASK_LIST),
    "estimator": options.choice(sorted(ESTIMATORS)),
    "population": options.integer(1),
    "truncation": options.integer(1),
    "horizon": options.integer(1),
    "horizon_max": options.integer(1, optional=True),
    "horizon_weighting": options.choice(list(HORIZON_WEIGHTINGS)),
    "budget_hidden": options.number(0, 1),
    "loss_hidden": options.number(0, 1),
    "sigma": _positive,
    "meta_lr": _positive,
    "clip": _positive,
    "meta_lr_decay_steps": options.integer(0),
    "meta_lr_final": options.number(0, 1),
    "per_task": options.boolean,
    "tasks_per_step": options.integer(1),
    "meta_loss": options.choice(list(META_LOSSES)),
    "loss_cap": _positive,
    "meta_loss_ramp": options.integer(0),
    "meta_loss_ramp_fraction": options.number(0, 1),
    "meta_loss_offset": options.number(0, 1),
    "meta_loss_end_weight": options.number(0, 1, strict=True),
    "meta_loss_stay": options.boolean,
    "outer_steps": options.integer(1),
    "seed": options.integer(0),
    "device": options.device,
    "checkpoint_every": options.integer(0),
    "snapshot_every": options.integer(0),
    "eval_every": options.integer(0),
    "eval_task": options.choice(lambda: list(TASKS), TASK_LIST),
    "eval_steps": options.integer(1),
    "vectorise": options.boolean,
    "init_from": options.text(optional=True),
    "freeze": options.strings,
    "gain": options.strings,
    "out": options.text(),
}


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m meta_train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--config", type=Path, help="JSON file of options (flags override it)")
    a(
        "--out",
        type=Path,
        help="output folder (required unless --resume); it must be new or empty, "
        "unless --overwrite",
    )
    a("--resume", type=Path, help="continue the run in this folder exactly")
    a(
        "--overwrite",
        action="store_true",
        help="if --out already holds files, move them aside to OUT.replaced-DATE-TIME "
        "(nothing is deleted) and start afresh",
    )
    a("--net", choices=sorted(NETS), help="optimizer net: nfn (default) or mlp")
    a("--width", type=int, help="per-entry width of the net (16)")
    a("--depth", type=int, help="per-entry layers of the net (1)")
    a("--init-lr", type=float, help="the net's initial Adam-direction learning rate (1e-3)")
    a("--init-step-mult", type=float, help="the net's initial learned-step multiplier (1e-3)")
    a(
        "--init-fan-in-exp",
        type=float,
        help="the net's initial width exponent: updates scale as (64 / fan-in) ** it (0)",
    )
    a(
        "--learned-term-tangent",
        action=argparse.BooleanOptionalAction,
        help="the learned term of each weight's update moves its rows only tangent to "
        "themselves, so only Adam's part grows or shrinks them (default); "
        "--no-learned-term-tangent lets it change their norms too",
    )
    a(
        "--width-factor-on-input-layers",
        action=argparse.BooleanOptionalAction,
        help="the width factor (64 / fan-in) ** fan_in_exp also scales layers that read "
        "the network's input, whose fan-in is the data's; default off: they keep 1, as "
        "muP does",
    )
    a("--nf-channels", type=int, help="nfn: channels the NF-layer reads (default: the width)")
    a("--nf-scale", type=float, help="nfn: constant on the NF-layer's output (1.0)")
    a(
        "--nf-outputs",
        choices=NFNNet.NF_OUTPUTS,
        help="nfn: the NF-layer adds to the direction and log-magnitude (both, default) "
        "or to the log-magnitude alone",
    )
    a(
        "--neuron-stats",
        action=argparse.BooleanOptionalAction,
        help="nfn: the log-magnitude also reads per-neuron and per-tensor log norms of the "
        "weights, Adam's direction and the gradient (learned trust ratios; default off)",
    )
    a(
        "--width-free-stats",
        action=argparse.BooleanOptionalAction,
        help="nfn, with --neuron-stats: read the weights' log norm relative to a width-scaled "
        "init, so that a wider layer than any meta-trained on reads the same (default off)",
    )
    a(
        "--role-rates",
        action=argparse.BooleanOptionalAction,
        help="nfn: a learned log-rate per role of tensor (its axis kinds: a hidden "
        "matrix, an attention projection's query-key rows, ...) on the whole update of "
        "its tensors, starting at 0 (default off)",
    )
    a(
        "--embedding-roles",
        action=argparse.BooleanOptionalAction,
        help="nfn: NF-layer weights (and with --role-rates a rate) for token and position "
        "embeddings, which otherwise get the per-entry path alone; new weights start small "
        "beside a net of --init-from (default off)",
    )
    a(
        "--depth-factor",
        action=argparse.BooleanOptionalAction,
        help="the update of a network with a residual stream times exp(residual_log_rate) * "
        "(the most weight matrices writing one neuron group) ** -depth_exp, both learned from "
        "0: a residual stream's depth, as the width factor is a layer's width (default off)",
    )
    a(
        "--orthogonal",
        action=argparse.BooleanOptionalAction,
        help="a hidden layer's weight matrix steps along its 0.9-momentum orthogonalised "
        "(Newton-Schulz, as Muon steps) at unit RMS, times the tensor's rate and a learned "
        "weight, in place of Adam's direction, which keeps a learned share (0 at first; "
        "default off)",
    )
    a(
        "--orthogonal-snr",
        action=argparse.BooleanOptionalAction,
        help="the orthogonalised step of --orthogonal times the tensor's gradient signal-to-noise "
        "ratio to a learned power (0 at first), so it can shrink as a run fits its data "
        "(default off)",
    )
    a(
        "--budget",
        action=argparse.BooleanOptionalAction,
        help="the net reads where each step lies in the run (step / total_steps, as "
        "NFNOptimizer(..., total_steps=N) tells it; each inner run's horizon in "
        "meta-training) and learns a schedule from it; default off",
    )
    a(
        "--term-schedule",
        action=argparse.BooleanOptionalAction,
        help="with --budget: the learned term (the update minus Adam's part) gets a learned "
        "factor of its own per tensor, from the budget and the tensor's "
        "signal-to-noise ratio, starting at 1 (default off)",
    )
    a(
        "--loss-features",
        action=argparse.BooleanOptionalAction,
        help="with --budget: the net reads the training loss, as ratios to its own "
        "running averages and its best (opt.step(loss=...) or a closure tells it), in its "
        "trunk and as a brake on its schedule; their weights start at 0 (default off)",
    )
    a(
        "--loss-anneal",
        action=argparse.BooleanOptionalAction,
        help="with --loss-features: the loss features also time the learned schedule's anneal "
        "(its part below 0 that reads the budget times a learned factor of them, 1 at "
        "first), so a run whose loss still falls can anneal later (default off)",
    )
    a(
        "--term-in-adam-units",
        action=argparse.BooleanOptionalAction,
        help="nfn, with --neuron-stats: the learned term of each tensor is also scaled by the "
        "RMS of Adam's direction over it (a fixed coefficient), so it shrinks as Adam's step "
        "does when a run settles (default off)",
    )
    a(
        "--init-from",
        help="start from the weights of a saved optimizer net (a path or shipped name): "
        "every tensor of the same name and shape is copied, e.g. an mlp net's per-entry "
        "trunk into an nfn net, whose NF-layer then starts fresh (a second phase)",
    )
    a(
        "--freeze",
        nargs="+",
        metavar="NAME[=VALUE]",
        help="hold these meta-parameters of the net fixed, at VALUE if given (set after "
        "--init-from), e.g. --freeze fan_in_exp=1.0; names as in net.named_parameters(), "
        "or a glob for a group: 'nf.*=0' (the NF-layer held at zero)",
    )
    a(
        "--gain",
        nargs="+",
        metavar="NAME=G",
        help="meta-train these meta-parameters of the net divided by G: each is perturbed "
        "and stepped G times as far as the rest, e.g. --gain 'schedule.weight=10' (a net's "
        "learned schedule, which truncated unrolls move slowly); names or globs as for --freeze",
    )
    a(
        "--family",
        help=f"task family or task name ({', '.join(FAMILIES)}, or a task), or a weighted "
        "mixture of them: real-family=0.7,mlp-family-fit=0.3",
    )
    a("--estimator", choices=sorted(ESTIMATORS), help="pes (default), es or backprop")
    a("--population", type=int, help="antithetic pairs (ES/PES) or trajectories (backprop): 8")
    a("--truncation", type=int, help="inner steps per truncation (20)")
    a("--horizon", type=int, help="inner steps before an inner run restarts (200)")
    a(
        "--horizon-max",
        type=int,
        help="draw each inner run's horizon log-uniformly from [--horizon, this] "
        "(default: every run has --horizon steps)",
    )
    a(
        "--horizon-weighting",
        choices=HORIZON_WEIGHTINGS,
        help="with --horizon-max: runs (default) draws each run's length log-uniformly, so "
        "long runs take most inner steps; steps draws it with density 1/L^2, so that every "
        "range [L, 2L] of lengths gets the same share of inner steps",
    )
    a(
        "--budget-hidden",
        type=float,
        help="with --budget: the fraction of inner runs whose budget the net is not told, "
        "so that it learns to run without total_steps too (default 0)",
    )
    a(
        "--loss-hidden",
        type=float,
        help="with --loss-features: the fraction of inner runs whose loss the net is not "
        "told, so that it learns to run without it too (default 0)",
    )
    a("--sigma", type=float, help="ES / PES perturbation std (0.01)")
    a("--meta-lr", type=float, help="Adam learning rate of the outer loop (3e-3)")
    a(
        "--meta-lr-decay-steps",
        type=int,
        metavar="STEPS",
        help="cosine-decay the outer loop's learning rate from --meta-lr at outer step 0 to "
        "--meta-lr-final times it at outer step STEPS, constant after (e.g. --outer-steps), so "
        "that the last snapshots move less; 0 (default) keeps it constant",
    )
    a(
        "--meta-lr-final",
        type=float,
        metavar="F",
        help="with --meta-lr-decay-steps: the fraction of --meta-lr it ends at (0.1)",
    )
    a("--clip", type=float, help="meta-gradient norm clipping (1.0)")
    a(
        "--per-task",
        action=argparse.BooleanOptionalAction,
        help="ES / PES: divide each outer step's meta-gradient by the root mean square of its "
        "pairs' loss differences, so that every task drawn counts alike (with the log "
        "meta-loss, runs that near loss 0 otherwise outweigh language models tenfold or more); "
        "default off",
    )
    a(
        "--tasks-per-step",
        type=int,
        metavar="K",
        help="inner runs each outer step advances, each on its own task with --population / K "
        "of the pairs, so one meta-gradient averages K tasks and a stage sees K times as many "
        "(1)",
    )
    a("--meta-loss", choices=META_LOSSES, help="mean (default), log, final or heldout")
    a("--loss-cap", type=float, help="cap on per-step losses, times the initial loss (3)")
    a(
        "--meta-loss-ramp",
        type=int,
        metavar="STEPS",
        help="weight the loss after inner step t by min(1, t / STEPS), so the start of "
        "every run counts less (e.g. the horizon); 0 (default) weighs every step alike",
    )
    a(
        "--meta-loss-ramp-fraction",
        type=float,
        metavar="F",
        help="the same ramp in each run's own length N: weight step t by min(1, t / (F N)), "
        "so runs of every length lean on their end alike; 0 (default) is off",
    )
    a(
        "--meta-loss-offset",
        type=float,
        metavar="E",
        help="with --meta-loss log: count a loss L as log(L + E L0), L0 the run's initial "
        "loss, so losses far below E L0 add little and reaching a low loss early counts "
        "more; 0 (default) is the plain log loss",
    )
    a(
        "--meta-loss-end-weight",
        type=float,
        metavar="W",
        help="weight step t of a run of N steps by 1 - (1 - W) t / N as well, so the loss "
        "falls in weight from the start to W at the run's end and a low loss reached sooner "
        "counts more; 1 (default) is off",
    )
    a(
        "--meta-loss-stay",
        action=argparse.BooleanOptionalAction,
        help="count each inner step's loss as the highest from it to the truncation's end, "
        "so a loss that dips and climbs back earns nothing for the dip and a spike costs "
        "the steps before it (not with --meta-loss final)",
    )
    a("--outer-steps", type=int, help="total outer steps (100)")
    a("--seed", type=int, help="seed of every random stream (0)")
    a("--device", help="cpu (default) or cuda")
    a("--checkpoint-every", type=int, help="outer steps between checkpoints (50)")
    a(
        "--snapshot-every",
        type=int,
        help="also keep the net every N outer steps, as snapshots/optimizer-NNNNNN.pt "
        "(0: off, the default), to pick one on a validation suite afterwards",
    )
    a("--eval-every", type=int, help="outer steps between evaluations against Adam (0: off)")
    a("--eval-task", help="task of the periodic evaluation (mlp-digits)")
    a("--eval-steps", type=int, help="inner steps of the evaluation (200)")
    a("--loop", action="store_true", help="a Python loop over the population instead of vmap")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    if args.resume is not None and args.overwrite:
        raise SystemExit("--resume carries a run on, --overwrite starts afresh: give one")
    if args.resume is not None and args.out is not None and args.out != args.resume:
        raise SystemExit(f"--resume {args.resume} writes there; --out {args.out} differs")
    if args.resume is not None:
        saved = args.resume / "config.json"
        if not saved.exists():
            raise SystemExit(
                f"--resume: no config.json in {args.resume} (not a meta_train folder?)"
            )
        try:
            saved_cfg = json.loads(saved.read_text())
            cfg.update(options.upgrade(saved_cfg, f"--resume: {saved}", saved_run=True))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise SystemExit(f"--resume: {saved} is not a JSON object of options ({e})") from None
        cfg["out"] = str(args.resume)
    if args.config is not None:
        try:
            given = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--config {args.config}: {e}") from None
        if not isinstance(given, dict):
            raise SystemExit(f"--config {args.config}: must hold a JSON object of options")
        cfg.update(options.upgrade(given, f"--config {args.config}"))
    for key, value in vars(args).items():
        if key in ("config", "resume", "loop", "no_progress", "overwrite") or value is None:
            continue
        cfg[key] = str(value) if isinstance(value, Path) else value
    if args.loop:
        cfg["vectorise"] = False
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"out"})
    if unknown:
        hint = cli.did_you_mean(unknown[0], DEFAULTS)
        raise SystemExit(f"unknown option {unknown[0]!r}{hint} (see --help)")
    if not cfg.get("out"):
        raise SystemExit("--out DIR is required (or --resume DIR)")
    options.check(cfg, RULES)
    if cfg["horizon"] < cfg["truncation"]:
        raise SystemExit(
            f"--horizon ({cfg['horizon']}) must be at least --truncation ({cfg['truncation']})"
        )
    if cfg["horizon_max"] is not None and cfg["horizon_max"] < cfg["horizon"]:
        raise SystemExit(
            f"--horizon-max ({cfg['horizon_max']}) must be at least --horizon ({cfg['horizon']})"
        )
    final = cfg.get("meta_lr_final", DEFAULTS["meta_lr_final"])
    if final != DEFAULTS["meta_lr_final"] and not cfg.get("meta_lr_decay_steps"):
        raise SystemExit("--meta-lr-final is where --meta-lr-decay-steps ends: give it too")
    if cfg.get("meta_loss_ramp") and cfg.get("meta_loss_ramp_fraction"):
        raise SystemExit("give --meta-loss-ramp or --meta-loss-ramp-fraction, not both")
    if cfg.get("meta_loss_offset") and cfg["meta_loss"] != "log":
        raise SystemExit("--meta-loss-offset is for --meta-loss log")
    if cfg.get("meta_loss_offset", 0.0) >= 1.0:
        raise SystemExit(f"--meta-loss-offset must be below 1, got {cfg['meta_loss_offset']}")
    if cfg.get("meta_loss_stay") and cfg["meta_loss"] == "final":
        raise SystemExit("--meta-loss-stay is for a loss over steps, not --meta-loss final")
    if cfg.get("neuron_stats") and cfg["net"] != "nfn":
        raise SystemExit("--neuron-stats is for --net nfn (a per-entry net cannot pool a neuron)")
    if cfg.get("budget_hidden") and not cfg.get("budget"):
        raise SystemExit("--budget-hidden hides the budget from a net that reads it: give --budget")
    if cfg.get("term_schedule") and not cfg.get("budget"):
        raise SystemExit("--term-schedule reads the budget features: give --budget")
    if cfg.get("orthogonal_snr") and not cfg.get("orthogonal"):
        raise SystemExit("--orthogonal-snr scales the step of --orthogonal: give --orthogonal")
    if cfg.get("loss_features") and not cfg.get("budget"):
        raise SystemExit("--loss-features enter the learned schedule of --budget: give --budget")
    if cfg.get("loss_anneal") and not cfg.get("loss_features"):
        raise SystemExit("--loss-anneal reads the loss features: give --loss-features")
    if cfg.get("term_in_adam_units") and not cfg.get("neuron_stats"):
        raise SystemExit("--term-in-adam-units is a neuron statistic: give --neuron-stats")
    if cfg.get("loss_hidden") and not cfg.get("loss_features"):
        raise SystemExit(
            "--loss-hidden hides the loss from a net that reads it: give --loss-features"
        )
    if cfg.get("role_rates") and cfg["net"] != "nfn":
        raise SystemExit("--role-rates is for --net nfn (roles come from its NF-layer)")
    if cfg.get("embedding_roles") and cfg["net"] != "nfn":
        raise SystemExit("--embedding-roles is for --net nfn (roles come from its NF-layer)")
    if cfg.get("width_free_stats") and not cfg.get("neuron_stats"):
        raise SystemExit("--width-free-stats changes what --neuron-stats read; give both")
    if cfg.get("per_task") and cfg["estimator"] == "backprop":
        raise SystemExit("--per-task scales the antithetic pairs of es or pes; backprop has none")
    if cfg.get("tasks_per_step", 1) > cfg["population"]:
        raise SystemExit(
            f"--tasks-per-step {cfg['tasks_per_step']} is more than --population "
            f"{cfg['population']}: each task needs at least one of the population"
        )
    return cfg


def check_runnable(cfg: dict[str, Any], resuming: bool) -> None:
    """What a valid config also needs on this machine: its device, and the
    net it starts from (unless resuming: the checkpoint holds the net)."""
    cli.check_device("--device", cfg["device"])
    if cfg["init_from"] is not None and not resuming:
        try:
            resolve_weights(cfg["init_from"])
        except FileNotFoundError as e:
            raise SystemExit(f"--init-from: {e}") from None


def occupied(out: Path) -> bool:
    """Whether ``out`` exists and is not an empty folder."""
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def move_aside(out: Path) -> None:
    """``--overwrite``: rename ``out`` to ``OUT.replaced-DATE-TIME`` (nothing
    is deleted)."""
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    print(f"--overwrite: moved the earlier {out} to {aside}", file=sys.stderr)


def check_new_out(out: Path, overwrite: bool) -> None:
    """A new run's --out must be new or an empty folder, unless --overwrite
    (which moves the old one aside)."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a folder")
    if occupied(out) and not overwrite:
        raise SystemExit(
            f"--out {out} already holds files; carry that run on with --resume {out}, "
            f"or start afresh with --overwrite (moves it aside to {out.name}.replaced-DATE-TIME)"
        )


def build(
    cfg: dict[str, Any], device: torch.device, warm: bool = True
) -> tuple[MetaTrainer, lopt.OptimizerNet]:
    """The trainer and its net; ``warm=False`` skips ``init_from`` (a resumed
    run restores its own weights)."""
    extra = {}
    if cfg["net"] == "nfn":
        extra = {
            "nf_channels": cfg["nf_channels"],
            "nf_scale": cfg["nf_scale"],
            "nf_outputs": cfg["nf_outputs"],
            "neuron_stats": cfg.get("neuron_stats", False),
            "width_free_stats": cfg.get("width_free_stats", False),
            "role_rates": cfg.get("role_rates", False),
            "embedding_roles": cfg.get("embedding_roles", False),
            "term_in_adam_units": cfg.get("term_in_adam_units", False),
        }
    # The fresh net is drawn from the run's seed: PyTorch seeds its global
    # generator at random in each process, so a rerun, or each torchrun rank,
    # would otherwise start from a different net.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        net = NETS[cfg["net"]](
            width=cfg["width"],
            depth=cfg["depth"],
            lr=cfg["init_lr"],
            step_mult=cfg["init_step_mult"],
            fan_in_exp=cfg.get("init_fan_in_exp", 0.0),
            rule=lopt.UpdateRule(
                learned_term_tangent=cfg["learned_term_tangent"],
                width_factor_on_input_layers=cfg["width_factor_on_input_layers"],
            ),
            budget=cfg.get("budget", False),
            term_schedule=cfg.get("term_schedule", False),
            loss_features=cfg.get("loss_features", False),
            loss_anneal=cfg.get("loss_anneal", False),
            depth_factor=cfg.get("depth_factor", False),
            orthogonal=cfg.get("orthogonal", False),
            orthogonal_snr=cfg.get("orthogonal_snr", False),
            **extra,
        )
    if warm and cfg.get("init_from"):
        copied = warm_start(net, cfg["init_from"])
        print(f"--init-from {cfg['init_from']}: copied {name_groups(copied)}", file=sys.stderr)
    frozen = freeze(net, cfg.get("freeze") or [])
    gains = meta_gains(net, cfg.get("gain") or [])
    net = net.to(device)
    family = get_family(cfg["family"], device)
    problem = LearnedOptimizerProblem(
        net,
        family,
        truncation=cfg["truncation"],
        horizon=cfg["horizon"],
        horizon_max=cfg["horizon_max"],
        meta_loss=MetaLoss(
            cfg["meta_loss"],
            cfg["loss_cap"],
            cfg["meta_loss_ramp"],
            cfg.get("meta_loss_ramp_fraction", 0.0),
            cfg.get("meta_loss_offset", 0.0),
            cfg.get("meta_loss_end_weight", 1.0),
            cfg.get("meta_loss_stay", False),
        ),
        seed=cfg["seed"],
        vectorise=cfg["vectorise"],
        budget_hidden=cfg.get("budget_hidden", 0.0),
        loss_hidden=cfg.get("loss_hidden", 0.0),
        horizon_weighting=cfg.get("horizon_weighting", "runs"),
    )
    trainer = MetaTrainer(
        problem,
        make_estimator(cfg["estimator"], cfg["sigma"]),
        pairs=cfg["population"],
        meta_lr=cfg["meta_lr"],
        clip=cfg["clip"],
        meta_lr_decay_steps=cfg.get("meta_lr_decay_steps", 0),
        meta_lr_final=cfg.get("meta_lr_final", 0.1),
        seed=cfg["seed"],
        out_dir=cfg["out"],
        checkpoint_every=cfg["checkpoint_every"],
        eval_fn=make_eval(cfg, device) if cfg["eval_every"] else None,
        eval_every=cfg["eval_every"],
        config=cfg,
        frozen=frozen,
        gains=gains,
        snapshot_every=cfg.get("snapshot_every", 0),
        per_task=cfg.get("per_task", False),
        tasks_per_step=cfg.get("tasks_per_step", 1),
    )
    return trainer, net


def pick_parameters(params: dict[str, torch.Tensor], name: str, flag: str) -> list[str]:
    """The names of ``params`` (a net's ``dict(named_parameters())``) that
    ``name`` (a name or a glob) picks for ``flag``; refuses one that picks
    none, naming the close ones and the scalars."""
    # A glob names a group at once (an NFN's NF-layer is hundreds of
    # tensors: --freeze 'nf.*=0' leaves the rest, e.g. the statistics, to train).
    if any(c in name for c in "*?["):
        group = fnmatch.filter(params, name)
        if not group:
            raise SystemExit(f"{flag}: {name!r} matches no parameter of the net")
        return group
    if name in params:
        return [name]
    # An NFN has hundreds of NF-layer tensors: name the close ones and
    # the scalars, not all of them.
    close = difflib.get_close_matches(name, params, n=3)
    scalars = [n for n, t in params.items() if t.dim() == 0]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise SystemExit(
        f"{flag}: no parameter {name!r} ({hint}its scalars: {', '.join(scalars)}; "
        f"all {len(params)} names in net.named_parameters())"
    )


def freeze(net: lopt.OptimizerNet, items: list[str]) -> torch.Tensor | None:
    """``--freeze`` items (``NAME`` or ``NAME=VALUE``; NAME may be a glob over
    ``net.named_parameters()``): set each given value (every entry of the
    parameter) and return the bool mask over
    ``parameters_to_vector(net.parameters())`` that is True on the named
    parameters (None for no items)."""
    if not items:
        return None
    params = dict(net.named_parameters())
    names = set()
    for item in items:
        name, sep, value = item.partition("=")
        group = pick_parameters(params, name, "--freeze")
        if sep:
            try:
                number = float(value)
            except ValueError:
                raise SystemExit(f"--freeze {item!r}: VALUE must be a number") from None
            with torch.no_grad():
                for member in group:
                    params[member].fill_(number)
        names.update(group)
    return torch.cat(
        [torch.full((t.numel(),), n in names, dtype=torch.bool) for n, t in params.items()]
    )


def meta_gains(net: lopt.OptimizerNet, items: list[str]) -> torch.Tensor | None:
    """``--gain`` items (``NAME=G``; NAME may be a glob over
    ``net.named_parameters()``, a later item overrides an earlier one): the
    gain of every entry of ``parameters_to_vector(net.parameters())``, 1
    where no item names it (None for no items)."""
    if not items:
        return None
    params = dict(net.named_parameters())
    gain = dict.fromkeys(params, 1.0)
    for item in items:
        name, sep, value = item.partition("=")
        try:
            number = float(value) if sep else math.nan
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise SystemExit(f"--gain {item!r}: give NAME=G with G a number > 0")
        for member in pick_parameters(params, name, "--gain"):
            gain[member] = number
    return torch.cat([torch.full((t.numel(),), gain[n]) for n, t in params.items()])


def warm_start(net: lopt.OptimizerNet, weights: str) -> list[str]:
    """Copy into ``net`` every tensor of a saved net with the same name and
    shape; returns their names. Raises if a shared name has another shape
    (another width or depth) or nothing at all is shared."""
    source, _ = lopt.load(weights)
    theirs = source.state_dict()
    ours = net.state_dict()
    shared = [k for k in ours if k in theirs]
    wrong = [k for k in shared if ours[k].shape != theirs[k].shape]
    if wrong:
        shapes = ", ".join(f"{k} {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}" for k in wrong)
        raise SystemExit(f"--init-from {weights}: shapes differ (another width/depth?): {shapes}")
    if not shared:
        raise SystemExit(f"--init-from {weights}: no tensor in common with a {type(net).__name__}")
    net.load_state_dict({k: theirs[k] for k in shared}, strict=False)
    return shared


def make_eval(cfg: dict[str, Any], device: torch.device):
    """Every few steps: the current net against Adam (its learning rate tuned
    once on the grid, at the first evaluation) on a fixed task, same
    initialisation and batches."""
    from tasks import get_task
    from tasks.runs import adam, run, tune

    task = get_task(cfg["eval_task"], device)
    steps = cfg["eval_steps"]
    adam_final: list[float] = []

    def evaluate(trainer: MetaTrainer) -> dict[str, float]:
        # Tuned when first needed, so building a trainer stays cheap; tuning
        # draws from its own generators, so when it runs changes no run.
        if not adam_final:
            best_lr, _ = tune(task, adam, steps, [0])
            adam_final.append(run(task, adam(best_lr), steps, 0).final_train)
        net = trainer.problem.net
        curve = run(task, lambda m: type_of(net)(m.parameters(), net=net, model=m), steps, 0)
        return {
            "learned_final_loss": curve.final_train,
            "adam_final_loss": adam_final[0],
            "learned_over_adam": curve.final_train / adam_final[0],
        }

    return evaluate


def type_of(net: lopt.OptimizerNet):
    return lopt.NFNOptimizer if isinstance(net, NFNNet) else lopt.MLPOptimizer


def recipe_run(args: argparse.Namespace) -> tuple[dict[str, Any], Path] | None:
    """The recipe and folder when ``--config`` is a recipe of stages or
    ``--resume`` names a recipe's folder (None otherwise); refuses flags that
    would change what a recipe's stages train."""
    if args.resume is not None and (args.resume / recipes.RECIPE).is_file():
        data, out = json.loads((args.resume / recipes.RECIPE).read_text()), args.resume
        if args.overwrite:
            raise SystemExit("--resume carries a run on, --overwrite starts afresh: give one")
    elif args.config is not None and args.config.is_file():
        try:
            data = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--config {args.config}: {e}") from None
        if not recipes.is_recipe(data):
            return None
        if args.out is None:
            raise SystemExit("--out DIR is required (or --resume DIR)")
        out = args.out
        check_new_out(out, args.overwrite)
    else:
        return None
    allowed = {"config", "out", "resume", "overwrite", *recipes.RUN_FLAGS}
    given = [k for k, v in vars(args).items() if k not in allowed and v not in (None, False)]
    if given:
        raise SystemExit(
            f"{options.flag(given[0])}: a recipe's stages hold their options; of the "
            f"flags, only {', '.join(options.flag(k) for k in recipes.RUN_FLAGS)} apply to it"
        )
    recipes.check(data, str(args.config or args.resume / recipes.RECIPE))
    if args.overwrite and occupied(out):
        move_aside(out)
    return data, out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    recipe = recipe_run(args)
    if recipe is not None:
        flags = (["--device", args.device] if args.device else []) + (
            ["--no-progress"] if args.no_progress else []
        )
        return recipes.run(*recipe, main, flags, DEFAULTS["outer_steps"])
    command = "python -m meta_train " + " ".join(sys.argv[1:] if argv is None else argv)
    cfg = resolve_config(args)
    # A run killed before its first checkpoint resumes from step 0.
    resuming = args.resume is not None and (Path(cfg["out"]) / CHECKPOINT).is_file()
    check_runnable(cfg, resuming)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if cfg["device"].startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(cfg["device"])
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    out = Path(cfg["out"])
    trainer, net = build(cfg, device, warm=not resuming)  # bad options raise here
    if args.resume is None:
        check_new_out(out, args.overwrite)
        if dist.is_initialized():  # every rank checks before rank 0 writes the run's files
            dist.barrier()
    elif not resuming:
        print(f"--resume {out}: no checkpoint yet; starting the run from step 0", file=sys.stderr)
    if resuming:
        try:
            trainer.resume()
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--resume: {e}") from None
    if rank == 0 and args.resume is None and args.overwrite and occupied(out):
        move_aside(out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    start = time.time()
    trainer.snapshot_fn = lambda t: save_net(
        net, out, cfg, t, time.time() - start, rank, command, snapshot=True
    )
    # Open until optimizer.pt is written: a signal then waits for it.
    with StopRequests() as stops:
        try:
            trainer.train(cfg["outer_steps"], progress=not args.no_progress, stops=stops)
        except KeyboardInterrupt:
            save_net(net, out, cfg, trainer, time.time() - start, rank, command)
            return STOPPED
        except OSError as e:  # e.g. a full disk: the last checkpoint is whole (atomic writes)
            print(
                f"python -m meta_train: error: {e}; the last checkpoint written to {out} is "
                f"intact: --resume {out} carries the run on from it",
                file=sys.stderr,
            )
            return 1
        finally:
            trainer.close()
        save_net(net, out, cfg, trainer, time.time() - start, rank, command)
    if dist.is_initialized():
        # Rank 0 may still be writing: tearing gloo down under it can abort
        # the process ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return 0


def name_groups(names: list[str]) -> str:
    """``names`` by their module (``nf.* (412 tensors)``): an NF-layer's
    tensors, one per term, would fill a screen."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.split(".")[0], []).append(name)
    return ", ".join(
        group[0] if len(group) == 1 else f"{module}.* ({len(group)} tensors)"
        for module, group in groups.items()
    )


SNAPSHOTS = "snapshots"


def snapshot_path(out: Path, step: int) -> Path:
    """Where ``--snapshot-every`` keeps the net of outer step ``step``."""
    return out / SNAPSHOTS / f"optimizer-{step:06d}.pt"


def save_net(
    net,
    out: Path,
    cfg,
    trainer: MetaTrainer,
    wall: float,
    rank: int,
    command: str,
    snapshot: bool = False,
) -> None:
    """Write ``optimizer.pt`` with its model-card metadata and append this
    process's line to ``history.jsonl``; ``snapshot=True`` writes the net of the
    current step under ``snapshots/`` instead, the history left as it is."""
    if rank != 0:
        return
    meta = {
        "config": cfg,
        "outer_steps": trainer.step,
        "inner_steps": trainer.inner_steps,
        "wall_time_s": round(wall, 1),
        "train_seconds_total": round(trainer.train_seconds, 3),
        "machine": machine_label(platform.node(), platform.machine(), platform.processor()),
        "device": cfg["device"],
        "torch": str(torch.__version__),
        "command": command,
        "tasks_drawn": task_kinds(trainer.tasks_drawn()),
    }
    # One line per process (first run, each --resume): the model card's recipe.
    history_path = out / "history.jsonl"
    this_run = {k: meta[k] for k in ("command", "outer_steps", "wall_time_s")}
    past = history_path.read_text().splitlines() if history_path.exists() else []
    meta["history"] = [json.loads(line) for line in past] + [this_run]
    if snapshot:
        path = snapshot_path(out, trainer.step)
        path.parent.mkdir(exist_ok=True)
        lopt.save(net, path, meta)
        return
    with history_path.open("a") as f:
        f.write(json.dumps(this_run) + "\n")
    lopt.save(net, out / "optimizer.pt", meta)
    print(f"wrote {out / 'optimizer.pt'} after {trainer.step} outer steps")


def main_and_leave() -> int:
    """:func:`main`, for the command line. A run stopped at once under
    torchrun (its optimizer.pt written) leaves without running gloo's
    destructors: after a peer left in the middle of a collective they can
    abort the process ("terminate called without an active exception"),
    turning a clean stop into SIGABRT."""
    code = main()
    if code == STOPPED and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    cli.run(main_and_leave, "python -m meta_train")
