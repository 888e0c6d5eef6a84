"""What reading a model's weight space finds and costs: for each named
task's model (and the models of :mod:`benchmarks.spec_models`, which no
task or test builds), ``WeightSpaceSpec.from_module`` from the traced graph (the
residual stream, attention heads, norms and embeddings in their groups),
checked the way the symmetry is defined: a random element of the spec's
group leaves the model's output unchanged and moves nearly every tensor,
and ``NFNOptimizer(params, model=model)`` (the default net) takes the same
steps on the moved model, moved. Its cost is timed against the sequential
rule (it runs once, when an optimizer is built with ``model=``).

    python -m benchmarks.spec_inference --tasks lm-code-d64h4l2 resnet-mnist1d-32x3 \\
        gpt-rmsnorm-tied resnet-bottleneck-bn --out docs/results/spec-inference.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import lopt
from benchmarks.spec_models import MODELS
from lopt import WeightSpaceSpec, cli
from lopt.weightspace import GROUP
from tasks import TASKS, get_task

DEFAULT_TASKS = ["resnet-mnist1d-32x3", "lm-code-d64h4l2", *MODELS]
SEEDS = 3  # random symmetries checked per model
STEPS = 3  # optimizer steps compared on the model and its moved twin


def structure(spec: WeightSpaceSpec) -> dict:
    """What the spec found, per parameter: the largest group by parameters
    (the residual stream in a residual net), head groups, parameters with a
    group."""
    members: dict[str, set[str]] = {}
    for t in spec.tensors:
        for ax in t.axes:
            if ax.kind == GROUP:
                members.setdefault(ax.group, set()).add(t.name)
    stream = max(members.values(), key=len) if members else set()
    return {
        "tensors": len(spec.names),  # parameters (a packed one's pieces count once)
        "with_groups": sum(
            any(a.kind == GROUP for t in pieces for a in t.axes) for pieces in spec.by_parameter()
        ),
        "stream": len(stream),
        "heads": len(set(spec.nesting().values())),
    }


def _load(model: torch.nn.Module, tensors) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, x in zip(twin.parameters(), tensors):
            p.copy_(x)
    return twin


def case(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A model, a batch of inputs and its targets (class indices, or
    regression targets)."""
    if name in MODELS:
        return MODELS[name]()
    task = get_task(name)
    x, y = task.sample_batch(torch.Generator().manual_seed(0))
    return copy.deepcopy(task.model), x[:16], y[:16]


def symmetry_check(name: str) -> dict:
    """Output change (relative to the output's scale) and share of tensors
    moved under random symmetries, and the optimizer's steps on the moved
    model against the moved steps (relative to the parameters' scale)."""
    model, x, y = case(name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every entry drawn, so no permutation hides
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    spec = WeightSpaceSpec.from_module(model, mode="hnp")
    params = [p.detach() for p in model.parameters()]
    out = model(x)
    worst, moved = 0.0, 1.0
    for seed in range(SEEDS):
        sym = spec.random_symmetry(torch.Generator().manual_seed(seed))
        new = sym(params)
        diff = (_load(model, new)(x) - out).abs().max() / out.abs().max()
        worst = max(worst, diff.item())
        moved = min(moved, sum(not torch.equal(a, b) for a, b in zip(new, params)) / len(params))
    # The steps in float64: a key projection's bias has a zero gradient up to
    # rounding (softmax ignores a shift of the scores), which Adam's g / |g|
    # turns into float32-sized steps in no particular direction.
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y
    params = [p.detach() for p in model.parameters()]
    sym = spec.random_symmetry(torch.Generator().manual_seed(SEEDS))
    twin = _load(model, sym(params))
    for m in (model, twin):
        opt = lopt.NFNOptimizer(m.parameters(), model=m, total_steps=STEPS)
        for _ in range(STEPS):
            opt.zero_grad()
            loss(m(x), y).backward()
            opt.step()
    want = sym([p.detach() for p in model.parameters()])
    scale = max(p.abs().max().item() for p in want)
    step_diff = max((a - b.detach()).abs().max().item() for a, b in zip(want, twin.parameters()))
    return {"output_change": worst, "moved": moved, "step_change": step_diff / scale}


def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not y.is_floating_point():  # class indices, at every position of a sequence
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return torch.nn.functional.mse_loss(out, y)


def measure(name: str, repeats: int) -> dict:
    model = case(name)[0]
    times = {}
    for graph in (True, False):
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                spec = WeightSpaceSpec.from_module(model, graph=graph)
            runs.append(time.perf_counter() - t0)
        times[graph] = (statistics.median(runs), spec)
    return {
        "task": name,
        **structure(times[True][1]),
        **symmetry_check(name),
        "graph_ms": 1000 * times[True][0],
        "sequential_ms": 1000 * times[False][0],
    }


HEADER = (
    "| task | tensors | in a neuron group | in the largest group | head groups "
    "| output change | tensors moved | step change | graph (ms) | sequential rule (ms) |"
)


def table(rows: list[dict]) -> str:
    lines = [HEADER, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['tensors']} | {r['with_groups']} | {r['stream']} "
            f"| {r['heads']} | {r['output_change']:.1e} | {100 * r['moved']:.0f}% "
            f"| {r['step_change']:.1e} | {r['graph_ms']:.1f} | {r['sequential_ms']:.2f} |"
        )
    return "\n".join(lines)


def page(rows: list[dict], command: str) -> str:
    return "\n".join([
        "# Weight spaces read from the graph",
        "",
        f"Command: `{command}`",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}. Date: {time.strftime('%Y-%m-%d')}.",
        "",
        "Per task model (parameters drawn at random): tensors with a neuron group; tensors "
        "in the largest group (the residual stream of a residual net); attention head "
        f"groups; the largest change of the output under {SEEDS} random symmetries of the "
        "spec (relative to the output's largest entry); the smallest share of tensors "
        f"they move; the largest difference after {STEPS} steps of the default "
        "`NFNOptimizer(params, model=model)` between the moved model and the moved "
        "trajectory (in float64, relative to the largest parameter); the median time to "
        "read the "
        "spec from the graph and by the sequential rule.",
        "",
        table(rows),
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.spec_inference",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=DEFAULT_TASKS,
        help=f"task names, or models of benchmarks.spec_models: {', '.join(MODELS)}",
    )
    p.add_argument("--repeats", type=int, default=5, help="timings per model (the median)")
    p.add_argument("--out", type=Path, default=None, help="write the table as a page here")
    args = p.parse_args(argv)
    known = [*TASKS, *MODELS]
    for name in args.tasks:
        if name not in known:
            p.error(f"--tasks: unknown task {name!r}{cli.did_you_mean(name, known)}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    rows = [measure(name, args.repeats) for name in args.tasks]
    print(table(rows))
    if args.out is not None:
        command = "python -m benchmarks.spec_inference " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(page(rows, command))
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.spec_inference")
