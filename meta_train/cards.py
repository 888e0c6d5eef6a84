"""Write the model card of every shipped net as a page.

    python -m meta_train.cards --out docs/cards

One ``NAME.md`` per file in ``lopt/pretrained/`` (what ``meta_train.ship``
printed when it shipped the net: its recipe, every command, the training
time and machine, its learned scalars), and ``README.md``, their index.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lopt
from lopt import cli
from lopt.checkpoint import PRETRAINED_DIR, RECOMMENDED
from meta_train.ship import model_card


def write_cards(out: Path) -> list[Path]:
    """The cards of every shipped net, and their index, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = f"Written by `python -m meta_train.cards` on {time.strftime('%Y-%m-%d')}."
    written, index = [], ["# Shipped nets", "", stamp, ""]
    # The class whose default each recommended net is (OptimizerNet: any).
    default = {v: k for k, v in RECOMMENDED.items() if k != "OptimizerNet"}
    optimizer = {"NFNNet": "NFNOptimizer", "PerParamMLP": "MLPOptimizer"}
    for name in lopt.pretrained_names():
        net, meta = lopt.load(name)
        size = (PRETRAINED_DIR / f"{name}.pt").stat().st_size
        path = out / f"{name}.md"
        path.write_text(f"# {name}\n\n{stamp}\n\n{model_card(name, meta, net, size)}\n")
        written.append(path)
        role = f" (the default of `lopt.{optimizer[default[name]]}`)" if name in default else ""
        index.append(f"* [`{name}`]({name}.md){role}: {type(net).__name__}")
    (out / "README.md").write_text("\n".join(index) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m meta_train.cards",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("docs/cards"), help="(docs/cards)")
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file, not a folder")
    for path in write_cards(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    cli.run(main, "python -m meta_train.cards")
