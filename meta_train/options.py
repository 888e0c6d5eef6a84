"""What a meta-training option may hold: its type and range, checked before
a run does anything.

Every option of ``python -m meta_train`` (flag or ``--config`` key) has a
rule here; :func:`check` raises ``SystemExit`` naming the first bad one, in
the flag's spelling, with what it must be and what it got.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lopt.checkpoint import RETIRED_GUARDS
from lopt.cli import did_you_mean


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _fail(key: str, must: str, value: Any) -> SystemExit:
    return SystemExit(f"{flag(key)} must be {must}, got {value!r}")


def integer(low: int, optional: bool = False) -> Callable[[str, Any], None]:
    def rule(key: str, value: Any) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            must = f"a whole number >= {low}" + (" (or null)" if optional else "")
            raise _fail(key, must, value)

    return rule


def number(low: float | None = None, high: float | None = None, strict: bool = False,
           optional: bool = False) -> Callable[[str, Any], None]:  # fmt: skip
    def rule(key: str, value: Any) -> None:
        if optional and value is None:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        if ok and low is not None:
            ok = value > low if strict else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            if low is not None and high is not None:
                must = f"a number in {'(' if strict else '['}{low:g}, {high:g}]"
            elif low is not None:
                must = f"a finite number {'>' if strict else '>='} {low:g}"
            else:
                must = "a finite number"
            must += " (or null)" if optional else ""
            raise _fail(key, must, value)

    return rule


def boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)


def choice(
    options: Callable[[], list[str]] | list[str], listing: str = ""
) -> Callable[[str, Any], None]:
    """One of ``options``; ``listing`` says where a long list is shown."""

    def rule(key: str, value: Any) -> None:
        known = options() if callable(options) else options
        if value not in known:
            hint = did_you_mean(value, known) if isinstance(value, str) else ""
            where = listing or f"one of: {', '.join(map(str, known))}"
            raise SystemExit(f"{flag(key)}: unknown {value!r}{hint} ({where})")

    return rule


def family(
    names: Callable[[], list[str]], parse_mixture: Callable[[str], Any], listing: str
) -> Callable[[str, Any], None]:
    """A name of ``names`` or a weighted mixture of them (``A=0.7,B=0.3``),
    checked by ``parse_mixture``."""
    known = choice(names, listing)

    def rule(key: str, value: Any) -> None:
        if not (isinstance(value, str) and "=" in value):
            return known(key, value)
        try:
            parse_mixture(value)
        except (KeyError, ValueError) as e:
            raise SystemExit(f"{flag(key)}: {e.args[0]}") from None

    return rule


def text(optional: bool = False) -> Callable[[str, Any], None]:
    def rule(key: str, value: Any) -> None:
        if optional and value is None:
            return
        if not isinstance(value, str) or not value:
            raise _fail(key, "a non-empty string" + (" (or null)" if optional else ""), value)

    return rule


def strings(key: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(key, "a list of strings", value)


def device(key: str, value: Any) -> None:
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise _fail(key, "a torch device such as cpu, cuda or cuda:1", value) from None


def check(cfg: dict[str, Any], rules: dict[str, Callable[[str, Any], None]]) -> None:
    """Apply each option's rule; raise ``SystemExit`` for the first bad one."""
    for key, rule in rules.items():
        if key in cfg:
            rule(key, cfg[key])


# Options of older runs and recipes, in this version's terms: the net's
# update-rule switches were inverted flags, and hand-set guards and an
# orthogonalised base were options (a value that turned them on is refused).
_RETIRED = {**RETIRED_GUARDS, "decay_power": 1.0, "init_ortho_lr": None}


def upgrade(cfg: dict[str, Any], where: str, saved_run: bool = False) -> dict[str, Any]:
    """``cfg`` (a saved run's config.json or a --config file) in this
    version's option names: ``radial_correction`` becomes ``learned_term_tangent``
    (negated), ``input_width_factor`` becomes ``width_factor_on_input_layers``;
    retired options at their off value are dropped, and one that is on is
    refused with ``SystemExit``. A ``saved_run`` config written before either
    switch existed (it holds every option of its day) gets the update rule
    of that day: no tangent projection, the width factor on input layers."""
    cfg = dict(cfg)
    if saved_run and "learned_term_tangent" not in cfg:
        cfg.setdefault("radial_correction", True)
    if saved_run and "width_factor_on_input_layers" not in cfg:
        cfg.setdefault("input_width_factor", True)
    if "radial_correction" in cfg:
        cfg.setdefault("learned_term_tangent", not cfg.pop("radial_correction"))
    if "input_width_factor" in cfg:
        cfg.setdefault("width_factor_on_input_layers", cfg.pop("input_width_factor"))
    for key, off in _RETIRED.items():
        if key in cfg and cfg.pop(key) != off:
            raise SystemExit(
                f"{where}: {flag(key)} is set, and this version of lopt no longer has it "
                "(a net's update rule is lopt.UpdateRule)"
            )
    return cfg
