"""A copy of a meta-training run to carry to another machine: its config,
history, net and trainer state (outer step, meta-parameters, meta-optimizer
state) without the inner run in progress (the population's task parameters,
optimizer states and estimator state, most of ``checkpoint.pt``), so it is
small enough to keep in version control. ``--resume`` on the copy carries
the run on from the same outer step with a fresh inner run.

    python -m meta_train.portable runs/nfn-real checkpoints/nfn-real
    cp -r checkpoints/nfn-real runs/nfn-real && python -m meta_train --resume runs/nfn-real
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from lopt import cli
from lopt.checkpoint import atomic_save, unreadable
from meta_train.trainer import CHECKPOINT, without_inner_runs

FILES = ("config.json", "history.jsonl", "optimizer.pt")


def portable(run: Path, dest: Path) -> Path:
    """Write the portable copy of ``run`` to ``dest`` (which must not hold
    files); returns ``dest``."""
    if not (run / CHECKPOINT).is_file():
        raise SystemExit(f"{run}: no {CHECKPOINT} (not a meta_train folder, or no checkpoint yet)")
    missing = [f for f in FILES if not (run / f).is_file()]
    if missing:
        raise SystemExit(
            f"{run}: no {', '.join(missing)} (not a meta_train run that has written its net)"
        )
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"{dest} holds files: pick another folder or remove it first")
    try:
        state = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many kinds on a damaged file
        raise SystemExit(unreadable(run / CHECKPOINT, e)) from None
    if not isinstance(state, dict) or state.get("format") != "lopt-meta-train":
        raise SystemExit(f"{run / CHECKPOINT}: not an lopt meta-training checkpoint")
    state = without_inner_runs(state)
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy2(run / name, dest / name)
    atomic_save(state, dest / CHECKPOINT)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m meta_train.portable",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, help="a meta_train output folder")
    p.add_argument("dest", type=Path, help="where to write the copy (a new or empty folder)")
    args = p.parse_args(argv)
    dest = portable(args.run, args.dest)
    size = sum(f.stat().st_size for f in dest.iterdir()) / 2**20
    step = torch.load(dest / CHECKPOINT, weights_only=False)["step"]
    print(f"wrote {dest} ({size:.2f} MiB) at outer step {step}")
    return 0


if __name__ == "__main__":
    cli.run(main, "python -m meta_train.portable")
