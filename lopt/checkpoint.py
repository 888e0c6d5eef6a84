"""Save and load optimizer nets with their config; the pretrained registry.

A checkpoint is a ``torch.save`` dict: a format tag and version, the net's
class name and constructor config, its state dict and free-form metadata
(how it was trained). Files in ``lopt/pretrained/`` are the shipped weights:
``weights="<file stem>"`` loads one.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from lopt.nets import NETS, OptimizerNet
from lopt.warning_site import caller_stacklevel

FORMAT = "lopt-optimizer-net"
# 2: nets have a width exponent (fan_in_exp); version 1 files get 0.
# 3: nets may read the step budget (config "budget"); older files never do.
# 4: NFN nets have NF-layer weights for attention's roles; older files do not.
# 5: a packed attention projection is read in pieces (query-key rows, value
#    rows), so the NF-layer's attention roles changed: a version-4 net gets
#    zeros for the new ones (no such term, as before) and drops the old.
# 6: what of the update is not learned is one object, the net's UpdateRule
#    (config "rule"); older files had input_width_factor and
#    radial_correction (inverted), and hand-set guards (step_cap, adam_cap,
#    decay_after, decay_power, warmup) and an orthogonalised base
#    (ortho_lr), which this version does not apply.
VERSION = 6
# What a version-5-or-older config held, off (each one's "no effect" value).
RETIRED_GUARDS = {"step_cap": 0.0, "adam_cap": 0.0, "decay_after": 0.0, "warmup": 0.0}
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT = "default"  # weights= of the optimizer classes: the recommended shipped net
# The recommended shipped net of each net class (OptimizerNet: any class).
RECOMMENDED = {"NFNNet": "nfn-real", "PerParamMLP": "mlp-real", "OptimizerNet": "nfn-real"}


def recommended(net_class: type[OptimizerNet]) -> str:
    """The shipped name ``weights="default"`` loads for ``net_class``."""
    return RECOMMENDED[net_class.__name__]


def pretrained_names() -> list[str]:
    """Names accepted by ``weights=``: the shipped files in ``lopt/pretrained/``."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt"))


def save(
    net: OptimizerNet, path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> None:
    """Write ``net`` atomically (temp file + rename): a crash never leaves a
    half-written checkpoint under ``path``."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "net": type(net).__name__,
        "config": net.config,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        # Plain JSON types only, so the file loads with weights_only=True.
        "metadata": json.loads(json.dumps(dict(metadata or {}), default=str)),
    }
    atomic_save(payload, path)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def unreadable(path: Path, error: BaseException) -> str:
    """Why ``torch.load`` could not read ``path``, in plain words: never a
    blank reason, and never torch's advice to turn safe loading off (which
    would let an untrusted file run code)."""
    size = path.stat().st_size if path.exists() else None
    if size == 0:
        return f"{path}: the file is empty (0 bytes; a write that never finished?)"
    text = str(error)
    if "Unsupported global" in text:
        return (
            f"{path}: holds Python objects other than tensors and plain data, which are "
            "not loaded (loading them could run code); it was not written by lopt"
        )
    # torch's own words name unpickler internals, or advise loading unsafely.
    return (
        f"{path}: not a readable checkpoint: corrupt, truncated or not a torch file ({size} bytes)"
    )


def resolve(weights: str | os.PathLike) -> Path:
    """A shipped name or a path to a file."""
    path = Path(weights)
    if path.is_file():
        return path
    if isinstance(weights, str) and weights in pretrained_names():
        return PRETRAINED_DIR / f"{weights}.pt"
    names = pretrained_names()
    raise FileNotFoundError(
        f"no optimizer checkpoint {str(weights)!r}: not a file, and not a shipped name "
        f"({', '.join(names) if names else 'none shipped yet'})"
    )


def load(
    weights: str | os.PathLike, expect: type[OptimizerNet] | None = None
) -> tuple[OptimizerNet, dict[str, Any]]:
    """Rebuild the net stored in a checkpoint; returns ``(net, metadata)``.

    Raises ``ValueError`` for a file that is not a readable lopt checkpoint
    (corrupt, truncated, another format or a newer version), for a net of
    another class than ``expect``, and for weights of the wrong shapes.
    """
    path = resolve(weights)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(unreadable(path, e)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an lopt optimizer-net checkpoint")
    if payload.get("version", 0) > VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {payload['version']} is newer than this "
            f"lopt ({VERSION}); upgrade lopt"
        )
    name = payload.get("net")
    if name not in NETS:
        raise ValueError(f"{path}: unknown optimizer net {name!r} (known: {sorted(NETS)})")
    if expect is not None and not issubclass(NETS[name], expect):
        raise ValueError(f"{path}: holds a {name}, but a {expect.__name__} is needed")
    config = dict(payload["config"])
    if payload.get("version", 0) < 4 and name == "NFNNet":
        config["attention_roles"] = False
    if payload.get("version", 0) < 6:
        config = upgrade_config_v6(config, path)
    net = NETS[name](**config)
    state = dict(payload["state_dict"])
    if payload.get("version", 0) == 4 and config.get("attention_roles"):
        state = _attention_roles_v5(net, state)
    if payload.get("version", 0) < 2 and "fan_in_exp" not in state:
        state["fan_in_exp"] = torch.zeros(())  # no width factor, as those nets ran
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit a {name} with this config: {e}") from e
    return net, payload.get("metadata", {})


def upgrade_config_v6(config: dict[str, Any], where: str | os.PathLike) -> dict[str, Any]:
    """A version-5-or-older net config in this version's terms: its switches
    as an UpdateRule (``rule``), its hand-set guards dropped with a warning
    when they were on; a net on the orthogonalised base is refused."""
    config = dict(config)
    if config.pop("ortho_lr", None) is not None:
        raise ValueError(
            f"{where}: the net steps some weights along their orthogonalised momentum "
            "(ortho_lr), which this version of lopt no longer has"
        )
    config["rule"] = {
        # Both were on when absent (files older than the switches).
        "learned_term_tangent": not config.pop("radial_correction", True),
        "width_factor_on_input_layers": bool(config.pop("input_width_factor", True)),
    }
    config.pop("decay_power", None)  # only with decay_after
    on = {k: config.pop(k) for k in RETIRED_GUARDS if k in config}
    on = {k: v for k, v in on.items() if v != RETIRED_GUARDS[k]}
    if on:
        settings = ", ".join(f"{k}={v:g}" for k, v in on.items())
        warnings.warn(
            f"{where}: the net was set to {settings}, hand-set guards that this version "
            "of lopt does not apply; it runs without them",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    return config


def _attention_roles_v5(net: OptimizerNet, state: dict[str, torch.Tensor]) -> dict:
    """A version-4 NFN state dict for this version's NF-layer roles: the
    roles this version adds at zero, the ones it no longer has dropped."""
    ours = net.state_dict()
    nf = ("nf.weights.", "nf.biases.")
    out = {k: v for k, v in state.items() if k in ours or not k.startswith(nf)}
    for k, v in ours.items():
        if k.startswith(nf) and k not in out:
            out[k] = torch.zeros_like(v)
    return out
