"""Speed of our equivariant linear NF-layer stack against the `nfn` package.

Both stacks are NP layers (input / output neurons permutable) of equal channel
widths with ReLU between them, on the weight space of one MLP. Times are
taken in one run, interleaved, and reported as the ratio nfn / ours.

    python -m benchmarks.nf_layers                      # ~1.8M-parameter MLP
    python -m benchmarks.nf_layers --widths 64 128 10 --channels 4 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lopt import WeightSpace, WeightSpaceSpec, cli
from lopt.nn import NFLinear, WSReLU


def our_stack(spec: WeightSpaceSpec, channels: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(NFLinear(spec, channels, channels))
        if i < depth - 1:
            layers.append(WSReLU())
    return nn.Sequential(*layers)


def nfn_stack(weights, biases, channels: int, depth: int):
    from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
    from nfn.layers import NPLinear, TupleOp

    spec = network_spec_from_wsfeat(WeightSpaceFeatures(weights, biases))
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(NPLinear(spec, channels, channels))
        if i < depth - 1:
            layers.append(TupleOp(nn.ReLU()))
    return nn.Sequential(*layers), WeightSpaceFeatures


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.nf_layers",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--widths", type=int, nargs="+", default=[784, 1024, 1024, 10])
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--depth", type=int, default=2, help="NF-layers in the stack")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if len(args.widths) < 3 or min(args.widths) < 1:
        p.error(f"--widths must be 3 or more sizes >= 1 (input, hidden, output), got {args.widths}")
    for flag, v in (("--channels", args.channels), ("--depth", args.depth),
                    ("--repeats", args.repeats), ("--threads", args.threads or 1)):  # fmt: skip
        if v < 1:
            p.error(f"{flag} must be a whole number >= 1, got {v}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    mlp = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(args.widths[:-1], args.widths[1:])])
    spec = WeightSpaceSpec.from_module(mlp)
    n_params = spec.numel
    c = args.channels
    ours = our_stack(spec, c, args.depth)
    ws = WeightSpace(spec, [torch.randn(*t.view, c) for t in spec.tensors])

    try:
        theirs, WSF = nfn_stack(
            [torch.randn(1, c, *m.weight.shape) for m in mlp],
            [torch.randn(1, c, *m.bias.shape) for m in mlp],
            c,
            args.depth,
        )
    except ImportError:
        raise SystemExit("this benchmark needs the reference package: pip install nfn") from None
    feats = WSF(
        tuple(x.permute(2, 0, 1)[None] for x in ws.tensors[0::2]),
        tuple(x.permute(1, 0)[None] for x in ws.tensors[1::2]),
    )
    n_ref = sum(q.numel() for q in theirs.parameters())
    n_ours = sum(q.numel() for q in ours.parameters())

    def run_ours():
        out = ours(ws)
        if args.backward:
            sum(x.sum() for x in out.tensors).backward()

    def run_theirs():
        out = theirs(feats)
        if args.backward:
            sum(x.sum() for x in out.weights + out.biases).backward()

    grad = torch.enable_grad() if args.backward else torch.no_grad()
    with grad:
        run_ours(), run_theirs()  # warm-up
        t_ours, t_ref = [], []
        for _ in range(args.repeats):  # interleaved so both see the same machine load
            t_ours += _time(run_ours, 1)
            t_ref += _time(run_theirs, 1)
    m_ours, m_ref = statistics.median(t_ours), statistics.median(t_ref)
    result = {
        "target_params": n_params,
        "channels": c,
        "depth": args.depth,
        "threads": torch.get_num_threads(),
        "ours_ms": 1e3 * m_ours,
        "nfn_ms": 1e3 * m_ref,
        "speedup": m_ref / m_ours,
        "ours_layer_params": n_ours,
        "nfn_layer_params": n_ref,
        "pass": "forward+backward" if args.backward else "forward",
    }
    print(
        f"| target params | channels | NF-layers | pass | ours (ms) | nfn (ms) | nfn / ours |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {n_params:,} | {c} | {args.depth} | {result['pass']} | {result['ours_ms']:.1f} "
        f"| {result['nfn_ms']:.1f} | {result['speedup']:.2f}x |"
    )
    return result


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.nf_layers")
