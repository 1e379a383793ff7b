"""Seed groups, paired differences and paper tables of `vaekit report`, on run folders with
known metrics written here (scipy's t quantile as the oracle), and on one real sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import run_vaekit
from scipy import stats

from vaekit import cli
from vaekit.commands.report import report
from vaekit.errors import VaekitError
from vaekit.evaluation.compare import summarize, t_quantile

# test IW-NLL per (prior, seed): mog is better by about 0.3 nats, with seed noise of about 0.5
IW = {
    "standard": {0: 95.0, 1: 95.6, 2: 94.7},
    "mog": {0: 94.8, 1: 95.2, 2: 94.5, 3: 94.0},  # seed 3 has no standard partner
}


def write_run(
    folder: Path, overrides: dict[str, str], seed: int, metrics: dict, dataset: str = "digits"
) -> None:
    """A run folder as vaekit train leaves it, as far as `vaekit report` reads it."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()))
    (folder / ".hydra" / "config.yaml").write_text(f"trainer:\n  seed: {seed}\ndataset:\n  name: {dataset}\n")
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """prior x seed runs with known metrics, plus one failed mog run."""
    job = 0
    for prior, by_seed in IW.items():
        for seed, iw in by_seed.items():
            metrics = {"status": "finished", "test_iw_nll": iw, "test_nelbo": iw + 2.5, "test_bpd": iw / 100,
                       "val_nelbo": iw + 3, "iw_samples": 1000, "epochs": 10, "best_epoch": 8}  # fmt: skip
            write_run(tmp_path / str(job), {"prior": prior, "trainer.seed": str(seed)}, seed, metrics)
            job += 1
    write_run(
        tmp_path / str(job), {"prior": "mog", "trainer.seed": "4"}, 4, {"status": "failed", "reason": "x"}
    )
    return tmp_path


def test_t_quantile_matches_scipy():
    for df in (1, 2, 3, 4, 9, 29, 200):
        for p in (0.6, 0.975, 0.995, 0.025):
            assert math.isclose(t_quantile(p, df), stats.t.ppf(p, df), rel_tol=1e-9, abs_tol=1e-12)


def test_groups_show_mean_standard_error_and_n_over_seeds(sweep: Path):
    data = json.loads(report(sweep, fmt="json")[0])
    groups = {g["label"]: g for g in data["groups"]}
    assert [g["label"] for g in data["groups"]] == ["prior=mog", "prior=standard"]  # by mean IW-NLL
    for prior, by_seed in IW.items():
        values = np.array(list(by_seed.values()))
        got = groups[f"prior={prior}"]["metrics"]["test_iw_nll"]
        assert got["n"] == len(values)
        assert math.isclose(got["mean"], values.mean(), rel_tol=1e-12)
        assert math.isclose(got["sem"], values.std(ddof=1) / math.sqrt(len(values)), rel_tol=1e-12)
    assert groups["prior=mog"]["left_out"] == ["7 (failed)"]  # named, not averaged


def test_paired_differences_against_the_baseline(sweep: Path):
    data = json.loads(report(sweep, baseline="prior=standard", fmt="json")[0])
    assert data["baseline"] == "prior=standard"
    paired = next(g for g in data["groups"] if g["label"] == "prior=mog")["paired"]["test_iw_nll"]
    differences = np.array([IW["mog"][s] - IW["standard"][s] for s in (0, 1, 2)])  # seed 3 unpaired
    sem = differences.std(ddof=1) / math.sqrt(3)
    half = stats.t.ppf(0.975, 2) * sem
    assert paired["n"] == 3 and paired["unpaired"] == ["6"]  # job 6: mog, seed 3
    assert math.isclose(paired["mean"], differences.mean(), rel_tol=1e-12)
    assert math.isclose(paired["sem"], sem, rel_tol=1e-12)
    assert np.allclose(paired["interval"], [differences.mean() - half, differences.mean() + half], rtol=1e-9)
    assert paired["within_noise"] == (differences.mean() - half <= 0 <= differences.mean() + half)
    text = report(sweep, baseline="prior=standard")[0]
    assert (
        "paired by seed against prior=standard" in text and f"{differences.mean():+.2f} ± {sem:.2f}" in text
    )


