"""Learned optimizers as ``torch.optim.Optimizer`` classes.

The classes gather each parameter group's parameters, gradients and state,
call :func:`lopt.functional.update` (the one code path, shared with
meta-training), and write parameters and state back in place.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lopt import functional
from lopt import fused as fused_kernel
from lopt.checkpoint import DEFAULT, load, recommended
from lopt.features import loss_state
from lopt.nets import NFNNet, OptimizerNet, PerParamMLP
from lopt.warning_site import caller_stacklevel
from lopt.weightspace import LOCAL, Axis, TensorSpec, WeightSpaceSpec

_STATE_KEYS = ("momenta", "second_moment")


class LearnedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` driven by an optimizer net.

    The update, per parameter group (the net's ``lr_net``, ``c``, ``e`` and
    the schedule ``s`` are meta-learned; ``fan_in`` is a tensor's size over
    all but its first axis, 1-D tensors take no width factor)::

        input: params theta, net phi, lr gamma, total_steps N (or unknown),
               the loss L_t (optional; read by nets built with loss_features)
        initialise: momenta m_k = 0 (decays b_k = 0.5, 0.9, 0.99, 0.999),
                    second moment v = 0, t = 0, loss averages a_b = 0 (b = 0.9, 0.99)
        each step:
            g = grad f(theta)
            z = [tanh(log L_t - a_b), tanh(log L_t - min_s<t log L_s), 1]  (0 if L_t unknown)
            a_b = b a_b + (1 - b) log L_t  (bias-corrected where read)
            if g is not finite: skipped += 1, nothing else changes
            t = t + 1
            m_k = b_k m_k + (1 - b_k) g;  v = 0.999 v + 0.001 g^2
            adam = (m_0.9 / (1 - 0.9^t)) / (sqrt(v / (1 - 0.999^t)) + 1e-8)
            x = [theta, g, m_k, sqrt(v)] / RMS over the tensor, g / sqrt(v_hat), adam
            d, m = net_phi(x, t, t / N, z)   (the NFN adds per-neuron pooled terms)
            a = -(64 / fan_in)^e lr_net adam;  l = -(64 / fan_in)^e c d exp(0.1 m)
            if theta is a weight of 2+ axes: l = l - <l, w_r> w_r / |w_r|^2, row by row
            u = s(t, N, z) (a + l)   (z only lowers s: s(t, N, z) <= s(t, N, 0))
            theta = theta + gamma u

    The row projection keeps the learned term ``l`` from growing or
    shrinking a weight's rows, and a layer that reads the network's input
    takes fan_in = 64 (no width factor): the defaults of the net's
    :class:`~lopt.update_rule.UpdateRule`, which every shipped net uses.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        net: an :class:`~lopt.nets.OptimizerNet` to drive the steps (instead
            of ``weights``).
        weights: ``"default"`` (the default): the recommended shipped net
            of the class (``lopt.checkpoint.RECOMMENDED``: ``nfn-real`` for
            the NFN, ``mlp-real`` for the MLP); a shipped name (see
            :func:`lopt.pretrained_names`) or the path of a checkpoint
            written by :func:`lopt.save` / ``python -m meta_train``; or
            ``None`` for a fresh net built from ``net_kwargs`` (a sane, slow
            optimizer until meta-trained).
        spec: the weight space of the parameters: one
            :class:`~lopt.WeightSpaceSpec`, or one per parameter group.
        model: the ``nn.Module`` the parameters belong to; its layers give the
            spec. Without ``spec`` or ``model`` the spec is inferred from the
            parameter shapes in order (see :meth:`WeightSpaceSpec.from_shapes`).
        lr: a factor on the whole update (default 1: the update the net
            computes), per parameter group, so that torch's learning-rate
            schedulers (``StepLR``, ``CosineAnnealingLR``, ``LambdaLR``,
            ``OneCycleLR`` with ``cycle_momentum=False``) scale it.
        total_steps: the number of steps the run will take (as a cosine
            schedule is told), read by nets that know the budget (a group
            may set its own); None: not known, and the net falls back on
            what it learned for runs of unknown length (the shipped nets:
            runs of 100 to 2,000 steps; no decay), and the first step warns
            once. Nets without the budget input ignore it.
        fused: run the step on CPU through the fused kernels
            (:mod:`lopt.fused`, compiled on first use; each pass once over
            all tensors of a group, :mod:`lopt.fused_plan`): ``None``
            (default) when they are available, ``True`` to require them
            (raises if there is no C compiler), ``False`` for the plain torch
            ops. Same numbers up to float rounding. Parameters on a GPU
            (any device but the CPU) take the multi-tensor torch operators
            (:mod:`lopt.multi_tensor`): a number of kernels per step that
            does not grow with the number of tensors, the guard against
            non-finite steps run on the device, nothing read back to the
            host but the skipped-step count every ``SKIPS_BEFORE_WARNING``
            steps (not while a CUDA graph is captured), so the step can be
            captured in a CUDA graph.

    A net that reads the loss (``net.reads_loss``) takes it from
    ``step(closure)`` or ``step(loss=loss)``; without one it runs as it
    learned to for runs whose loss it was not told.

    To build a fresh net with other settings, pass ``net=NFNNet(...)``
    (``net_kwargs`` are its constructor's arguments, e.g. ``width``).
    Parameters without a gradient are skipped. A step whose gradients are not
    all finite changes nothing but the group's ``skipped`` counter; if the net
    produces non-finite updates, the parameters are left untouched (the state
    still takes in the step's finite gradient) and the step counts as skipped.
    After ``SKIPS_BEFORE_WARNING`` skipped steps in a row a ``RuntimeWarning``
    says so (once per optimizer): the parameters have stopped changing.
    """

    SKIPS_BEFORE_WARNING = 5

    net_class: type[OptimizerNet] = OptimizerNet

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        net: OptimizerNet | None = None,
        *,
        weights: str | os.PathLike | None = DEFAULT,
        spec: WeightSpaceSpec | Sequence[WeightSpaceSpec] | None = None,
        model: nn.Module | None = None,
        lr: float = 1.0,
        total_steps: int | None = None,
        fused: bool | None = None,
        **net_kwargs: Any,
    ) -> None:
        if net is not None and weights not in (None, DEFAULT):
            raise ValueError("give either net= or weights=, not both")
        if spec is not None and model is not None:
            raise ValueError("give either spec= or model=, not both")
        self.metadata: dict[str, Any] = {}
        if net is None and weights is not None:
            if net_kwargs:
                raise ValueError(
                    f"net options {sorted(net_kwargs)} build a fresh net: pass weights=None "
                    "with them"
                )
            if weights == DEFAULT:
                weights = recommended(self.net_class)
            net, self.metadata = load(weights, expect=self.net_class)
        elif net is None:
            net = self.net_class(**net_kwargs)
        elif not isinstance(net, self.net_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.net_class.__name__}, got {type(net).__name__}"
            )
        if fused and not fused_kernel.available():
            raise RuntimeError(
                f"fused=True, but the fused CPU kernel is unavailable: "
                f"{fused_kernel.unavailable_reason()}"
            )
        self._fused = fused
        defaults = {"lr": check_lr(lr), "total_steps": check_total_steps(total_steps)}
        super().__init__(params, defaults)
        self.net = net
        self._model = model
        self._model_spec: WeightSpaceSpec | None = None
        if model is not None:
            check_model_holds(model, self.param_groups)
        self._skips_in_a_row = [0] * len(self.param_groups)
        self._device_skips: dict[int, tuple[int, float]] = {}  # group: (steps, skipped seen)
        self._warned_skips = False
        self._warned_budget = False
        if isinstance(spec, WeightSpaceSpec):
            spec = [spec]
        if spec is not None and len(spec) != len(self.param_groups):
            raise ValueError(f"{len(spec)} specs for {len(self.param_groups)} parameter groups")
        self._group_specs: list[WeightSpaceSpec | None] = (
            list(spec) if spec else [None] * len(self.param_groups)
        )
        for i, group in enumerate(self.param_groups):
            check_total_steps(group["total_steps"], f"parameter group {i}: ")
            check_lr(group["lr"], f"parameter group {i}: ")
            self._full_spec(i, group)  # raise now, not at the first step, for a bad spec
        self._spec_cache: dict[tuple, WeightSpaceSpec] = {}

    # ------------------------------------------------------------------ specs
    def _full_spec(self, index: int, group: dict) -> WeightSpaceSpec:
        params = group["params"]
        explicit = self._group_specs[index] if index < len(self._group_specs) else None
        if explicit is not None:
            explicit.check(params)
            return explicit
        if self._model is not None:
            if self._model_spec is None:  # traced once
                self._model_spec = WeightSpaceSpec.from_module(self._model)
            model_spec = self._model_spec
            by_id = dict(zip(map(id, self._model.parameters()), model_spec.by_parameter()))
            tensors = [
                t
                for j, p in enumerate(params)
                for t in by_id.get(id(p))
                or (
                    TensorSpec(
                        f"param{j}",
                        tuple(p.shape),
                        tuple(p.shape),
                        tuple(Axis(LOCAL, n) for n in p.shape),
                        "standalone",
                    ),
                )
            ]
            return WeightSpaceSpec(tuple(tensors), model_spec.group_kinds, model_spec.mode)
        return WeightSpaceSpec.from_shapes([p.shape for p in params])

    def _spec(self, index: int, group: dict, active: list[int]) -> WeightSpaceSpec:
        key = (index, tuple(active), tuple(tuple(p.shape) for p in group["params"]))
        if key not in self._spec_cache:
            full = self._full_spec(index, group)
            if len(active) == len(full.names):
                self._spec_cache[key] = full
            else:
                self._spec_cache[key] = full.select(active)
        return self._spec_cache[key]

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        loss: Tensor | float | None = None,
    ) -> Tensor | None:
        """One step of every parameter group; returns the closure's loss
        (or None without a closure).

        Args:
            closure: reevaluates the model and returns the loss, as for any
                torch optimizer (optional).
            loss: this step's training loss (a number or a one-element
                tensor: the loss the gradients are of), for a net that reads
                it; the closure's when not given. Nets that do not read the
                loss ignore it.
        """
        if loss is not None:
            check_loss(loss)
        returned = None
        if closure is not None:
            with torch.enable_grad():
                returned = closure()
            if loss is None and returned is not None and self.net.reads_loss:
                loss = check_loss(returned)  # what else a closure returns is its own affair
        if isinstance(loss, Tensor):
            loss = loss.detach()
        for index, group in enumerate(self.param_groups):
            active = [j for j, p in enumerate(group["params"]) if p.grad is not None]
            if not active:
                continue
            self._check_budget_told(index, group)
            params = [group["params"][j] for j in active]
            for j, p in zip(active, params):
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(parameter {j} of group {index})"
                    )
            devices = {p.device for p in params}
            if len(devices) > 1:
                raise RuntimeError(
                    f"parameter group {index} spans devices {sorted(map(str, devices))}"
                )
            device = devices.pop()
            spec = self._spec(index, group, active)
            state, states = self._gather_state(params)
            grads = [p.grad for p in params]
            fused = self._use_fused(device)
            if self.net.log_lr.device != device:
                self.net.to(device)
            if functional.multi_tensor_default(params, fused):
                # The whole step on the device, its guard too: nothing is
                # read back to the host, so a CUDA graph can capture it.
                updates, new = functional.update(
                    self.net, spec, None, grads, state, params, guard=False, inplace=True,
                    fused=False, total_steps=group["total_steps"], loss=loss,
                )  # fmt: skip
                self._write_counts(states, new)
                torch._foreach_add_(params, updates, alpha=group["lr"])
                self._watch_skips(index, new["skipped"], device)
                continue
            updates, new = functional.update(
                self.net,
                spec,
                None,
                grads,
                state,
                params,
                guard=False,
                inplace=True,
                fused=fused,
                total_steps=group["total_steps"],
                loss=loss,
            )
            # A gradient that is not finite left the state as it was; a
            # non-finite update from the net (the state then holds this
            # step's gradient) is never written to the parameters either.
            skipped = bool(new["skipped"] > state["skipped"])
            self._count_skip(index, skipped)
            # One step count for the group, never written in place: shared.
            for st in states:
                st["skipped"] = new["skipped"]
                st["step"] = new["step"]
                st["loss_stats"] = new["loss_stats"]
            if not skipped:  # one operator for all of them
                torch._foreach_add_(params, updates, alpha=group["lr"])
        return returned

    @torch.no_grad()
    def base_updates(self, loss: Tensor | float | None = None) -> list[Tensor | None]:
        """Adam's part of the update that :meth:`step` would now take (given
        ``loss``, as :meth:`step` is), per parameter of every group in order
        (``None`` for a parameter without a gradient), changing nothing. The
        update minus this is the learned term: a diagnostic of how much of a
        step the net adds."""
        if loss is not None:
            loss = check_loss(loss)
        out: list[Tensor | None] = []
        for index, group in enumerate(self.param_groups):
            active = [j for j, p in enumerate(group["params"]) if p.grad is not None]
            parts: dict[int, Tensor] = {}
            if active:
                params = [group["params"][j] for j in active]
                fresh = [p for p in params if not self.state[p]]
                state, _ = self._gather_state(params)
                theta = dict(self.net.named_parameters())
                # A vanishing learned term leaves the base part alone.
                theta["log_step_mult"] = torch.full_like(theta["log_step_mult"], -1e9)
                updates, _ = functional.update(
                    self.net,
                    self._spec(index, group, active),
                    theta,
                    [p.grad for p in params],
                    state,
                    params,
                    total_steps=group["total_steps"],
                    loss=loss.detach() if isinstance(loss, Tensor) else loss,
                )
                for p in fresh:  # _gather_state made it; step() makes it again
                    del self.state[p]
                parts = {j: u * group["lr"] for j, u in zip(active, updates)}
            out += [parts.get(j) for j in range(len(group["params"]))]
        return out

    def _check_budget_told(self, index: int, group: dict) -> None:
        """Warn once when a net that reads the run's length steps a group
        not told it: the shipped nets then do not decay their update."""
        if not self._warned_budget and group["total_steps"] is None and self.net.reads_budget:
            self._warned_budget = True
            warnings.warn(
                f"{type(self).__name__}: parameter group {index} has no total_steps, but this "
                "net reads the run's length to schedule its update (the shipped nets decay "
                "it only when told the length); pass total_steps=N, the number of optimizer "
                "steps the run will take",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )

    def _count_skip(self, index: int, skipped: bool) -> None:
        """Count group ``index``'s skipped steps in a row; warn once when
        they reach ``SKIPS_BEFORE_WARNING``."""
        if index >= len(self._skips_in_a_row):  # a group added after construction
            self._skips_in_a_row += [0] * (index + 1 - len(self._skips_in_a_row))
        self._skips_in_a_row[index] = self._skips_in_a_row[index] + 1 if skipped else 0
        if self._skips_in_a_row[index] >= self.SKIPS_BEFORE_WARNING and not self._warned_skips:
            self._warned_skips = True
            warnings.warn(
                f"{type(self).__name__}: {self._skips_in_a_row[index]} steps in a row of "
                f"parameter group {index} were skipped because the gradients (or the "
                "updates) were not finite, so its parameters have stopped changing; check the "
                "loss for NaN or inf",
                RuntimeWarning,
                stacklevel=caller_stacklevel(),
            )

    @staticmethod
    def _write_counts(states: list[dict], new: functional.State) -> None:
        """Give a group's states the step's counts. Once every state holds
        the same count tensors they are written in place, as a step captured
        in a CUDA graph needs (a replay writes where the capture wrote)."""
        first = states[0]
        keys = ("step", "skipped", "loss_stats")
        shared = all(st[k] is first[k] for st in states for k in keys)
        if shared and first["step"].dtype == torch.float32:
            for k in keys:
                first[k].copy_(new[k])
            return
        for st in states:  # one set of tensors for the group from now on
            st["step"], st["skipped"], st["loss_stats"] = (new[k] for k in keys)

    def _watch_skips(self, index: int, skipped: Tensor, device: torch.device) -> None:
        """:meth:`_count_skip` for a step whose guard ran on the device: its
        count is read back every ``SKIPS_BEFORE_WARNING`` steps (never while
        a CUDA graph is being captured), and a rise by that many means every
        one of those steps was skipped."""
        every = self.SKIPS_BEFORE_WARNING
        steps, seen = self._device_skips.get(index, (0, 0.0))
        steps += 1
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if steps % every == 0 and not capturing:
            now = float(skipped)  # the one host read, every `every` steps
            for _ in range(every if now - seen >= every else 1):
                self._count_skip(index, now - seen >= every)
            seen = now
        self._device_skips[index] = (steps, seen)

    def _use_fused(self, device: torch.device) -> bool:
        if device.type != "cpu" or self._fused is False:
            return False
        if self._fused is None:  # decided once, at the first CPU step
            self._fused = fused_kernel.available()
        return self._fused

    def _gather_state(self, params: list[Tensor]) -> tuple[functional.State, list[dict]]:
        """The group's state for :func:`lopt.functional.update` (made where a
        parameter has none) and each parameter's own state dict."""
        states = [self.state[p] for p in params]  # one lookup each: a tensor's hash is Python
        for p, st in zip(params, states):
            if not st:
                fresh = functional.init([p])
                st.update(
                    momenta=fresh["momenta"][0],
                    second_moment=fresh["second_moment"][0],
                    step=fresh["step"],
                    skipped=fresh["skipped"],
                    loss_stats=fresh["loss_stats"],
                )
        state = {
            "momenta": [_float32(st["momenta"]) for st in states],
            "second_moment": [_float32(st["second_moment"]) for st in states],
            "step": _float32(states[0]["step"]),
            "skipped": _float32(states[0]["skipped"]),
            "loss_stats": _float32(states[0]["loss_stats"]),
        }
        return state, states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the float32 state of low-precision parameters stays float32."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for index, st in saved.items():
            p = params[index]
            for k in _STATE_KEYS + ("step", "skipped", "loss_stats"):
                if k in st:
                    self.state[p][k] = st[k].to(device=p.device, dtype=torch.float32)
            if st and "loss_stats" not in st:  # saved before the loss state existed
                self.state[p]["loss_stats"] = loss_state(p.device)


