"""The tables of `vaekit report`: groups over seeds (mean +- standard error, n) and paired
differences against a baseline, as markdown, LaTeX (booktabs), CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vaekit.evaluation.compare import (
    SEED_KEYS,
    Group,
    Paired,
    Record,
    find_baseline,
    group_runs,
    paired_difference,
)

GROUP_COLUMNS = (  # (key in metrics.json, heading, decimals)
    ("test_iw_nll", "test IW-NLL", 2),
    ("test_nelbo", "test NELBO", 2),
    ("test_bpd", "bits/dim", 4),
    ("val_best", "best val", 2),  # the validation number early stopping watched
)
PAIRED_METRICS = (("test_iw_nll", "test IW-NLL"), ("test_nelbo", "test NELBO"))
FORMATS = ("markdown", "csv", "json", "latex")


@dataclass
class Comparison:
    """Groups sorted by mean test IW-NLL, the baseline (if asked) and each other group's paired
    differences to it, per metric."""

    groups: list[Group]
    baseline: Group | None = None
    paired: dict[str, dict[str, Paired]] = field(default_factory=dict)  # label -> metric -> Paired


def compare(
    records: Sequence[Record],
    seed_keys: Sequence[str] = (),
    by: str | None = None,
    baseline: str | None = None,
) -> Comparison:
    """Group the runs (by everything but the seed keys, or by one key) and pair them by seed."""
    groups = group_runs(records, (*SEED_KEYS, *seed_keys), by)
    comparison = Comparison(groups)
    if baseline is not None:
        comparison.baseline = find_baseline(groups, baseline)
        for group in groups:
            if group is not comparison.baseline:
                comparison.paired[group.label] = {
                    metric: paired_difference(group, comparison.baseline, metric)
                    for metric, _ in PAIRED_METRICS
                }
    return comparison


def group_note(group: Group) -> str:
    """What a reader must know about a group's numbers: runs left out, mixed k, an AIS estimate,
    a validation number other than the NELBO."""
    notes = []
    ks = sorted({run.metrics.get("iw_samples") for run in group.runs}, key=str)
    if len(ks) > 1:
        notes.append(f"IW-NLL with different k: {', '.join(map(str, ks))}")
    if any(run.metrics.get("test_estimator") == "ais" for run in group.runs):
        notes.append("IW-NLL by AIS (model=rbm)")
    watched = sorted({str(run.metrics.get("stopped_on", "nelbo")) for run in group.runs})
    if watched != ["nelbo"]:
        notes.append(f"best val: {', '.join(watched)} (what early stopping watched)")
    if group.left_out:
        notes.append(f"not averaged: {', '.join(group.left_out)}")
    return "; ".join(notes)


def mean_sem(group: Group, metric: str, decimals: int) -> str:
    """'94.12 ± 0.10' (just the mean for one run, '' for none)."""
    summary = group.summary(metric)
    if summary.n == 0:
        return ""
    if summary.n == 1:
        return f"{summary.mean:.{decimals}f}"
    return f"{summary.mean:.{decimals}f} ± {summary.sem:.{decimals}f}"


def difference(paired: Paired) -> tuple[str, str]:
    """('-0.31 ± 0.08', '[-0.65, 0.03]') of one paired difference ('' where undefined)."""
    s = paired.summary
    if s.n == 0:
        return "", ""
    text = f"{s.mean:+.2f}" if s.n == 1 else f"{s.mean:+.2f} ± {s.sem:.2f}"
    low, high = paired.interval
    return text, (f"[{low:+.2f}, {high:+.2f}]" if math.isfinite(low) else "")


def as_markdown(comparison: Comparison) -> str:
    """The group table, and the paired differences when there is a baseline."""
    headings = ["group", "n", *(heading for _, heading, _ in GROUP_COLUMNS), "note"]
    rows = [
        [g.label, str(len(g.runs)), *(mean_sem(g, key, d) for key, _, d in GROUP_COLUMNS), group_note(g)]
        for g in comparison.groups
    ]
    lines = ["groups over seeds (mean ± standard error, n runs):", "", *_markdown_table(headings, rows)]
    if comparison.baseline is not None:
        lines += [
            "",
            f"paired by seed against {comparison.baseline.label} (group - baseline, 95% t-interval):",
            "",
        ]
        headings = ["group", "pairs"]
        for _, heading in PAIRED_METRICS:
            headings += [f"Δ {heading}", "95% interval"]
        headings += ["IW-NLL within seed noise", "unpaired"]
        rows = []
        for label, by_metric in comparison.paired.items():
            first = by_metric[PAIRED_METRICS[0][0]]
            row = [label, str(first.summary.n)]
            for metric, _ in PAIRED_METRICS:
                row += list(difference(by_metric[metric]))
            row += ["yes" if first.within_noise else "no", ", ".join(first.unpaired)]
            rows.append(row)
        lines += _markdown_table(headings, rows)
    return "\n".join(lines)


def _markdown_table(headings: list[str], rows: list[list[str]]) -> list[str]:
    clean = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    return [
        "| " + " | ".join(headings) + " |",
        "|" + "|".join("---" for _ in headings) + "|",
        *("| " + " | ".join(row) + " |" for row in clean),
    ]


LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Text that LaTeX typesets as written."""
    return "".join(LATEX_SPECIALS.get(char, char) for char in text)


