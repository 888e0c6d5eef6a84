"""``python -m tasks list``: the named tasks, families and suites."""

from __future__ import annotations

import torch

from lopt import cli
from tasks.families import FAMILIES, FILE_TASKS, SUITES, TASKS, get_family, get_task


def list_all() -> str:
    lines = ["| name | kind | data | parameters |", "|---|---|---|---|"]
    for name in TASKS:
        if name in FILE_TASKS:
            try:
                t = get_task(name)
            except FileNotFoundError:
                lines.append(f"| {name} | task | (files not found: $LOPT_DATA) | - |")
                continue
        else:
            t = get_task(name)
        lines.append(
            f"| {name} | task | {t.dataset.name} {t.dataset.input_shape} | {t.num_params:,} |"
        )
    for name in FAMILIES:
        fam = get_family(name)
        g = torch.Generator().manual_seed(0)
        sizes = sorted(fam.sample(g).num_params for _ in range(20))
        lines.append(f"| {name} | family | sampled | {sizes[0]:,} - {sizes[-1]:,} (20 samples) |")
    for name, members in SUITES.items():
        lines.append(f"| {name} | suite | {', '.join(members)} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser(prog="python -m tasks", description="Task registry.")
    p.add_argument("command", choices=["list"], help="list: print every named task")
    p.parse_args(argv)
    print(list_all())


if __name__ == "__main__":
    cli.run(main, "python -m tasks")
