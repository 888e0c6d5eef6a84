"""Cost of a learned optimizer step against torch.optim.Adam (on a GPU,
fused AdamW).

For MLPs of ~10k, ~50k, ~300k and ~1.8M parameters, a 200-layer MLP of
width 16 (402 small tensors: what a step costs per tensor), a CNN, a BatchNorm
ResNet and a character transformer LM (2 layers, width 64), and on a GPU
also MLPs of ~10M, ~100M and ~300M parameters and a GPT-2-small-shaped LM
(12 layers, width 768, 1,024 tokens, batch 8, an untied output layer),
measures in one run:
the time of one ``optimizer.step()`` and of a whole train step (forward,
backward, step) at batch 128, as ratios to Adam measured interleaved in the
same process; the launches one step makes (CUDA kernels on a GPU, where a
step of small tensors is bound by them; top-level torch operators on the
CPU); the optimizer state size; and the peak memory a run of steps
adds above the model and its gradients (measured in a fresh subprocess per
optimizer, from the peak resident set on CPU or ``max_memory_allocated`` on
CUDA). Optionally the ``nfn`` reference NF-layer stack is timed on the same
weight space as the peer for the NF-layer cost.

    python -m benchmarks.overhead --out runs/overhead
    python -m benchmarks.overhead --quick --out /tmp/overhead   # CI-sized
    python -m benchmarks.overhead --torch-path   # the path a GPU runs, on the CPU
    LOPT_MULTI_TENSOR=0 python -m benchmarks.overhead --torch-path   # its per-tensor path
    python -m benchmarks.overhead --device cuda --models mlp-10m mlp-100m mlp-300m gpt2-small
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

import lopt
from lopt import cli

OPTIMIZERS = ("adam", "mlp", "nfn")


MODELS = (
    "mlp-10k", "mlp-50k", "mlp-300k", "mlp-1.8m", "mlp-deep", "cnn-57k", "resnet-bn",
    "resnet-bn-cl", "transformer-char",
)  # fmt: skip
# Sized for a GPU (refused on the CPU): MLPs of about 10M, 100M and 300M
# parameters and a GPT-2-small-shaped LM (163M: its output layer is not tied
# to the token embedding), against fused AdamW there.
GPU_MODELS = ("mlp-10m", "mlp-100m", "mlp-300m", "gpt2-small")
LM_SHAPES = {"transformer-char": (96, 64), "gpt2-small": (50257, 1024)}  # vocabulary, context
LM_VOCAB, LM_CONTEXT = LM_SHAPES["transformer-char"]
MAX_BATCH = {"gpt2-small": 8}  # sequences of 1,024 tokens per training step


def build_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A named benchmark model and its input shape (without batch); the
    character LM reads token indices (:func:`batch_for`)."""
    if name in LM_SHAPES:
        from tasks.models import TransformerLM

        vocab, context = LM_SHAPES[name]
        d, heads, layers = (64, 4, 2) if name == "transformer-char" else (768, 12, 12)
        return TransformerLM(vocab, context, d, heads, layers), (context,)
    if name in ("resnet-bn", "resnet-bn-cl"):
        from tasks.models import ResNet

        model = ResNet((3, 16, 16), 32, 3, 10)
        if name == "resnet-bn-cl":  # channels_last weights (and so gradients)
            model = model.to(memory_format=torch.channels_last)
        return model, (3, 16, 16)
    if name.startswith("mlp-"):
        widths = {
            "mlp-10k": [64, 96, 32, 10],
            "mlp-50k": [784, 64, 10],
            "mlp-300k": [784, 384, 10],
            "mlp-1.8m": [784, 1024, 1024, 10],
            "mlp-deep": [16] * 201 + [10],  # 402 small tensors: a step's cost per tensor
            "mlp-10m": [1024, 3072, 3072, 10],
            "mlp-100m": [4096, 6144, 6144, 6144, 10],
            "mlp-300m": [8192, 12288, 16384, 10],
            "mlp-tiny": [32, 16, 10],
        }[name]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers), (widths[0],)
    if name in ("cnn-57k", "cnn-tiny"):
        c = (3, 32, 64, 64) if name == "cnn-57k" else (3, 8, 8)
        size = 32 if name == "cnn-57k" else 8
        layers = []
        for a, b in zip(c[:-1], c[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c[-1], 10)]
        return nn.Sequential(*layers), (3, size, size)
    raise ValueError(f"unknown benchmark model {name!r}")


