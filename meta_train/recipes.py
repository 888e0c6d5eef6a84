"""Recipes of several stages: each stage a meta-training run that starts from
the net an earlier stage wrote.

A recipe file is a JSON object with a list of stages::

    {"stages": [
        {"name": "per-entry", "options": {"net": "mlp", "outer_steps": 2000}},
        {"name": "nfn", "options": {"init_from": "stage:per-entry", "outer_steps": 1500}}
    ]}

Each stage's ``options`` are those of ``python -m meta_train`` (only what
differs from the defaults); ``"init_from": "stage:NAME"`` names the net an
earlier stage wrote. ``python -m meta_train --config RECIPE --out DIR``
runs the stages in order, stage ``NAME`` in ``DIR/NAME``, and
``--resume DIR`` carries the recipe on: finished stages are kept, the one in
progress resumes from its checkpoint. The recipe's net is the last stage's
``optimizer.pt``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RECIPE = "recipe.json"  # the recipe, as a run folder keeps it
STAGE_REF = "stage:"
# What a command line may add to a recipe: how and where it runs, not what.
RUN_FLAGS = ("device", "no_progress")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_recipe(data: Any) -> bool:
    """Whether a --config file's contents are a recipe of stages."""
    return isinstance(data, dict) and "stages" in data


def check(data: Any, where: str) -> list[dict[str, Any]]:
    """The stages of a recipe, checked: a non-empty list of ``{"name",
    "options"}`` objects with distinct folder-safe names, and every
    ``stage:`` reference naming an earlier stage. Raises ``SystemExit``
    naming the first problem."""
    if not is_recipe(data) or set(data) != {"stages"}:
        raise SystemExit(f"{where}: a recipe is a JSON object with one key, 'stages'")
    stages = data["stages"]
    if not isinstance(stages, list) or not stages:
        raise SystemExit(f"{where}: 'stages' must be a non-empty list")
    seen: list[str] = []
    for i, stage in enumerate(stages, 1):
        if not isinstance(stage, dict) or set(stage) != {"name", "options"}:
            raise SystemExit(f"{where}: stage {i} must be an object with 'name' and 'options'")
        name, opts = stage["name"], stage["options"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise SystemExit(f"{where}: stage {i}'s name {name!r} must be a folder name")
        if name in seen:
            raise SystemExit(f"{where}: two stages are named {name!r}")
        if not isinstance(opts, dict):
            raise SystemExit(f"{where}: stage {name!r}: 'options' must be a JSON object")
        if "out" in opts:
            raise SystemExit(f"{where}: stage {name!r}: the recipe sets each stage's folder")
        src = opts.get("init_from")
        if isinstance(src, str) and src.startswith(STAGE_REF):
            ref = src[len(STAGE_REF) :]
            if ref not in seen:
                raise SystemExit(
                    f"{where}: stage {name!r} starts from {src!r}, which is not an earlier "
                    f"stage ({', '.join(seen) or 'it is the first'})"
                )
        seen.append(name)
    return stages


def resolved(options: dict[str, Any], out: Path) -> dict[str, Any]:
    """A stage's options with ``stage:NAME`` replaced by that stage's net."""
    options = dict(options)
    src = options.get("init_from")
    if isinstance(src, str) and src.startswith(STAGE_REF):
        options["init_from"] = str(out / src[len(STAGE_REF) :] / "optimizer.pt")
    return options


def finished_steps(stage_dir: Path) -> int:
    """The outer steps a stage's folder has written its net after (0: none)."""
    history = stage_dir / "history.jsonl"
    if not (stage_dir / "optimizer.pt").is_file() or not history.is_file():
        return 0
    lines = [json.loads(x) for x in history.read_text().splitlines() if x.strip()]
    return max((int(x.get("outer_steps", 0)) for x in lines), default=0)


def recipe_output(run: Path) -> Path:
    """The net a run folder holds: the last stage's for a recipe's folder."""
    if (run / RECIPE).is_file():
        stages = json.loads((run / RECIPE).read_text())["stages"]
        return run / stages[-1]["name"] / "optimizer.pt"
    return run / "optimizer.pt"


def run(
    data: dict[str, Any],
    out: Path,
    run_stage: Callable[[list[str]], int],
    run_flags: list[str],
    outer_default: int,
) -> int:
    """Run (or carry on) the recipe ``data`` in ``out``; ``run_stage`` is
    ``python -m meta_train``'s main, called once per stage that is not
    finished, with ``run_flags`` (``--device``, ``--no-progress``) passed on.
    Returns the first non-zero status of a stage, else 0."""
    stages = check(data, str(out / RECIPE))
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE).write_text(json.dumps(data, indent=2) + "\n")
    for i, stage in enumerate(stages, 1):
        name, opts = stage["name"], resolved(stage["options"], out)
        stage_dir = out / name
        target = int(opts.get("outer_steps", outer_default))
        done = finished_steps(stage_dir)
        head = f"stage {i}/{len(stages)} {name!r}"
        if done >= target:
            print(f"{head}: finished ({done} outer steps), kept", file=sys.stderr)
            continue
        if (stage_dir / "config.json").is_file():
            print(f"{head}: carrying it on", file=sys.stderr)
            argv = ["--resume", str(stage_dir), "--outer-steps", str(target)]
        else:
            print(f"{head}: starting", file=sys.stderr)
            options_file = out / f".{name}.options.json"
            options_file.write_text(json.dumps(opts, indent=2) + "\n")
            argv = ["--config", str(options_file), "--out", str(stage_dir)]
        try:
            status = run_stage(argv + run_flags)
        finally:
            if argv[0] != "--resume":
                options_file.unlink(missing_ok=True)  # the stage's config.json holds them
        if status:
            return status
    print(f"the recipe's net: {recipe_output(out)}", file=sys.stderr)
    return 0


