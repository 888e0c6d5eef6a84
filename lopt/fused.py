"""The fused CPU kernels of an optimizer step.

Per entry the nets compute features, a small MLP trunk and an output layer
(:meth:`lopt.nets.OptimizerNet.trunk_outputs`). In PyTorch ops that is about
a hundred passes over parameter-sized memory; ``csrc/entry_outputs.c`` does
a step in three passes per tensor, in blocks that stay in L1:

- :func:`state_update`: momenta and second moment, in place, and the sums
  the per-tensor channel scales need;
- :func:`entry_outputs`: features, trunk and output layer, and (for a
  matrix) the row and column sums of the channels the NF-layer pools;
- :func:`finish`: the NF-layer's row / column terms, the clamped exp and
  Adam's part: the update.

The ``*_many`` kernels run each pass once over every tensor of a parameter
group, from tables :mod:`lopt.fused_plan` builds once per weight space:
tensors too small to split are shared out whole between threads, larger
ones split; the pooled sums of the NF-layer are summed in the same pass
for any view of up to 4 axes, and :func:`flat_terms` and
:func:`stat_terms` compute the NF-layer's broadcast terms and the neuron
statistics' terms that :func:`finish_many` adds.

It is the same formula, checked against the torch path by the tests, and
serves only where no autograd or vmap is involved: the ``torch.optim``
classes on CPU, float32 state (``fused=`` on
:class:`lopt.LearnedOptimizer`). Meta-training always runs the torch path.

The C file is compiled on first use with the system's C compiler (``$CC``,
else ``cc``) into ``$LOPT_CACHE_DIR`` (default ``~/.cache/lopt``), keyed by a
hash of the source and flags; with OpenMP where the compiler has it, so the
kernel runs on ``torch.get_num_threads()`` of torch's own OpenMP threads.
Without a compiler, or with ``LOPT_FUSED=0``, :func:`available` is False and
the torch path runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lopt.warning_site import caller_stacklevel

SOURCE = Path(__file__).with_name("csrc") / "entry_outputs.c"
ABI = 7  # lopt_entry_outputs_abi() of the C file this wrapper matches
# Below this, splitting a tensor between threads costs more than it saves
# (every kernel reads it at its call: tests lower it to split tiny tensors).
MIN_ENTRIES_PER_THREAD = 32768

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _flags() -> list[str]:
    flags = ["-O3", "-fno-math-errno", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    ):
        flags += ["-mavx2", "-mfma"]
    return flags


def _cache_dir() -> Path:
    return Path(os.environ.get("LOPT_CACHE_DIR") or Path.home() / ".cache" / "lopt")


def _build() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} not on PATH)")
    errors = []
    for flags in (_flags() + ["-fopenmp"], _flags()):  # OpenMP if the compiler has it
        try:
            return _load(_compile(compiler, flags))
        except (RuntimeError, OSError) as e:  # OSError: unwritable cache, unloadable library
            errors.append(str(e))
    raise RuntimeError("; ".join(errors))


def _compile(compiler: str, flags: list[str]) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"entry_outputs-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Compile to a private name, then rename: concurrent processes never
        # load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            res = subprocess.run(
                [compiler, *flags, "-o", tmp, str(SOURCE), "-lm"],
                capture_output=True,
                text=True,
            )
            if res.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {res.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _load(target: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(target))
    if lib.lopt_entry_outputs_abi() != ABI:
        raise RuntimeError(f"{target} is not ABI {ABI}; delete it to rebuild")
    i64, i32, f32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn = lib.lopt_entry_outputs
    fn.restype = i32
    fn.argtypes = [i64, ptr, ptr, ptr, i64, i32, i32, ptr, f32, f32, i32, i32]
    fn.argtypes += [ptr, ptr, ptr, ptr, i32, ptr, ptr, f32, i32, ptr, ptr, i64, ptr, ptr, i32, i32]
    st = lib.lopt_state_update
    st.restype = i32
    st.argtypes = [i64, ptr, ptr, ptr, i64, i32, ptr, ptr, f32, ptr, i32]
    fin = lib.lopt_finish
    fin.restype = ctypes.c_double
    fin.argtypes = [i64, ptr, ptr, ptr, i64, ptr, ptr, i64, f32, i32]
    many = lib.lopt_state_update_many
    many.restype = i32
    many.argtypes = [i32, ptr, i64, i32, ptr, f32, ptr, i64, i32]
    many = lib.lopt_entry_outputs_many
    many.restype = i32
    many.argtypes = [i32, ptr, ptr, ptr, ptr, i32, i32, f32, f32, i32, i32, ptr, ptr, ptr, ptr]
    many.argtypes += [i32, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i32]
    many = lib.lopt_finish_many
    many.restype = ctypes.c_double
    many.argtypes = [i32, ptr, ptr, ptr, ptr, i64, ptr, f32, f32, ptr, i64, i32]
    flat = lib.lopt_flat_terms
    flat.restype = None
    flat.argtypes = [i64, ptr, ptr, i64, ptr, ptr, ptr, i32, ptr, ptr, i32, ptr, ptr, i64, ptr]
    flat.argtypes += [i64, i64, i32]
    stat = lib.lopt_stat_terms
    stat.restype = None
    stat.argtypes = [i64, i64, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    stat.argtypes += [ptr, i32, i32, f32, ptr, i64]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on the first call; None (after one warning)
    if it cannot be built or ``LOPT_FUSED=0``."""
    global _lib, _error
    if os.environ.get("LOPT_FUSED", "1") == "0":
        return None
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except Exception as e:  # no compiler, read-only cache, foreign platform
                _error = str(e)
                warnings.warn(
                    f"lopt: the fused CPU kernel is unavailable ({e}); using the torch path",
                    RuntimeWarning,
                    stacklevel=caller_stacklevel(),
                )
    return _lib


