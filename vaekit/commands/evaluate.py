"""`vaekit evaluate`: NELBO, importance-weighted NLL, bits/dim and active units of a run's best.pt.

The result is printed as one table and written to `eval_<split>_k<k>.json` in the run
directory. Every random draw follows --seed, so the same command gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vaekit.errors import VaekitError
from vaekit.evaluation.metrics import check_budget, evaluate_model
from vaekit.rng import check_seed
from vaekit.runs import Run, load_run, write_json
from vaekit.schema import EvalConfig

DEFAULTS = EvalConfig()  # --k, --nelbo-samples, --batch-size and --seed default to eval.*

SPLITS = ("test", "val")


def evaluate_run(
    run_dir: Path,
    k: int | None = None,
    split: str = "test",
    batch_size: int = DEFAULTS.batch_size,
    seed: int = DEFAULTS.seed,
    device: str = "auto",
    progress: bool = True,
    nelbo_samples: int | None = DEFAULTS.nelbo_samples,
    trust: Sequence[str] = (),
    ais_betas: int | None = None,
) -> dict[str, Any]:
    """Evaluate `run_dir/best.pt` on a split; returns the metrics and writes them as JSON.

    IW-NLL with k samples (None: eval.iw_samples' default) and, from the same pass, NELBO, rec
    and KL (averaged over examples and the first nelbo_samples of the k draws each; all k when
    None), bits/dim of both, and active units per latent level (Burda et al., 2016). A model=rbm
    gets its NLL by AIS instead, in the same key, with k chains and ais_betas distributions
    (None: the run's eval.ais_chains and eval.ais_betas). The same seed gives the same numbers.
    """
    check_options(1 if k is None else k, split, batch_size, seed, nelbo_samples)  # --k 0: refused
    if ais_betas is not None and ais_betas < 2:
        raise VaekitError(f"--ais-betas must be at least 2 (0 and 1), not {ais_betas}.")
    run = load_run(Path(run_dir), device, trust)
    if getattr(run.model, "trained_by", None) in ("cd", "contrastive"):  # model=rbm, model=ebm: AIS
        saved = run.config.get("eval", {})
        chains = k or saved.get("ais_chains", DEFAULTS.ais_chains)
        betas = ais_betas or saved.get("ais_betas", DEFAULTS.ais_betas)
        return score_rbm(run, chains, betas, split, batch_size, seed, progress)
    return score_run(run, k or DEFAULTS.iw_samples, split, batch_size, seed, progress, nelbo_samples)


def check_options(k: int, split: str, batch_size: int, seed: int, nelbo_samples: int | None) -> None:
    """One sentence for the first evaluation option out of range, before any run is loaded."""
    if k < 1:
        raise VaekitError(f"--k must be at least 1, not {k}.")
    if batch_size < 1:
        raise VaekitError(f"--batch-size must be at least 1, not {batch_size}.")
    if nelbo_samples is not None and nelbo_samples < 1:
        raise VaekitError(f"--nelbo-samples must be at least 1, not {nelbo_samples}.")
    check_seed(seed, "--seed")
    if split not in SPLITS:
        raise VaekitError(f"--split must be one of {', '.join(SPLITS)}, not {split}.")


def score_run(
    run: Run,
    k: int,
    split: str,
    batch_size: int,
    seed: int,
    progress: bool,
    nelbo_samples: int | None,
) -> dict[str, Any]:
    """The metrics of a loaded run's checkpoint on one split, written beside it as JSON (options
    checked by check_options)."""
    x = run.data.test if split == "test" else run.data.val
    check_budget(x.shape[0], k, "--k")
    check_budget(x.shape[0], nelbo_samples, "--nelbo-samples")
    conditional = getattr(run.model, "conditional", False)  # model.conditional=true: log p(x|y)
    y = (run.data.test_labels if split == "test" else run.data.val_labels) if conditional else None
    metrics, _ = evaluate_model(run.model, x, k, nelbo_samples, batch_size, seed, progress, y=y)
    extra = {"nelbo_samples": nelbo_samples or k, "batch_size": batch_size}
    if conditional:
        extra["conditional"] = True  # its NELBO and IW-NLL are of log p(x|y)
    return write_result(run, split, x, k, seed, {**extra, **metrics})


def score_rbm(
    run: Run, chains: int, betas: int, split: str, batch_size: int, seed: int, progress: bool = True
) -> dict[str, Any]:
    """A model=rbm's or model=ebm's AIS metrics on one split (`evaluate_model` with chains and
    betas), written beside its checkpoint as eval_<split>_k<chains>.json."""
    x = run.data.test if split == "test" else run.data.val
    metrics, _ = evaluate_model(run.model, x, chains, None, batch_size, seed, progress, ais_chains=chains,
                                ais_betas=betas)  # fmt: skip
    return write_result(run, split, x, chains, seed, metrics)


def write_result(run: Run, split: str, x: Any, k: int, seed: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's record (run, checkpoint, split, k, seed, device, the split's checksum and
    `metrics`), written to `result_path` and returned with its "path"."""
    result: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "checkpoint": run.checkpoint.name,
        "epoch": run.epoch,
        "split": split,
        "num_examples": int(x.shape[0]),
        "k": k,
        "seed": seed,
        "device": str(run.device),
        "checksum": run.data.checksums[split],  # of the split as scored: the same on every device
        **metrics,
    }
    result["active_units_total"] = sum(result["active_units"].values())
    path = result_path(run.run_dir, split, k, run.checkpoint.name)
    write_json(path, result)
    result["path"] = str(path)
    return result