def stage_name(source: str) -> str:
    """A stage's folder name for the net a phase started from: a run's
    folder (``runs/X/optimizer.pt``, ``runs/X/snapshots/...``) or a name."""
    path = Path(source)
    if path.suffix != ".pt":
        return source
    parts = path.parts[:-1]
    if parts and parts[-1] == "snapshots":
        parts = parts[:-1]
    return parts[-1] if parts else path.stem


def from_phases(
    name: str,
    meta: dict[str, Any],
    defaults: dict[str, Any],
    upgrade: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """The recipe that remakes a shipped net from its metadata: one stage
    per phase and one for the net's own run (named ``name``), each holding
    the options of its run that differ from ``defaults`` (``upgrade`` turns
    a saved config into this version's options), starting from the stage
    before, for the outer steps the run took. Raises ``ValueError`` where a
    run's options are unknown or its first run did not start from scratch:
    such a recipe would not run."""
    runs = [*(meta.get("phases") or []), meta]
    stages: list[dict[str, Any]] = []
    for i, run_meta in enumerate(runs):
        stage = name if i == len(runs) - 1 else stage_name(str(run_meta.get("from", "")))
        taken = {s["name"] for s in stages} | {name}
        if stage in taken and i < len(runs) - 1:
            stage = next(
                f"{stage}-{k}" for k in range(2, len(runs) + 2) if f"{stage}-{k}" not in taken
            )
        cfg = upgrade(dict(run_meta.get("config") or {}))
        unknown = sorted(k for k in cfg if k not in defaults and k != "out")
        if unknown:
            raise ValueError(f"{stage}: options {unknown} are not this version's")
        if i == 0 and cfg.get("init_from"):
            raise ValueError(f"{stage}: starts from {cfg['init_from']!r}, not from scratch")
        skip = ("out", "device", "init_from", "outer_steps")
        options = {k: v for k, v in cfg.items() if k not in skip and defaults.get(k) != v}
        if stages:
            options["init_from"] = STAGE_REF + stages[-1]["name"]
        options["outer_steps"] = int(run_meta["outer_steps"])
        stages.append({"name": stage, "options": options})
    return {"stages": stages}