def _float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()  # no call for what is float32 already


def check_model_holds(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """``ValueError`` naming the parameters of ``groups`` that ``model`` does
    not hold (``model=`` is read for their weight space)."""
    held = {id(p) for p in model.parameters()}
    missing = [
        f"group {g}, parameter {j} {tuple(p.shape)}"
        for g, group in enumerate(groups)
        for j, p in enumerate(group["params"])
        if id(p) not in held
    ]
    if missing:
        total = sum(len(group["params"]) for group in groups)
        shown = "; ".join(missing[:3]) + ("; ..." if len(missing) > 3 else "")
        raise ValueError(
            f"model= ({type(model).__name__}) does not hold {len(missing)} of the {total} "
            f"parameters given ({shown}): pass the model they belong to"
        )


def check_lr(lr: Any, where: str = "") -> float:
    """``lr`` as a float if it is a finite number >= 0, else ``ValueError``."""
    number = isinstance(lr, (int, float)) and not isinstance(lr, bool)
    if not (number and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{where}lr must be a finite number >= 0, got {lr!r}")
    return float(lr)


def check_loss(loss: Any) -> Tensor | float:
    """``loss`` if it is a real number or a one-element real tensor, else
    ``ValueError`` (or ``TypeError``) saying what it is."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"loss must be one number (a one-element tensor), got shape {tuple(loss.shape)}"
            )
        if loss.is_complex() or loss.dtype == torch.bool:
            raise TypeError(f"loss must be a real number, got a {loss.dtype} tensor")
        return loss
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(f"loss must be a number or a one-element tensor, got {type(loss).__name__}")
    return float(loss)


def check_total_steps(total_steps: Any, where: str = "") -> int | None:
    """``total_steps`` as an int if it is None or a whole number >= 1, else
    ``ValueError`` saying so."""
    if total_steps is None:
        return None
    number = isinstance(total_steps, (int, float)) and not isinstance(total_steps, bool)
    if not (number and math.isfinite(total_steps) and total_steps == int(total_steps) >= 1):
        raise ValueError(
            f"{where}total_steps must be a whole number >= 1 or None, got {total_steps!r}"
        )
    return int(total_steps)


class NFNOptimizer(LearnedOptimizer):
    """The NFN learned optimizer: an :class:`~lopt.nets.NFNNet` that mixes
    information across the neurons of each layer, equivariantly.

    Example (the recommended shipped net; ``weights=None`` builds a fresh one)::

        opt = lopt.NFNOptimizer(model.parameters(), model=model)
        for x, y in data:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    """

    net_class = NFNNet


class MLPOptimizer(LearnedOptimizer):
    """The per-parameter MLP learned optimizer (:class:`~lopt.nets.PerParamMLP`)."""

    net_class = PerParamMLP
