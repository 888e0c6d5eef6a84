"""The unlearned choices of how an optimizer net's outputs become an update.

An optimizer net meta-learns its rates, its width exponent, its per-entry
and per-neuron terms and (with a step budget) its schedule. Two choices in
the update formula are not learned; they are fixed when a net is built,
meta-trained with it, and saved in its checkpoint. :class:`UpdateRule` holds
them; its defaults are the shipped nets'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class UpdateRule:
    """How an optimizer net's update is formed, beyond what it learns.

    Args:
        learned_term_tangent: the learned term of the update of every weight
            of 2+ axes (the update minus Adam's part) moves each row of the
            weight (an output neuron or channel) only tangent to itself, so
            to first order only Adam's part grows or shrinks a row's norm.
            Short meta-training unrolls reward a net that inflates weights
            (larger logits lower the loss fast), which destabilises deep
            networks later in a run. Default ``True``.
        width_factor_on_input_layers: the width factor ``(64 / fan_in) **
            fan_in_exp`` also scales the update of layers that read the
            network's input, whose fan-in is the data's (16 features, 1
            channel x 3 x 3), not a width. ``False`` (the default) leaves
            them at 1, muP's rule.
    """

    learned_term_tangent: bool = True
    width_factor_on_input_layers: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool):
                raise TypeError(f"UpdateRule.{f.name} must be True or False, got {value!r}")

    def to_dict(self) -> dict[str, bool]:
        """Plain data, as a checkpoint stores it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpdateRule:
        """The rule a checkpoint or config stores; unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown UpdateRule setting {unknown[0]!r} (known: {', '.join(sorted(known))})"
            )
        return cls(**data)

    @classmethod
    def coerce(cls, rule: UpdateRule | dict[str, Any] | None) -> UpdateRule:
        """``rule`` as an UpdateRule: None is the default rule."""
        if rule is None:
            return cls()
        if isinstance(rule, cls):
            return rule
        if isinstance(rule, dict):
            return cls.from_dict(rule)
        raise TypeError(f"rule must be an UpdateRule, a dict or None, got {type(rule).__name__}")