def best_group(groups: Sequence[Group], metric: str) -> Group | None:
    """The group with the lowest mean when its 95% interval does not overlap the runner-up's."""
    ranked = sorted((g for g in groups if g.summary(metric).n >= 2), key=lambda g: g.summary(metric).mean)
    if len(ranked) < 2:
        return None
    best_high = ranked[0].summary(metric).interval()[1]
    runner_low = ranked[1].summary(metric).interval()[0]
    return ranked[0] if best_high < runner_low else None


def as_latex(comparison: Comparison) -> str:
    """A booktabs tabular of the groups: mean $\\pm$ standard error, best in bold when clear."""
    columns = GROUP_COLUMNS[:3]
    best = {key: best_group(comparison.groups, key) for key, _, _ in columns}
    lines = [
        r"\begin{tabular}{l" + "r" * (len(columns) + 1) + "}",
        r"\toprule",
        " & ".join(["group", "$n$", *(latex_escape(heading) for _, heading, _ in columns)]) + r" \\",
        r"\midrule",
    ]
    for group in comparison.groups:
        cells = [latex_escape(group.label), str(len(group.runs))]
        for key, _, decimals in columns:
            cell = mean_sem(group, key, decimals).replace("±", r"$\pm$")
            cells.append(rf"\textbf{{{cell}}}" if best[key] is group and cell else cell)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def as_csv(comparison: Comparison) -> str:
    """One row per group: label, n, and mean, sem, n of each metric; full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["group", "runs"]
    for key, _, _ in GROUP_COLUMNS:
        header += [f"{key}_mean", f"{key}_sem", f"{key}_n"]
    writer.writerow([*header, "note"])
    for group in comparison.groups:
        row: list[Any] = [group.label, len(group.runs)]
        for key, _, _ in GROUP_COLUMNS:
            summary = group.summary(key)
            row += [summary.mean, summary.sem, summary.n]
        writer.writerow([*row, group_note(group)])
    return buffer.getvalue()


def as_json(comparison: Comparison) -> str:
    """Every number the tables show (non-finite ones as null), for scripts."""

    def summary_of(s: Any) -> dict[str, Any]:
        return {"mean": _number(s.mean), "sem": _number(s.sem), "n": s.n}

    groups = []
    for group in comparison.groups:
        entry: dict[str, Any] = {
            "label": group.label,
            "key": dict(group.full_key),
            "runs": [run.name for run in group.runs],
            "left_out": group.left_out,
            "note": group_note(group),
            "metrics": {key: summary_of(group.summary(key)) for key, _, _ in GROUP_COLUMNS},
        }
        paired = comparison.paired.get(group.label)
        if paired is not None:
            entry["paired"] = {
                metric: {
                    **summary_of(p.summary),
                    "interval": [_number(v) for v in p.interval],
                    "within_noise": p.within_noise,
                    "unpaired": list(p.unpaired),
                }
                for metric, p in paired.items()
            }
        groups.append(entry)
    baseline = comparison.baseline.label if comparison.baseline is not None else None
    return json.dumps({"baseline": baseline, "groups": groups}, indent=2)


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None