# Timed with the shipped nets when present, else default nets.
SHIPPED = {
    "mlp": (lopt.MLPOptimizer, lopt.checkpoint.RECOMMENDED["PerParamMLP"]),
    "nfn": (lopt.NFNOptimizer, lopt.checkpoint.RECOMMENDED["NFNNet"]),
}
# The learned optimizers' path: None, the default (the fused kernel on the
# CPU); False, the torch path a GPU runs (see use_path).
FUSED: bool | None = None
SLICE_ENTRIES: int | None = None  # set by use_path, for the peak-memory subprocesses


def use_path(torch_path: bool = False, slice_entries: int | None = None) -> tuple:
    """Time the learned optimizers on the path a GPU runs (``fused=False``
    and the multi-tensor torch operators, :mod:`lopt.multi_tensor`, with
    the guard on the device) instead of the default, and/or with the
    per-entry work cut into slices of ``slice_entries`` entries on every
    device (default: the device's, :func:`lopt.nets.slice_entries`, and
    :data:`lopt.multi_tensor.CHUNK_ENTRIES`). Returns what it replaced, for
    ``restore_path``."""
    global FUSED, SLICE_ENTRIES
    old = (FUSED, SLICE_ENTRIES, lopt.nets.CHUNK, lopt.nets.GPU_CHUNK,
           lopt.multi_tensor.CHUNK_ENTRIES, lopt.functional.multi_tensor_default)  # fmt: skip
    FUSED, SLICE_ENTRIES = (False if torch_path else None), slice_entries
    if slice_entries is not None:
        lopt.nets.CHUNK = lopt.nets.GPU_CHUNK = slice_entries
        lopt.multi_tensor.CHUNK_ENTRIES = slice_entries
    if torch_path:  # the choice update() makes on a GPU, made on every device
        lopt.functional.multi_tensor_default = lambda params, fused: (
            lopt.functional.multi_tensor_allowed() and not fused
        )
    return old


def restore_path(old: tuple) -> None:
    global FUSED, SLICE_ENTRIES
    (FUSED, SLICE_ENTRIES, lopt.nets.CHUNK, lopt.nets.GPU_CHUNK, lopt.multi_tensor.CHUNK_ENTRIES,
     lopt.functional.multi_tensor_default) = old  # fmt: skip


def net_name(kind: str, names: dict[str, str] | None = None) -> str:
    """The net the learned optimizer ``kind`` runs: ``names[kind]``, else ``SHIPPED``'s."""
    return (names or {}).get(kind, SHIPPED[kind][1])


def make_optimizer(
    kind: str, model: nn.Module, names: dict[str, str] | None = None
) -> torch.optim.Optimizer:
    """Adam, or the learned optimizer ``kind`` with the shipped net
    ``names[kind]`` (default: ``SHIPPED``'s; a default net when not shipped)."""
    if kind == "adam":  # on a GPU the fastest torch has: fused AdamW
        if next(model.parameters()).device.type == "cuda":
            return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    if kind not in SHIPPED:
        raise ValueError(f"unknown optimizer {kind!r}")
    cls, name = SHIPPED[kind][0], net_name(kind, names)
    return cls(model.parameters(), model=model, weights=_weights(name), fused=FUSED)


def _weights(name: str) -> str | None:
    """A shipped net's name or a saved net's path as given, else None (a default net)."""
    return name if name in lopt.pretrained_names() or Path(name).is_file() else None


