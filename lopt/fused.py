"""The fused CPU kernel of an optimizer net's per-entry part.

Per entry the nets compute features, a small MLP trunk and an output layer
(:meth:`lopt.nets.OptimizerNet.trunk_outputs`). In PyTorch ops that is about
a hundred passes over parameter-sized memory; ``csrc/entry_outputs.c`` does
it in one pass, in blocks that stay in L1. It is the same formula, checked
against the torch path by the tests, and serves only where no autograd or
vmap is involved: the ``torch.optim`` classes on CPU, float32 state
(``fused=`` on :class:`lopt.LearnedOptimizer`). Meta-training always runs
the torch path.

The C file is compiled on first use with the system's C compiler (``$CC``,
else ``cc``) into ``$LOPT_CACHE_DIR`` (default ``~/.cache/lopt``), keyed by a
hash of the source and flags; with OpenMP where the compiler has it, so the
kernel runs on ``torch.get_num_threads()`` of torch's own OpenMP threads.
Without a compiler, or with ``LOPT_FUSED=0``, :func:`available` is False and
the torch path runs.
"""

from __future__ import annotations

import ctypes
import hashlib
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

SOURCE = Path(__file__).with_name("csrc") / "entry_outputs.c"
ABI = 2  # lopt_entry_outputs_abi() of the C file this wrapper matches
MIN_ENTRIES_PER_THREAD = 32768  # below this, splitting costs more than it saves

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
    fn.argtypes += [ptr, ptr, ptr, ptr, i32, ptr, ptr, f32, ptr, ptr, i32]
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
                    stacklevel=3,
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
    return not torch.is_grad_enabled() and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


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
) -> tuple[Tensor, Tensor]:
    """The fused per-entry pass over one tensor (see ``csrc/entry_outputs.c``).

    ``layers`` are the trunk's ``(weight, bias)`` pairs, the first with the
    channel scales folded in; ``w_out`` is ``(outputs, width)``. Returns
    ``out`` of shape ``(outputs, numel)`` and ``base`` of shape ``(numel,)``."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the fused kernel is unavailable: {unavailable_reason()}")
    n = param.numel()
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
    out = param.new_empty(w_out.shape[0], n)
    base = param.new_empty(n)
    k = momenta.shape[0]
    threads = min(torch.get_num_threads(), max(1, n // MIN_ENTRIES_PER_THREAD))
    code = lib.lopt_entry_outputs(
        n,
        param.data_ptr(),
        grad.data_ptr(),
        momenta.data_ptr(),
        n,
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
        w_out.shape[0],
        w_out.data_ptr(),
        b_out.data_ptr(),
        base_scale,
        out.data_ptr(),
        base.data_ptr(),
        threads,
    )
    if code:
        raise ValueError(
            f"the fused kernel rejected the net's shape (width {width}, outputs "
            f"{w_out.shape[0]}, {k} momenta): use fused=False"
        )
    return out, base
