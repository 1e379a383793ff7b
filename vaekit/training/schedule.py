"""Learning-rate schedules (`scheduler=none|plateau|cosine|step`), stepped once per epoch.

The lr of an epoch is computed from counters, never accumulated step by step:

    lr(e) = base_lr * warmup(e) * shape(t),   e = epochs completed before it (0 for the first)
    warmup(e) = (e + 1) / (W + 1) for e < W, else 1         (W = warmup_epochs; 0 = none)
    t = max(0, e - W)                                         (the shape starts after the warm-up)

    none     shape(t) = 1
    cosine   shape(t) = m + (1 - m) (1 + cos(pi min(t, T) / T)) / 2,   T = epochs - W
    step     shape(t) = max(m, gamma ** (t // step_epochs))
    plateau  shape    = max(m, factor ** reductions): one more reduction once the validation
             NELBO has not beaten its best by more than `threshold` nats for more than
             `patience` epochs in a row (warm-up epochs are not counted)

with m = min_lr_factor. The state is plain numbers (the base lrs and plateau's counters),
saved in every checkpoint, so a resumed run sets bit for bit the lr the uninterrupted one
sets.

Roll-back composes with the schedule through the base: each roll-back multiplies the base
lrs by trainer.rollback_lr_factor (`scale_base`) and the schedule goes on from the lowered
base, so after k roll-backs epoch e runs at rollback_lr_factor**k * lr(e). The rest of the
state is not rolled back, like the epoch count: the warm-up and the cosine or step curve keep
their place in time, and plateau keeps its counters.

The options are plain data with a `name` (no `_target_`), so a saved config names no code.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch

from vaekit.errors import VaekitError


def _whole(key: str, value: Any, low: int) -> int:
    """`value` as a whole number >= low, else one sentence naming scheduler.<key>."""
    if type(value) is not int or value < low:
        raise VaekitError(f"scheduler.{key} must be a whole number, {low} or more, not {value!r}.")
    return value


def _fraction(key: str, value: Any, low_open: bool, high_open: bool) -> float:
    """`value` as a number in [0, 1] (ends open where asked), else one sentence."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < 0 or value > 1 or (low_open and value == 0) or (high_open and value == 1):
        bounds = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise VaekitError(f"scheduler.{key} must be a number in {bounds}, not {value!r}.")
    return float(value)


