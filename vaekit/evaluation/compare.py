"""Comparisons over seeds: groups of runs that differ only in their seed, their means and
standard errors, and paired differences against a baseline group (runs paired by seed).

Works on any run records with `.name`, `.overrides` ({key: value}), `.status`, `.metrics` and
`.seed` (the value of every seed key, a tuple); `vaekit report` passes its RunRecords.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vaekit.errors import VaekitError

SEED_KEYS = ("trainer.seed",)
FINISHED = ("finished", "early_stopped")
CONFIDENCE = 0.95


class Record(Protocol):
    """What a comparison reads of one run."""

    name: str
    overrides: dict[str, str]
    status: str
    metrics: dict[str, Any]
    seed: tuple[str, ...]


@dataclass(frozen=True)
class Summary:
    """mean and standard error (sample sd / sqrt(n), nan for n < 2) of n finite values."""

    mean: float
    sem: float
    n: int

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        """The two-sided t-interval mean +- t_{(1+c)/2, n-1} sem (nan ends for n < 2)."""
        if self.n < 2:
            return (math.nan, math.nan)
        half = t_quantile((1 + confidence) / 2, self.n - 1) * self.sem
        return (self.mean - half, self.mean + half)


def summarize(values: Sequence[float]) -> Summary:
    """Summary of the values (nan mean for none)."""
    n = len(values)
    if n == 0:
        return Summary(math.nan, math.nan, 0)
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(mean, math.nan, 1)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Summary(mean, math.sqrt(variance / n), n)


@dataclass
class Group:
    """Runs whose overrides agree on every key but the seed keys (or on the `by` key)."""

    full_key: tuple[tuple[str, str], ...]  # (override key, value) that define the group
    key: tuple[tuple[str, str], ...] = ()  # the part of it that tells this group from the others
    runs: list[Record] = field(default_factory=list)  # finished, with the metric
    left_out: list[str] = field(default_factory=list)  # 'name (status or reason)' of the others

    @property
    def label(self) -> str:
        """'prior=mog latent=8', or 'all runs' for a group without keys."""
        return " ".join(f"{k}={v}" for k, v in self.key) or "all runs"

    def summary(self, metric: str) -> Summary:
        """Mean, standard error and n of a metric over the group's runs that have it finite."""
        return summarize(
            [v for v in (_finite(run.metrics.get(metric)) for run in self.runs) if v is not None]
        )


def normalized(key: str) -> str:
    """'+trainer.seed' -> 'trainer.seed': how an override was added does not matter here."""
    return key.lstrip("+~")


def group_runs(
    records: Sequence[Record],
    seed_keys: Sequence[str] = SEED_KEYS,
    by: str | None = None,
    metric: str = "test_iw_nll",
) -> list[Group]:
    """Groups of runs, sorted by mean `metric` (groups without it last). A run joins its
    group's `runs` when it finished with a finite `metric`, else its `left_out` list."""
    seeds = {normalized(k) for k in seed_keys}
    if by is not None and not any(normalized(by) in map(normalized, r.overrides) for r in records):
        keys = sorted({normalized(k) for r in records for k in r.overrides})
        raise VaekitError(
            f"--by {by}: no run sets it (the runs' overrides are: {', '.join(keys) or 'none'})."
        )
    groups: dict[tuple[tuple[str, str], ...], Group] = {}
    for record in records:
        items = {normalized(k): v for k, v in record.overrides.items()}
        if by is not None:
            key = ((normalized(by), items.get(normalized(by), "")),)
        else:
            key = tuple(sorted((k, v) for k, v in items.items() if k not in seeds))
        group = groups.setdefault(key, Group(key, key))
        if record.status not in FINISHED:
            group.left_out.append(f"{record.name} ({record.status})")
        elif _finite(record.metrics.get(metric)) is None:
            group.left_out.append(f"{record.name} (no finite {metric})")
        else:
            group.runs.append(record)
    shared = _shared_items([g.key for g in groups.values()])
    for group in groups.values():  # label by what tells the groups apart
        group.key = tuple(item for item in group.full_key if len(groups) == 1 or item not in shared)
    return sorted(groups.values(), key=lambda g: _sort_key(g.summary(metric).mean))


@dataclass(frozen=True)
class Paired:
    """Per-seed differences (group - baseline) of one metric: their summary, the 95% interval,
    and the runs that found no partner with the same seed."""

    summary: Summary
    interval: tuple[float, float]
    unpaired: tuple[str, ...]

    @property
    def within_noise(self) -> bool:
        """True when the interval contains 0 (or cannot be computed): no detectable difference."""
        low, high = self.interval
        return not (low > 0 or high < 0)


def paired_difference(group: Group, baseline: Group, metric: str) -> Paired:
    """Differences group - baseline of `metric` between runs with the same seed."""
    base = {run.seed: float(run.metrics[metric]) for run in baseline.runs}
    mine = {run.seed: float(run.metrics[metric]) for run in group.runs}
    differences = [mine[seed] - base[seed] for seed in sorted(mine) if seed in base]
    unpaired = [run.name for run in group.runs if run.seed not in base]
    unpaired += [run.name for run in baseline.runs if run.seed not in mine]
    summary = summarize(differences)
    return Paired(summary, summary.interval(), tuple(unpaired))


def find_baseline(groups: Sequence[Group], baseline: str) -> Group:
    """The one group whose key holds `key=value` (e.g. prior=standard); one sentence otherwise."""
    key, sep, value = baseline.partition("=")
    if not sep:
        raise VaekitError(f"--baseline takes key=value (e.g. prior=standard), not {baseline}.")
    key = normalized(key)
    matches = [g for g in groups if any(normalized(k) == key and v == value for k, v in g.full_key)]
    if len(matches) != 1:
        values = sorted({v for g in groups for k, v in g.full_key if normalized(k) == key})
        found = "no group has" if not matches else f"{len(matches)} groups have"
        raise VaekitError(
            f"--baseline {baseline}: {found} {key}={value} (values present: {', '.join(values) or 'none'})."
        )
    return matches[0]


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom, by bisection on its CDF."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}.")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return 0.5 * (low + high)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2), t >= 0."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)
    return 1 - tail if t >= 0 else tail


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by Lentz's continued fraction (Numerical Recipes, section 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below this point
        return 1 - regularized_beta(1 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _shared_items(keys: list[tuple[tuple[str, str], ...]]) -> set[tuple[str, str]]:
    """(key, value) pairs that every group has: they tell no group apart."""
    sets = [set(key) for key in keys]
    return set.intersection(*sets) if sets else set()


def _sort_key(mean: float) -> tuple[int, float]:
    return (0, mean) if math.isfinite(mean) else (1, 0.0)