def net_descriptions(names: dict[str, str] | None = None) -> dict[str, str]:
    """Which net each learned optimizer ran: the shipped one, or a default."""
    out = {}
    for kind, (cls, _) in SHIPPED.items():
        name = net_name(kind, names)
        if _weights(name) is not None:
            shipped = "shipped " if name in lopt.pretrained_names() else ""
            out[kind] = f"{shipped}{name}: {lopt.load(name)[0].config}"
        else:
            out[kind] = f"default: {cls.net_class().config}"
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def launches_per_step(opt: torch.optim.Optimizer, device: torch.device) -> int:
    """CUDA kernels one ``opt.step()`` launches on a GPU; on the CPU, the torch
    operators it calls that would launch one (views and allocations are
    not; a multi-tensor ``_foreach`` operator is one, as on a GPU, though the
    CPU runs it tensor by tensor; work in the fused C kernels is none)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        opt.step()
        _sync(device)
    events = prof.events()
    if cuda:
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)

    def computes(e) -> bool:  # a torch operator that is not a view or an allocation
        return e.name.startswith("aten::") and not _no_kernel(e.name)

    def top_level(e) -> bool:  # none above it (Optimizer.step's own range is none)
        parent = e.cpu_parent
        while parent is not None:
            if computes(parent):
                return False
            parent = parent.cpu_parent
        return True

    return sum(1 for e in events if computes(e) and top_level(e))


@functools.cache
def _no_kernel(name: str) -> bool:
    """Whether the torch operator ``name`` launches no kernel on a GPU: a
    view (its schema returns an alias of an input; a copy it makes, as
    ``reshape`` can, is an operator below it) or an allocation."""
    short = name.removeprefix("aten::")
    if short.startswith("empty"):
        return True
    op = getattr(torch.ops.aten, short, None)
    if op is None:
        return False
    for overload in op.overloads():
        ret = getattr(op, overload)._schema.returns
        if ret and ret[0].alias_info is not None and not ret[0].alias_info.is_write:
            return True
    return False


def batch_for(
    model_name: str, in_shape: tuple[int, ...], batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and class targets (the LM: tokens, the next at every position)."""
    g = torch.Generator().manual_seed(0)
    batch = min(batch, MAX_BATCH.get(model_name, batch))
    if model_name in LM_SHAPES:
        vocab, context = LM_SHAPES[model_name]
        tokens = torch.randint(0, vocab, (batch, context + 1), generator=g)
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    x = torch.randn(batch, *in_shape, generator=g)
    return x.to(device), torch.randint(0, 10, (batch,), generator=g).to(device)


def time_steps(
    model_name: str,
    device: torch.device,
    repeats: int,
    batch: int,
    names: dict[str, str] | None = None,
) -> dict:
    """Step and train-step times of every optimizer, interleaved. Denormal
    floats are flushed to zero meanwhile: a model that fits its one batch
    exactly (a learned optimizer can, in a few steps) gets denormal
    gradients, whose slow arithmetic would be timed instead of the step."""
    flushed = torch.set_flush_denormal(True)
    try:
        return _time_steps(model_name, device, repeats, batch, names)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _time_steps(
    model_name: str,
    device: torch.device,
    repeats: int,
    batch: int,
    names: dict[str, str] | None,
) -> dict:
    torch.manual_seed(0)
    runs = {}
    for kind in OPTIMIZERS:
        model, in_shape = build_model(model_name)
        model.to(device)
        runs[kind] = (model, make_optimizer(kind, model, names))
    x, y = batch_for(model_name, in_shape, batch, device)

    def train_step(model, opt):
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()

    for model, opt in runs.values():  # warm up, create state, keep grads
        train_step(model, opt)
        train_step(model, opt)
    times: dict[str, dict[str, list[float]]] = {k: {"step": [], "train": []} for k in runs}
    for _ in range(repeats):
        for kind, (model, opt) in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            times[kind]["step"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            train_step(model, opt)
            _sync(device)
            times[kind]["train"].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in runs["adam"][0].parameters())
    out = {"model": model_name, "params": n_params}
    for kind, (_, opt) in runs.items():
        out[f"{kind}_launches"] = launches_per_step(opt, device)
    for kind, t in times.items():
        out[f"{kind}_step_ms"] = 1e3 * statistics.median(t["step"])
        out[f"{kind}_train_ms"] = 1e3 * statistics.median(t["train"])
        state = runs[kind][1].state
        out[f"{kind}_state_mb"] = (
            sum(
                v.numel() * v.element_size()
                for s in state.values()
                for v in s.values()
                if torch.is_tensor(v)
            )
            / 2**20
        )
    return out