class Schedule:
    """`scheduler=none`: the base lr, after an optional linear warm-up of `warmup_epochs`."""

    name = "none"

    def __init__(self, warmup_epochs: int = 0) -> None:
        self.warmup_epochs = _whole("warmup_epochs", warmup_epochs, 0)
        self.base_lrs: list[float] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Take the optimizer's current lrs (one per param group) as the base lrs."""
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]

    def shape(self, t: int) -> float:
        """The schedule's factor t epochs after the warm-up."""
        return 1.0

    def factor(self, epoch: int) -> float:
        """warmup(e) * shape(t) for the epoch after `epoch` completed ones."""
        w = self.warmup_epochs
        warm = (epoch + 1) / (w + 1) if epoch < w else 1.0
        return warm * self.shape(max(0, epoch - w))

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int) -> float:
        """Set each param group's lr for the epoch after `epoch` completed ones; the first's lr."""
        factor = self.factor(epoch)
        for group, base in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        return optimizer.param_groups[0]["lr"]

    def observe(self, epochs_done: int, val_nelbo: float) -> None:
        """The validation NELBO after `epochs_done` epochs (only plateau reacts to it)."""

    def scale_base(self, factor: float) -> None:
        """Multiply the base lrs by `factor` (a roll-back's lr decrease)."""
        self.base_lrs = [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers: what exact resumption needs."""
        return {"name": self.name, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.base_lrs = [float(base) for base in state["base_lrs"]]


class Cosine(Schedule):
    """`scheduler=cosine`: half a cosine from the base lr down to min_lr_factor of it, over the
    `epochs - warmup_epochs` epochs after the warm-up; then it stays at the bottom."""

    name = "cosine"

    def __init__(self, epochs: int, warmup_epochs: int = 0, min_lr_factor: float = 0.0) -> None:
        super().__init__(warmup_epochs)
        self.epochs = _whole("epochs", epochs, 1)
        if self.epochs <= self.warmup_epochs:
            raise VaekitError(
                f"scheduler.epochs={epochs} (the cosine's length, trainer.max_epochs by default) must "
                f"be more than scheduler.warmup_epochs={warmup_epochs}."
            )
        self.min_lr_factor = _fraction("min_lr_factor", min_lr_factor, False, False)

    def shape(self, t: int) -> float:
        length = self.epochs - self.warmup_epochs
        m = self.min_lr_factor
        return m + (1 - m) * (1 + math.cos(math.pi * min(t, length) / length)) / 2


class Step(Schedule):
    """`scheduler=step`: the lr times `gamma` every `step_epochs` epochs after the warm-up."""

    name = "step"

    def __init__(
        self, step_epochs: int = 30, gamma: float = 0.5, warmup_epochs: int = 0, min_lr_factor: float = 0.0
    ) -> None:
        super().__init__(warmup_epochs)
        self.step_epochs = _whole("step_epochs", step_epochs, 1)
        self.gamma = _fraction("gamma", gamma, True, False)
        self.min_lr_factor = _fraction("min_lr_factor", min_lr_factor, False, False)

    def shape(self, t: int) -> float:
        return max(self.min_lr_factor, self.gamma ** (t // self.step_epochs))


class Plateau(Schedule):
    """`scheduler=plateau`: the lr times `factor` when the validation NELBO stalls (see above)."""

    name = "plateau"

    def __init__(
        self,
        factor: float = 0.5,
        patience: int = 5,
        threshold: float = 0.0,
        warmup_epochs: int = 0,
        min_lr_factor: float = 0.0,
    ) -> None:
        super().__init__(warmup_epochs)
        self.reduce_by = _fraction("factor", factor, True, True)
        self.patience = _whole("patience", patience, 0)
        number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
        if not number or not math.isfinite(threshold) or threshold < 0:
            raise VaekitError(f"scheduler.threshold must be a number of nats, 0 or more, not {threshold!r}.")
        self.threshold = float(threshold)
        self.min_lr_factor = _fraction("min_lr_factor", min_lr_factor, False, False)
        self.best = math.inf
        self.bad_epochs = 0
        self.reductions = 0

    def shape(self, t: int) -> float:
        return max(self.min_lr_factor, self.reduce_by**self.reductions)

    def observe(self, epochs_done: int, val_nelbo: float) -> None:
        if epochs_done <= self.warmup_epochs:
            return
        if math.isfinite(val_nelbo) and val_nelbo < self.best - self.threshold:
            self.best, self.bad_epochs = val_nelbo, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.reductions += 1
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        counters = {"best": self.best, "bad_epochs": self.bad_epochs, "reductions": self.reductions}
        return {**super().state_dict(), **counters}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.best = float(state["best"])
        self.bad_epochs, self.reductions = int(state["bad_epochs"]), int(state["reductions"])


SCHEDULES: dict[str, type[Schedule]] = {s.name: s for s in (Schedule, Plateau, Cosine, Step)}


def build_schedule(settings: Mapping[str, Any] | None) -> Schedule:
    """The schedule a `scheduler` config node names; None (a run saved before schedules) is
    `none`. A bad name, key or value is one VaekitError sentence."""
    if settings is None:
        return Schedule()
    values = {str(key): value for key, value in settings.items()}
    name = values.pop("name", None)
    if name not in SCHEDULES:
        choices = ", ".join(SCHEDULES)
        raise VaekitError(f"scheduler.name must be one of {choices}, not {name!r}.")
    kind = SCHEDULES[name]
    accepted = [p for p in inspect.signature(kind.__init__).parameters if p != "self"]
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise VaekitError(
            f"scheduler.{unknown[0]} is not a setting of scheduler={name} (it takes {', '.join(accepted)})."
        )
    try:
        return kind(**values)
    except TypeError as error:  # a required setting left out
        raise VaekitError(f"scheduler={name} is missing a setting ({error}).") from error


def check_schedule_state(state: Any, name: str) -> str | None:
    """What is wrong with a checkpoint's schedule state for a `name` schedule, or None."""
    if not isinstance(state, Mapping) or state.get("name") != name:
        return f"its schedule state is not one of scheduler={name}"
    bases = state.get("base_lrs")
    if not isinstance(bases, list) or not all(isinstance(b, (int, float)) for b in bases):
        return "its schedule state has no base learning rates"
    needed = ("best", "bad_epochs", "reductions") if name == "plateau" else ()
    if any(not isinstance(state.get(key), (int, float)) for key in needed):
        return "its schedule state has no plateau counters"
    return None