def result_path(run_dir: Path, split: str, k: int, checkpoint: str = "best.pt") -> Path:
    """Where `vaekit evaluate` writes its JSON: beside best.pt (`_last` added for last.pt's)."""
    which = "" if checkpoint == "best.pt" else f"_{Path(checkpoint).stem}"
    return Path(run_dir) / f"eval_{split}_k{k}{which}.json"


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: a heading line and a two-column markdown table."""
    levels = list(result["latent_dims"])
    if result.get("estimator") == "ais":
        return _table(result, _rbm_rows(result))
    rows = [
        ("NELBO (nats)", f"{result['nelbo']:.3f}"),
        ("  reconstruction", f"{result['rec']:.3f}"),
        ("  KL", f"{result['kl']:.3f}"),
    ]
    if len(levels) > 1:
        rows += [(f"    KL {level}", f"{result[f'kl_{level}']:.3f}") for level in levels]
    rows += [
        (f"IW-NLL, k={result['k']} (nats)", f"{result['iw_nll']:.3f}"),
        ("bits/dim (IW-NLL)", f"{result['bpd']:.4f}"),
        ("bits/dim (NELBO)", f"{result['nelbo_bpd']:.4f}"),
        ("active units", f"{result['active_units_total']} / {sum(result['latent_dims'].values())}"),
    ]
    if len(levels) > 1:
        rows += [
            (f"  active units {level}", f"{result['active_units'][level]} / {result['latent_dims'][level]}")
            for level in levels
        ]
    return _table(result, rows)


def _rbm_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of a model=rbm's or model=ebm's table: the AIS NLL and log Z with their errors."""
    hidden = sum(result["latent_dims"].values())  # 0 for model=ebm, which has no latents
    rows = [
        (f"NLL, AIS with {result['ais_chains']} chains x {result['ais_betas']} betas (nats)",
         f"{result['iw_nll']:.3f} +- {result['iw_nll_stderr']:.3f}"),  # fmt: skip
        ("  log Z", f"{result['log_z']:.3f} +- {result['log_z_stderr']:.3f}"),
        ("  mean free energy", f"{result['free_energy']:.3f}"),
        ("bits/dim", f"{result['bpd']:.4f}"),
    ]
    if hidden:
        rows.append(("active hidden units", f"{result['active_units_total']} / {hidden}"))
    return rows


def _table(result: dict[str, Any], rows: list[tuple[str, str]]) -> str:
    """A heading line (run, checkpoint, split, seed, device) and the rows as a markdown table."""
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    heading = (
        f"{result['run_dir']} ({result['checkpoint']}, epoch {result['epoch']}) on {result['split']}: "
        f"{result['num_examples']} examples, seed {result['seed']}, {result['device']}"
    )
    if result.get("conditional"):
        heading += " (conditional: NELBO and IW-NLL of log p(x|y))"
    lines = [heading, "", f"| {'metric':<{width}} | {'value':>{value_width}} |"]
    lines.append(f"|{'-' * (width + 2)}|{'-' * (value_width + 1)}:|")
    lines += [f"| {name:<{width}} | {value:>{value_width}} |" for name, value in rows]
    return "\n".join(lines)
