"""Adam and Adamax for vaekit's one flat parameter tensor, with a step that may be skipped on
the device.

torch.optim's versions import torch._dynamo (about 1.3 s) the first time a parameter group
is added, a step taken or a state saved; these do the same arithmetic as torch's
single-tensor code paths without that import, and save states in torch's layout, so a
checkpoint written with either loads into the other.

`step(ok=flag)` is the masked form: with a 0-dim bool tensor `flag`, the update is computed
and kept only where flag is True (param, moments and step count all unchanged otherwise),
without the host reading the flag. Adam (Kingma & Ba, 2015), t = steps taken:

    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,
    p <- p - lr m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)

Adamax: u <- max(b2 u, |g| + eps),   p <- p - lr m / (1 - b1^t) / u.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vaekit.errors import VaekitError


class FlatOptimizer(torch.optim.Optimizer):
    """Base: one parameter group of one tensor (FlatParameters.param)."""

    moments: tuple[str, ...] = ()  # names of the per-element state buffers

    default_lr = 1e-3

    def __init__(
        self, params: Any, lr: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.0,
    ) -> None:  # fmt: skip
        lr = self.default_lr if lr is None else lr
        if not 0.0 < lr or not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0 or eps < 0:
            raise VaekitError(
                f"{type(self).__name__} needs lr > 0, 0 <= betas < 1 and eps >= 0; got lr={lr}, "
                f"betas={tuple(betas)}, eps={eps}."
            )
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        if len(self.param_groups) != 1 or len(self.param_groups[0]["params"]) != 1:
            raise VaekitError(f"{type(self).__name__} optimizes one flat parameter tensor.")

    def _patch_step_function(self) -> None:
        """Keep `step` unwrapped: torch's wrapper (a profiler record and the hooks) costs about
        0.14 ms a step, as much as the update itself on a small model; `step` calls the
        registered step hooks itself."""

    @property
    def param(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, without the torch._dynamo import: the group's settings default to ours."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        group = {**self.defaults, **param_group, "params": params}
        self.param_groups.append(group)

    def _buffers(self) -> dict[str, Tensor]:
        """The state of the flat parameter, created at the first step: step count and moments."""
        state = self.state[self.param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=self.param.device)
            for name in self.moments:
                state[name] = torch.zeros_like(self.param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None, ok: Tensor | None = None) -> None:
        """One update from param.grad; with `ok` (0-dim bool tensor) kept only where it holds."""
        if closure is not None:
            raise VaekitError(f"{type(self).__name__} takes no closure.")
        for hook in self._optimizer_step_pre_hooks.values():
            hook(self, (), {"ok": ok})
        self._update(ok)
        for hook in self._optimizer_step_post_hooks.values():
            hook(self, (), {"ok": ok})

    def _update(self, ok: Tensor | None) -> None:
        """The update of `step`, without its hooks."""
        group, param = self.param_groups[0], self.param
        grad = param.grad
        if group["weight_decay"] != 0:
            grad = grad.add(param, alpha=group["weight_decay"])
        state = self._buffers()
        if ok is None:
            state["step"] += 1
            self._update_in_place(param, grad, state, group, float(state["step"]))
            return
        step = state["step"] + 1
        # the bias corrections 1 - b^t in float64, as the plain step's Python floats are
        new_param, new_moments = self._new_values(param, grad, state, group, step.double())
        param.copy_(torch.where(ok, new_param, param))
        for name, value in new_moments.items():
            state[name].copy_(torch.where(ok, value, state[name]))
        state["step"].copy_(torch.where(ok, step, state["step"]))  # t stays float32, as torch's

    def _scratch(self) -> Tensor:
        """A buffer the size of the parameter, kept between steps: a fresh temporary of that
        size costs more than the arithmetic on the CPU (its pages are faulted in anew each
        step: 0.15-0.4 ms for 0.8 MB on this project's machines, against 7 us to reuse one)."""
        buffer = getattr(self, "_scratch_buffer", None)
        if buffer is None or buffer.shape != self.param.shape or buffer.device != self.param.device:
            buffer = self._scratch_buffer = torch.empty_like(self.param)
        return buffer

    def _update_in_place(self, param: Tensor, grad: Tensor, state: dict, group: dict, step: float) -> None:
        raise NotImplementedError  # pragma: no cover - interface

    def _new_values(
        self, param: Tensor, grad: Tensor, state: dict, group: dict, step: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError  # pragma: no cover - interface

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: {"state": {0: {...}}, "param_groups": [{..., "params": [0]}]}."""
        groups = [{key: value for key, value in self.param_groups[0].items() if key != "params"}]
        groups[0]["params"] = [0]
        state = self.state.get(self.param)
        return {"state": {0: dict(state)} if state else {}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of this optimizer or of torch's (same layout); sizes must match."""
        groups, states = state_dict["param_groups"], state_dict["state"]
        if len(groups) != 1 or len(groups[0]["params"]) != 1:
            raise ValueError("the saved optimizer state has more than one parameter")
        saved = states.get(groups[0]["params"][0])
        self.state.clear()
        if saved:
            for name in self.moments:
                if saved[name].shape != self.param.shape:
                    raise ValueError(f"the saved {name} has shape {tuple(saved[name].shape)}")
            like = {"device": self.param.device, "dtype": self.param.dtype, "copy": True}
            buffers = {name: saved[name].to(**like) for name in self.moments}
            step = torch.as_tensor(saved["step"], dtype=torch.float32).to(self.param.device, copy=True)
            self.state[self.param] = {"step": step, **buffers}
        settings = {key: value for key, value in groups[0].items() if key != "params"}
        self.param_groups[0].update(settings)


class FlatAdam(FlatOptimizer):
    """Adam on one flat tensor (torch.optim.Adam's single-tensor arithmetic, amsgrad off)."""

    moments = ("exp_avg", "exp_avg_sq")

    default_lr = 1e-3  # torch's

    def _update_in_place(self, param: Tensor, grad: Tensor, state: dict, group: dict, step: float) -> None:
        (beta1, beta2), lr = group["betas"], group["lr"]
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = torch.sqrt(state["exp_avg_sq"], out=self._scratch()).div_(bias_correction2_sqrt)
        param.addcdiv_(state["exp_avg"], denom.add_(group["eps"]), value=-lr / (1 - beta1**step))

    def _new_values(
        self, param: Tensor, grad: Tensor, state: dict, group: dict, step: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        (beta1, beta2), lr = group["betas"], group["lr"]
        exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step).sqrt()).add_(group["eps"])
        new_param = param - exp_avg / denom * (lr / (1 - beta1**step))
        return new_param, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class FlatAdamax(FlatOptimizer):
    """Adamax on one flat tensor (torch.optim.Adamax's single-tensor arithmetic)."""

    moments = ("exp_avg", "exp_inf")

    default_lr = 2e-3  # torch's

    def _update_in_place(self, param: Tensor, grad: Tensor, state: dict, group: dict, step: float) -> None:
        (beta1, beta2), lr = group["betas"], group["lr"]
        state["exp_avg"].lerp_(grad, 1 - beta1)
        exp_inf = state["exp_inf"]
        magnitude = torch.abs(grad, out=self._scratch()).add_(group["eps"])
        torch.maximum(exp_inf.mul_(beta2), magnitude, out=exp_inf)
        param.addcdiv_(state["exp_avg"], exp_inf, value=-lr / (1 - beta1**step))

    def _new_values(
        self, param: Tensor, grad: Tensor, state: dict, group: dict, step: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        (beta1, beta2), lr = group["betas"], group["lr"]
        exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
        exp_inf = torch.maximum(state["exp_inf"].mul(beta2), grad.abs().add_(group["eps"]))
        new_param = param - exp_avg / exp_inf * (lr / (1 - beta1**step))
        return new_param, {"exp_avg": exp_avg, "exp_inf": exp_inf}