def test_latex_is_a_booktabs_table_with_one_row_per_group(sweep: Path):
    latex = report(sweep, fmt="latex")[0]
    assert latex.count("{") == latex.count("}")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\end{tabular}"):
        assert latex.count(rule) == 1, rule
    body = latex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert [row.split(" & ")[0] for row in body] == ["prior=mog", "prior=standard"]
    assert r"$\pm$" in latex and r"\textbf" not in latex  # the intervals overlap: no bold


def test_the_best_group_is_bold_only_when_its_interval_is_clear(tmp_path: Path):
    for job, (prior, iw) in enumerate(
        [("a", 90.0), ("a", 90.1), ("a", 90.2), ("b", 99.0), ("b", 99.1), ("b", 99.2)]
    ):
        metrics = {"status": "finished", "test_iw_nll": iw, "test_nelbo": iw, "test_bpd": iw / 100}
        write_run(tmp_path / str(job), {"prior": prior, "trainer.seed": str(job % 3)}, job % 3, metrics)
    latex = report(tmp_path, fmt="latex")[0]
    assert r"\textbf{90.10 $\pm$ 0.06}" in latex and r"\textbf{99" not in latex


def test_csv_and_by_and_seed_keys(sweep: Path):
    rows = report(sweep, fmt="csv")[0].strip().splitlines()
    assert rows[0].startswith("group,runs,test_iw_nll_mean,test_iw_nll_sem,test_iw_nll_n")
    assert len(rows) == 3
    by_seed = json.loads(report(sweep, by="trainer.seed", fmt="json")[0])
    assert sorted(g["label"] for g in by_seed["groups"]) == [f"trainer.seed={s}" for s in range(5)]


def test_bad_report_arguments_give_one_sentence(sweep: Path, tmp_path: Path, capsys):
    with pytest.raises(
        VaekitError, match=r"--baseline prior=flow: no group has prior=flow \(values present: mog, standard\)"
    ):
        report(sweep, baseline="prior=flow")
    with pytest.raises(VaekitError, match="--by model.latent_dim: no run sets it"):
        report(sweep, by="model.latent_dim")
    with pytest.raises(SystemExit) as exit_info:  # an unknown format: argparse's usage error
        cli.main(["report", str(sweep), "--format", "docx"])
    assert exit_info.value.code == 2
    write_run(sweep / "mnist_run", {"prior": "mog"}, 0, {"status": "finished", "test_iw_nll": 80.0}, "mnist")
    before = (sweep / "report.csv").read_bytes() if (sweep / "report.csv").exists() else None
    with pytest.raises(VaekitError, match=r"used different datasets \(digits, mnist\)"):
        report(sweep)
    assert ((sweep / "report.csv").read_bytes() if (sweep / "report.csv").exists() else None) == before


def test_a_real_sweep_paired_difference_is_the_mean_of_per_seed_differences(tmp_path: Path):
    sweep = tmp_path / "sweep"
    done = run_vaekit(
        "train", "-m", "trainer.seed=0,1,2", "prior=standard,mog", "net.hidden_dim=32", "model.latent_dim=4",
        "trainer.max_epochs=2", "eval.iw_samples=4", "eval.nelbo_samples=2", "trainer.progress=false",
        "trainer.log_images=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    iw = {}
    for job in range(6):
        overrides = (sweep / str(job) / ".hydra" / "overrides.yaml").read_text()
        prior = "mog" if "prior=mog" in overrides else "standard"
        seed = next(line.split("=")[1] for line in overrides.splitlines() if "trainer.seed" in line)
        iw[prior, seed] = json.loads((sweep / str(job) / "metrics.json").read_text())["test_iw_nll"]
    shown = run_vaekit("report", str(sweep), "--baseline", "prior=standard", "--format", "json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    paired = next(g for g in json.loads(shown.stdout)["groups"] if g["label"] == "prior=mog")["paired"]
    expected = np.mean([iw["mog", s] - iw["standard", s] for s in "012"])
    assert (
        math.isclose(paired["test_iw_nll"]["mean"], expected, rel_tol=1e-9)
        and paired["test_iw_nll"]["n"] == 3
    )
    assert "wrote" in shown.stderr and (sweep / "report_curves.png").stat().st_size > 0


def test_summary_of_one_value_has_no_standard_error():
    one = summarize([3.0])
    assert one.mean == 3.0 and math.isnan(one.sem) and all(math.isnan(v) for v in one.interval())