_PEAK_CODE = """
import json, os, sys, threading, time, torch
from benchmarks.overhead import build_model, make_optimizer, use_path
name, kind, device, steps = sys.argv[1], sys.argv[2], torch.device(sys.argv[3]), int(sys.argv[4])
use_path(*json.loads(sys.argv[6]))
model, _ = build_model(name)
model.to(device)
for p in model.parameters():
    p.grad = torch.randn_like(p) * 1e-3
opt = make_optimizer(kind, model, {kind: sys.argv[5]} if sys.argv[5] else None)
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
if device.type == "cuda":
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
else:
    base, peak, done = rss(), [0], [False]
    def sample():
        while not done[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)
    thread = threading.Thread(target=sample)
    thread.start()
for _ in range(steps):
    opt.step()
if device.type == "cuda":
    torch.cuda.synchronize()
    top = torch.cuda.max_memory_allocated()
else:
    done[0] = True
    thread.join()
    top = max(peak[0], rss())
print((top - base) / 2**20)
"""


def peak_memory_mb(
    model_name: str, kind: str, device: str, steps: int = 3, net: str | None = None
) -> float:
    """Peak memory that running ``steps`` optimizer steps adds above the model
    and its gradients (state included), in MiB. Measured in a fresh process:
    on CPU by sampling the resident set every 0.2 ms, on CUDA with
    ``max_memory_allocated``."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    path = [FUSED is False, SLICE_ENTRIES]
    res = subprocess.run(
        [sys.executable, "-c", _PEAK_CODE, model_name, kind, device, str(steps)]
        + [net or "", json.dumps(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return float(res.stdout.strip().splitlines()[-1])


def nfn_reference_ms(model_name: str, repeats: int) -> dict | None:
    """Our NF-layer stack against the ``nfn`` package on an MLP's weight space."""
    if not model_name.startswith("mlp-"):
        return None
    try:
        import nfn  # noqa: F401
    except ImportError:
        return None
    from benchmarks import nf_layers

    model, _ = build_model(model_name)
    widths = [m.in_features for m in model if isinstance(m, nn.Linear)]
    widths.append([m for m in model if isinstance(m, nn.Linear)][-1].out_features)
    r = nf_layers.main(
        [
            "--widths",
            *map(str, widths),
            "--channels",
            "16",
            "--depth",
            "1",
            "--repeats",
            str(repeats),
        ]
    )
    return {"nf_ours_ms": r["ours_ms"], "nf_nfn_ms": r["nfn_ms"]}