def available() -> bool:
    """Whether the fused CPU kernel can run here (compiling it if needed)."""
    return library() is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    if os.environ.get("LOPT_FUSED", "1") == "0":
        return "LOPT_FUSED=0"
    return "" if library() is not None else (_error or "unknown")


def accepts(*tensors: Tensor) -> bool:
    """Whether the kernel can read these tensors directly: CPU, float32,
    contiguous, no autograd recording."""
    return readable(*tensors) and all(map(Tensor.is_contiguous, tensors))


def readable(*tensors: Tensor) -> bool:
    """:func:`accepts` but for contiguity: what the kernel reads once the
    tensors are copied to contiguous buffers."""
    # map() over C-level getters: the multi-tensor step asks this of every
    # tensor of a group at every step.
    return (
        not torch.is_grad_enabled()
        and all(map(_is_cpu, tensors))
        and all(dtype is torch.float32 for dtype in map(_dtype, tensors))
    )


_is_cpu = operator.attrgetter("is_cpu")
_dtype = operator.attrgetter("dtype")


def accepts_state(param: Tensor, grad: Tensor, momenta: Tensor, second_moment: Tensor) -> bool:
    """:func:`accepts` for a tensor's state: ``momenta`` ``(K, *shape)`` may
    be a view whose momenta lie apart (a packed parameter's piece), each
    contiguous."""
    m = momenta
    if not accepts(param, grad, second_moment) or m.shape[1:] != param.shape:
        return False
    if m.device.type != "cpu" or m.dtype != torch.float32:
        return False
    # Each momentum laid out as the (contiguous) parameter is, the next one
    # at least a parameter further on.
    return m.stride()[1:] == param.stride() and (m.shape[0] == 1 or m.stride(0) >= param.numel())


def _threads(n: int) -> int:
    return min(torch.get_num_threads(), max(1, n // MIN_ENTRIES_PER_THREAD))


def _kernel() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the fused kernel is unavailable: {unavailable_reason()}")
    return lib


def entry_outputs(
    param: Tensor,
    grad: Tensor,
    momenta: Tensor,
    second_moment: Tensor,
    adam_momentum: int,
    rsqrt_c2: float,
    eps: float,
    layers: Sequence[tuple[Tensor, Tensor]],
    w_out: Tensor,
    b_out: Tensor,
    base_scale: float,
    pool_from: int | None = None,
    pool_cols: int = 0,
    stats: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The fused per-entry pass over one tensor (see ``csrc/entry_outputs.c``).

    ``layers`` are the trunk's ``(weight, bias)`` pairs, the first with the
    channel scales folded in; ``w_out`` is ``(outputs, width)``. Returns
    ``out`` of shape ``(outputs, numel)``, ``base`` of shape ``(numel,)`` and
    two Nones. With ``pool_from`` and ``pool_cols`` (the entries seen as a
    ``(numel / pool_cols, pool_cols)`` matrix), only the first ``pool_from``
    outputs are stored, and the rest are summed instead: the last two results
    are their row sums ``(outputs - pool_from, numel / pool_cols)`` and column
    sums ``(outputs - pool_from, pool_cols)``. With ``stats`` as well (and
    ``pool_from`` up to ``outputs``: none of them pooled), three more rows end
    both: the sums of ``p**2``, of Adam's direction squared (before the bias
    correction ``1 / c1``) and of ``g**2``."""
    lib = _kernel()
    n = param.numel()
    n_out = w_out.shape[0]
    pooling = pool_from is not None
    if pooling and (pool_cols < 1 or n % pool_cols or not 0 <= pool_from <= n_out):
        raise ValueError(f"cannot pool {n} entries in rows of {pool_cols} from output {pool_from}")
    if stats and not pooling:
        raise ValueError("stats are summed over rows and columns: give pool_from and pool_cols")
    width = layers[0][0].shape[0]
    w_in = layers[0][0].contiguous()
    b_in = layers[0][1].contiguous()
    if len(layers) > 1:
        w_hidden = torch.stack([w for w, _ in layers[1:]]).contiguous()
        b_hidden = torch.stack([b for _, b in layers[1:]]).contiguous()
        hidden_ptrs = (w_hidden.data_ptr(), b_hidden.data_ptr())
    else:
        hidden_ptrs = (None, None)
    w_out, b_out = w_out.contiguous(), b_out.contiguous()
    n_store = pool_from if pooling else n_out
    out = param.new_empty(n_store, n)
    base = param.new_empty(n)
    if pooling:
        pooled = n_out - n_store + 3 * stats
        rows = param.new_empty(pooled, n // pool_cols)
        cols = param.new_empty(pooled, pool_cols)
        sums = (rows.data_ptr(), cols.data_ptr())
    else:
        rows = cols = None
        sums = (None, None)
    k = momenta.shape[0]
    code = lib.lopt_entry_outputs(
        n,
        param.data_ptr(),
        grad.data_ptr(),
        momenta.data_ptr(),
        momenta.stride(0) if k > 1 else n,
        k,
        adam_momentum,
        second_moment.data_ptr(),
        rsqrt_c2,
        eps,
        width,
        len(layers),
        w_in.data_ptr(),
        b_in.data_ptr(),
        *hidden_ptrs,
        n_out,
        w_out.data_ptr(),
        b_out.data_ptr(),
        base_scale,
        n_store,
        out.data_ptr(),
        base.data_ptr(),
        pool_cols if pooling else 0,
        *sums,
        int(stats),
        _threads(n),
    )
    if code == 2:
        raise MemoryError("the fused kernel could not allocate its pooling buffers")
    if code:
        raise ValueError(
            f"the fused kernel rejected the net's shape (width {width}, outputs "
            f"{n_out}, {k} momenta): use fused=False"
        )
    return out, base, rows, cols


def finish(
    direction: Tensor,
    magnitude: Tensor,
    base: Tensor,
    max_magnitude: float,
    cols: int | None = None,
    row_terms: Tensor | None = None,
    col_terms: Tensor | None = None,
) -> tuple[Tensor, float]:
    """``base + (direction + terms) * exp(min(magnitude + terms, max_magnitude))``
    in one pass, written over ``base`` (all ``(numel,)``), and its sum (not
    finite when an entry is not). The terms see the entries as a ``(numel /
    cols, cols)`` matrix: ``row_terms`` ``(rows, 2)`` and ``col_terms`` ``(2,
    cols)`` (its rows may lie apart: a slice of a wider buffer) hold a
    (direction, magnitude) pair per row and per column."""
    lib = _kernel()
    n = base.numel()
    cols = n if cols is None else cols
    if cols < 1 or n % cols:
        raise ValueError(f"cannot see {n} entries as rows of {cols}")
    if row_terms is not None and tuple(row_terms.shape) != (n // cols, 2):
        raise ValueError(f"row_terms must be ({n // cols}, 2), got {tuple(row_terms.shape)}")
    if col_terms is not None and tuple(col_terms.shape) != (2, cols):
        raise ValueError(f"col_terms must be (2, {cols}), got {tuple(col_terms.shape)}")
    if not accepts(direction, magnitude, base):
        raise ValueError("finish reads contiguous float32 CPU tensors without autograd")
    if row_terms is not None:
        row_terms = row_terms.contiguous()
    if col_terms is not None and (col_terms.stride(1) != 1 or col_terms.stride(0) < cols):
        col_terms = col_terms.contiguous()
    total = lib.lopt_finish(
        n,
        direction.data_ptr(),
        magnitude.data_ptr(),
        base.data_ptr(),
        cols,
        None if row_terms is None else row_terms.data_ptr(),
        None if col_terms is None else col_terms.data_ptr(),
        cols if col_terms is None else col_terms.stride(0),
        max_magnitude,
        _threads(n),
    )
    return base, total


def state_update(
    param: Tensor,
    grad: Tensor,
    momenta: Tensor,
    second_moment: Tensor,
    weights: Sequence[float],
    second_moment_decay: float,
    out: Tensor | None = None,
) -> Tensor:
    """This step's optimizer-state update, in place, in one pass: ``momenta[k]``
    lerps towards ``grad`` with ``weights[k]`` (as ``torch.lerp``) and the
    second moment becomes ``decay * v + (1 - decay) * grad**2``. Returns, from
    the same pass, the sums :func:`lopt.features.channel_scales` needs:
    ``(sum p^2, sum g^2, sum m_k^2 for each k, sum v)`` as float64, in
    ``out`` when given (a contiguous float64 ``(k + 3,)``)."""
    lib = _kernel()
    k = momenta.shape[0]
    if len(weights) != k or not accepts_state(param, grad, momenta, second_moment):
        raise ValueError("state_update reads contiguous float32 CPU tensors, one weight a momentum")
    n = param.numel()
    w = _weights(tuple(float(x) for x in weights))
    if out is None:
        sums = torch.empty(k + 3, dtype=torch.float64)
    elif out.dtype != torch.float64 or out.shape != (k + 3,) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float64 tensor of shape ({k + 3},)")
    else:
        sums = out
    code = lib.lopt_state_update(
        n,
        param.data_ptr(),
        grad.data_ptr(),
        momenta.data_ptr(),
        momenta.stride(0) if k > 1 else n,
        k,
        w.data_ptr(),
        second_moment.data_ptr(),
        second_moment_decay,
        sums.data_ptr(),
        _threads(n),
    )
    if code:
        raise ValueError(f"the fused kernel takes 1 to 13 momenta, got {k}")
    return sums


@functools.cache
def _weights(weights: tuple[float, ...]) -> Tensor:
    return torch.tensor(weights, dtype=torch.float32)  # read by the kernel, never written


# The multi-tensor kernels (lopt.fused_plan builds their tables). Each takes
# a contiguous int64 table, one row a tensor, whose columns hold sizes and
# the addresses of the tensors' memory.
STATE_FIELDS = ("n", "p", "g", "m", "m_stride", "v")  # what the state pass reads of a row
ENTRY_FIELDS = STATE_FIELDS + ("offset", "n_out", "stats", "d0", "d1", "d2", "d3", "pool_begin",
                               "pool_end", "scratch", "scratch_at")  # fmt: skip
POOL_FIELDS = ("src", "c0", "nc", "rows", "dst", "soff", "s0", "s1", "s2", "s3",
               "sd0", "sd1", "sd2", "sd3", "kind", "axis")  # fmt: skip
POOL_GENERIC, POOL_ENTRIES, POOL_AXIS = 0, 1, 2  # a pool's kind (csrc: struct pool)
FINISH_FIELDS = ("n", "offset", "d0", "d1", "d2", "d3", "term_begin", "term_end", "rows", "p",
                 "ops_begin", "ops_end")  # fmt: skip
OP_FIELDS = ("kind", "dst", "src", "src2", "count", "outer", "mid", "inner", "dst_stride",
             "src_stride")  # fmt: skip
OP_ZERO, OP_ADD, OP_EXPAND = 0, 1, 2  # a dense-terms op's kind (csrc: dense_ops)
TERM_FIELDS = ("dir", "mag", "s0", "s1", "s2", "s3")
MAX_TERMS = 64  # terms of one tensor lopt_finish_many adds


def _table(table: Tensor, fields: Sequence[str]) -> int:
    if table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != len(fields):
        raise ValueError(f"a table must be int64 of shape (rows, {len(fields)})")
    if not table.is_contiguous():
        raise ValueError("a table must be contiguous")
    return table.data_ptr()


def state_update_many(
    table: Tensor, weights: Sequence[float], second_moment_decay: float, sums: Tensor
) -> Tensor | None:
    """:func:`state_update` for every tensor of ``table`` (the rows of
    :func:`entry_outputs_many`'s table, whose first fields are
    :data:`STATE_FIELDS`) at once, the sums into ``sums`` (float64 ``(rows,
    k + 3)``). Returns ``sums``, or ``None`` when a gradient is not all
    finite: then nothing is written (the kernel reads every gradient first)."""
    lib = _kernel()
    k = len(weights)
    if sums.dtype != torch.float64 or tuple(sums.shape) != (table.shape[0], k + 3):
        raise ValueError(f"sums must be float64 of shape ({table.shape[0]}, {k + 3})")
    w = _weights(tuple(float(x) for x in weights))
    code = lib.lopt_state_update_many(
        table.shape[0], _table(table, ENTRY_FIELDS), len(ENTRY_FIELDS), k, w.data_ptr(),
        second_moment_decay,
        sums.data_ptr(), MIN_ENTRIES_PER_THREAD, torch.get_num_threads(),
    )  # fmt: skip
    if code == 3:
        return None
    if code:
        raise ValueError(f"the fused kernel takes 1 to 13 momenta, got {k}")
    return sums


def entry_outputs_many(
    table: Tensor,
    base_scales: Tensor,
    pools: Tensor,
    pool_scales: Tensor,
    adam_momentum: int,
    k_momenta: int,
    rsqrt_c2: float,
    eps: float,
    w_in: Tensor,
    b_in: Tensor,
    hidden: tuple[Tensor, Tensor] | None,
    w_out: Tensor,
    b_out: Tensor,
    out: Tensor,
    base: Tensor,
    scratch: Tensor | None = None,
) -> None:
    """:func:`entry_outputs` for every tensor of ``table`` (rows of
    :data:`ENTRY_FIELDS`) at once: tensor i reads ``w_in[i]`` ``(width,
    features)``, ``w_out[i]`` ``(n_out_max, width)`` (its first ``n_out``
    rows) and ``b_out[i]``, writes its first two outputs to ``out[:, offset:
    offset + n]`` and Adam's part times ``base_scales[i]`` to ``base``, and
    sums its other outputs (and with ``stats`` the three statistics) into
    the pools of rows ``pool_begin`` to ``pool_end`` of ``pools`` (rows of
    :data:`POOL_FIELDS`: each writes its sums times its ``pool_scales``
    entry, channels last, at its ``dst`` address, none where that is 0).
    ``scratch`` (float32, at least the largest ``scratch_at + scratch``)
    holds the sums of tensors that run on one thread, so a step touches no
    fresh memory for them; without it they are allocated."""
    lib = _kernel()
    count = table.shape[0]
    width = w_in.shape[1]
    for x in (base_scales, pool_scales, w_in, b_in, w_out, b_out, out, base):
        if not accepts(x):
            raise ValueError("entry_outputs_many reads contiguous float32 CPU tensors")
    if scratch is not None and not accepts(scratch):
        raise ValueError("scratch must be contiguous float32")
    if w_in.shape[0] != count or w_out.shape[0] != count or base_scales.shape != (count,):
        raise ValueError(f"w_in, w_out and base_scales need one entry per tensor ({count})")
    if pool_scales.shape != (pools.shape[0],):
        raise ValueError("pool_scales needs one entry per pool")
    depth = 1
    hidden_ptrs = (None, None)
    if hidden is not None:  # (depth - 1, width, width) and (depth - 1, width)
        if not accepts(*hidden) or hidden[0].shape[1:] != (width, width):
            raise ValueError(f"hidden layers must be contiguous float32 ({width}, {width})")
        depth += hidden[0].shape[0]
        hidden_ptrs = (hidden[0].data_ptr(), hidden[1].data_ptr())
    code = lib.lopt_entry_outputs_many(
        count, _table(table, ENTRY_FIELDS), base_scales.data_ptr(), _table(pools, POOL_FIELDS),
        pool_scales.data_ptr(), k_momenta, adam_momentum, rsqrt_c2, eps, width, depth,
        w_in.data_ptr(), b_in.data_ptr(), *hidden_ptrs, w_out.shape[1], w_out.data_ptr(),
        b_out.data_ptr(), out.data_ptr(), out.stride(0), base.data_ptr(),
        None if scratch is None else scratch.data_ptr(),
        0 if scratch is None else scratch.numel(), MIN_ENTRIES_PER_THREAD, torch.get_num_threads(),
    )  # fmt: skip
    if code == 2:
        raise MemoryError("the fused kernel could not allocate its pooling buffers")
    if code:
        raise ValueError(
            "the fused kernel rejected the net's shape, a tensor's view or the scratch's length"
        )


def finish_many(
    table: Tensor, terms: Tensor, out: Tensor, base: Tensor, max_magnitude: float,
    scale: float, sums: Tensor, ops: Tensor | None = None,
) -> float:  # fmt: skip
    """:func:`finish` for every tensor of ``table`` (rows of
    :data:`FINISH_FIELDS`) at once, over ``base``: each adds its terms
    (rows ``term_begin`` to ``term_end`` of ``terms``, rows of
    :data:`TERM_FIELDS`: an entry reads ``dir[r]`` and ``mag[r]``, ``r`` the
    sum of its view index times the strides); with ``rows`` > 0 the learned
    term loses its part along each of the parameter's rows (at address
    ``p``); then the whole update is multiplied by ``scale``. Each tensor's
    sum goes to ``sums`` (float64); returns their total (not finite when an
    update is not). A tensor's rows ``ops_begin`` to ``ops_end`` of ``ops``
    (rows of :data:`OP_FIELDS`) run first: they sum terms densely into
    buffers its terms then read."""
    lib = _kernel()
    if ops is None:
        ops = torch.zeros(0, len(OP_FIELDS), dtype=torch.int64)
    if not accepts(out, base) or sums.dtype != torch.float64 or sums.shape != (table.shape[0],):
        raise ValueError("finish_many reads contiguous float32 CPU buffers and float64 sums")
    return lib.lopt_finish_many(
        table.shape[0], _table(table, FINISH_FIELDS), _table(terms, TERM_FIELDS),
        _table(ops, OP_FIELDS), out.data_ptr(),
        out.stride(0), base.data_ptr(), max_magnitude, scale, sums.data_ptr(),
        MIN_ENTRIES_PER_THREAD, torch.get_num_threads(),
    )  # fmt: skip


def flat_terms(
    bags: Tensor,
    members: Tensor,
    bias_row: Tensor,
    bias_index: Tensor,
    means: Tensor,
    weights: Tensor,
    biases: Tensor,
    row_tensor: Tensor,
    scales: Tensor,
    out: Tensor,
) -> Tensor:
    """:func:`lopt.nn.flat_terms.buffer` in one pass, from the pooled means as
    the rows of one matrix ``means`` (the pools in
    :attr:`~lopt.nn.flat_terms.FlatPlan.pools`' order, each one's entries in
    row-major order of the axes it keeps), each row then times its tensor's
    ``scales`` ``(T, 2)``, written to ``out`` ``(2,
    rows)`` (its rows may lie apart) as direction and log-magnitude (a zero
    direction when the layer writes the magnitude alone). ``bags`` ``(bags,
    4)``, sorted by output row, holds each bag's output row, key, number of
    members and first member in ``members`` (rows of ``means``);
    ``weights`` is ``(keys, c_in, c_out)``, ``biases`` ``(bias keys,
    c_out)``."""
    lib = _kernel()
    longs = (bags, members, bias_row, bias_index, row_tensor)
    if any(x.dtype != torch.int64 or not x.is_contiguous() for x in longs) or bags.dim() != 2:
        raise ValueError("flat_terms reads contiguous int64 index tensors, bags (bags, 4)")
    if not accepts(means, weights, biases, scales) or weights.dim() != 3:
        raise ValueError("flat_terms reads contiguous float32 CPU tensors")
    c_in, c_out = weights.shape[1:]
    rows = row_tensor.shape[0]
    if means.shape[1] != c_in or c_in > 256 or c_out not in (1, 2) or out.shape != (2, rows):
        raise ValueError(f"flat_terms: means ({c_in} channels), c_out 1 or 2, out (2, {rows})")
    if out.stride(1) != 1 or out.dtype != torch.float32:
        raise ValueError("flat_terms writes float32 rows")
    lib.lopt_flat_terms(
        bags.shape[0], bags.data_ptr(), members.data_ptr(), bias_row.shape[0],
        bias_row.data_ptr(), bias_index.data_ptr(), means.data_ptr(), c_in, weights.data_ptr(),
        biases.data_ptr(), c_out, row_tensor.data_ptr(), scales.data_ptr(), rows, out.data_ptr(),
        out.stride(0), MIN_ENTRIES_PER_THREAD, torch.get_num_threads(),
    )  # fmt: skip
    return out


def stat_terms(
    sums: tuple[Tensor, Tensor, Tensor],
    row_tensor: Tensor,
    row_count: Tensor,
    slot_tensor: Tensor,
    slot_count: Tensor,
    numel: Tensor,
    shift: Tensor,
    whole_pool: Tensor,
    adam_scales: Tensor,
    scales: Tensor,
    weights: Tensor,
    row_pool: int,
    column_pool: int,
    stat_floor: float,
    out: Tensor,
) -> Tensor:
    """The neuron statistics' terms of :meth:`lopt.nets.NFNNet.stat_terms`
    for every tensor, in one pass: from the sums
    ``(rows, 3)``, ``(slots, 3)`` and ``(T, 3)`` and the layout (per row and
    slot its tensor and entry count; per tensor its entries, the shift of
    its parameter statistic and the pool of its whole-tensor term), with
    ``weights`` ``(pools, 3)`` (the statistics' coefficients over
    ``mag_mult``), writes the row, slot and tensor terms to ``out`` ``(2,
    rows + slots + T)`` (its rows may lie apart), a zero direction row
    first."""
    lib = _kernel()
    rows, slots, count = (x.shape[0] for x in sums)
    longs = (row_tensor, slot_tensor, whole_pool)
    floats = (*sums, row_count, slot_count, numel, shift, adam_scales, scales, weights)
    if any(x.dtype != torch.int64 or not x.is_contiguous() for x in longs):
        raise ValueError("stat_terms reads contiguous int64 index tensors")
    if not accepts(*floats) or any(x.shape[1:] != (3,) for x in sums):
        raise ValueError("stat_terms reads contiguous float32 CPU tensors, sums (., 3)")
    if out.shape != (2, rows + slots + count) or out.stride(1) != 1 or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 rows of shape (2, {rows + slots + count})")
    lib.lopt_stat_terms(
        rows, slots, count, *(x.data_ptr() for x in sums), row_tensor.data_ptr(),
        row_count.data_ptr(), slot_tensor.data_ptr(), slot_count.data_ptr(), numel.data_ptr(),
        shift.data_ptr(), whole_pool.data_ptr(), adam_scales.data_ptr(), scales.data_ptr(),
        weights.data_ptr(), row_pool, column_pool, stat_floor, out.data_ptr(), out.stride(0),
    )  # fmt: skip
    return out