def write_outputs(rows: list[dict], out: Path, meta: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    where = f"{platform.machine()}, {meta['device']}, {meta.get('threads', '?')} threads"
    title = (
        "# Step cost against Adam\n\n"
        f"Command: `{meta.get('command', 'python -m benchmarks.overhead')}`\n"
        f"Machine: {where}, torch {meta.get('torch', torch.__version__)}. "
        f"Date: {meta.get('date', time.strftime('%Y-%m-%d'))}.\n\n"
        "Median over steps after warm-up, Adam (on a GPU: `AdamW(fused=True)`) timed "
        "interleaved in the same process: "
        "`optimizer.step()` and a whole training step (forward, backward, step); "
        "launches: on the CPU, the torch operators of one step that would launch a "
        "kernel on a GPU (views and allocations excluded, a multi-tensor operator counted "
        "once, work inside the fused kernels none), CUDA kernels on a GPU.\n\n"
    )
    if meta.get("path", {}).get("torch_path"):
        title += (
            "The learned optimizers run the path a GPU runs (`--torch-path`: multi-tensor torch "
            "operators, the guard on the device): on the CPU their times are the CPU's, their "
            "launches what a GPU launches.\n\n"
        )
    head = title + (
        "| model | params | optimizer | step (ms) | step / Adam | launches | train step (ms) | "
        "train / Adam | state (MB) | peak extra (MB) |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        for kind in OPTIMIZERS:
            step, train = r[f"{kind}_step_ms"], r[f"{kind}_train_ms"]
            lines.append(
                f"| {r['model']} | {r['params']:,} | {kind} | {step:.2f} | "
                f"{step / r['adam_step_ms']:.1f}x | {r[f'{kind}_launches']} | {train:.1f} | "
                f"{train / r['adam_train_ms']:.2f}x | {r[f'{kind}_state_mb']:.1f} | "
                f"{r.get(f'{kind}_peak_mb', float('nan')):.1f} |"
            )
    table = head + "\n".join(lines) + "\n"
    for kind, desc in meta.get("nets", {}).items():
        table += f"\n{kind}: {desc}"
    table += "\n"
    nf = [r for r in rows if "nf_ours_ms" in r]
    if nf:
        table += "\nNF-layer (16 -> 16 channels, one layer) against the `nfn` package:\n\n"
        table += "| model | ours (ms) | nfn (ms) | nfn / ours |\n|---|---|---|---|\n"
        for r in nf:
            table += (
                f"| {r['model']} | {r['nf_ours_ms']:.1f} | {r['nf_nfn_ms']:.1f} | "
                f"{r['nf_nfn_ms'] / r['nf_ours_ms']:.1f}x |\n"
            )
    (out / "overhead.md").write_text(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return table
    mlps = sorted((r for r in rows if r["model"].startswith("mlp")), key=lambda r: r["params"])
    if not mlps:  # the figure is step time against MLP size
        return table
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in OPTIMIZERS:
        ax.plot([r["params"] for r in mlps], [r[f"{kind}_step_ms"] for r in mlps], "o-", label=kind)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (MLP)")
    ax.set_ylabel("optimizer step (ms)")
    ax.set_title(f"step time, {meta['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "overhead.png", dpi=120)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> list[dict]:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.overhead",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        help=", ".join(MODELS) + "; on a GPU also " + ", ".join(GPU_MODELS),
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=30,
        help="timed steps per optimizer, interleaved, after two warm-up steps; the tables "
        "give their medians (default 30: a shared machine moves a median of 10 by a tenth)",
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("runs/overhead"))
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-nfn", action="store_true", help="skip the nfn reference layer")
    p.add_argument("--quick", action="store_true", help="tiny models, few repeats (CI)")
    p.add_argument(
        "--nfn",
        default=SHIPPED["nfn"][1],
        help="NFN net to time: a shipped name or a saved net's path",
    )
    p.add_argument(
        "--mlp",
        default=SHIPPED["mlp"][1],
        help="MLP net to time: a shipped name or a saved net's path",
    )
    p.add_argument(
        "--torch-path",
        action="store_true",
        help="learned optimizers on the path a GPU runs (multi-tensor torch operators, "
        "the guard on the device), on any device",
    )
    p.add_argument(
        "--slice-entries",
        type=int,
        default=None,
        metavar="N",
        help="slices of N entries in the per-entry layers on any device (default: the device's)",
    )
    args = p.parse_args(argv)
    cli.check_device("--device", args.device)
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: must be at least 1")
    if args.slice_entries is not None and args.slice_entries < 1:
        raise SystemExit(f"--slice-entries {args.slice_entries}: must be at least 1")
    names = {"nfn": args.nfn, "mlp": args.mlp}
    for kind, name in names.items():
        if _weights(name) is None:
            raise SystemExit(
                f"--{kind} {name}: not a shipped net ({', '.join(lopt.pretrained_names())}) "
                "nor a saved net's file"
            )
        want = SHIPPED[kind][0].net_class
        if not isinstance(lopt.load(name)[0], want):
            raise SystemExit(f"--{kind} {name}: not a {want.__name__}")
    if args.quick:
        args.models, args.repeats = ["mlp-tiny", "cnn-tiny"], 2
    device = torch.device(args.device)
    known = MODELS + GPU_MODELS
    unknown = [m for m in args.models if m not in known + ("mlp-tiny", "cnn-tiny")]
    if unknown:
        raise SystemExit(f"--models {' '.join(unknown)}: unknown ({', '.join(known)})")
    too_big = [m for m in args.models if m in GPU_MODELS and device.type != "cuda"]
    if too_big:
        raise SystemExit(
            f"--models {' '.join(too_big)}: sized for a GPU; run them with --device cuda"
        )
    rows = []
    old = use_path(args.torch_path, args.slice_entries)
    try:
        for name in tqdm(args.models, desc="models"):
            row = time_steps(name, device, args.repeats, args.batch, names)
            if not args.no_memory:
                for kind in OPTIMIZERS:
                    net = names.get(kind)
                    row[f"{kind}_peak_mb"] = peak_memory_mb(name, kind, args.device, net=net)
            if not args.no_nfn and device.type == "cpu":
                row.update(nfn_reference_ms(name, max(2, args.repeats // 2)) or {})
            rows.append(row)
    finally:
        restore_path(old)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "nets": net_descriptions(names),
        "path": {"torch_path": args.torch_path, "slice_entries": args.slice_entries},
        "command": "python -m benchmarks.overhead "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(write_outputs(rows, args.out, meta))
    return rows


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.overhead")
