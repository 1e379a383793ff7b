"""`vaekit evaluate`: NELBO, importance-weighted NLL, bits/dim and active units of a run's best.pt.

The result is printed as one table and written to `eval_<split>_k<k>.json` in the run
directory. Every random draw follows --seed, so the same command gives the same numbers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vaekit.data import batches
from vaekit.errors import VaekitError
from vaekit.latents import posterior_means
from vaekit.metrics import active_units, bits_per_dim, nelbo_terms
from vaekit.runs import load_run

SPLITS = ("test", "val")
K_CHUNK = 100  # importance samples per model.log_likelihood call: the progress bar's step


@torch.no_grad()
def iw_nll_chunked(model: nn.Module, x: Tensor, k: int, batch_size: int, progress: bool = True) -> float:
    """Mean importance-weighted NLL with k samples over x (N, *shape), nats per example.

    Examples go in batches and samples in chunks of K_CHUNK; chunks combine exactly,
    log p(x) ~= logsumexp_c [ll_c + log k_c] - log k, where ll_c is the model's k_c-sample
    estimate (`log_likelihood(x, k_c)`, itself chunked so memory stays bounded).
    """
    sizes = [min(K_CHUNK, k - start) for start in range(0, k, K_CHUNK)]
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    bar = tqdm(
        total=x.shape[0] * k,
        desc=f"IW-NLL (k={k})",
        unit="sample",
        unit_scale=True,
        disable=None if progress else True,  # None: shown on a terminal only
        leave=False,
    )
    with bar:
        for xb in batches(x, batch_size):
            parts = []
            for size in sizes:
                parts.append(model.log_likelihood(xb, size).double() + math.log(size))  # (B,)
                bar.update(xb.shape[0] * size)
            total += (torch.logsumexp(torch.stack(parts), dim=0) - math.log(k)).sum()
    return -total.item() / x.shape[0]


def evaluate_run(
    run_dir: Path,
    k: int = 5000,
    split: str = "test",
    batch_size: int = 500,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    nelbo_samples: int = 100,
) -> dict[str, Any]:
    """Evaluate `run_dir/best.pt` on a split; returns the metrics and writes them as JSON.

    NELBO, rec and KL (averaged over examples and nelbo_samples draws each), IW-NLL with k samples,
    bits/dim of the IW-NLL, and active units per latent level (Burda et al., 2016).
    Each stage is seeded with `seed` on its own, so changing k leaves the NELBO unchanged.
    """
    if k < 1:
        raise VaekitError(f"--k must be at least 1, not {k}.")
    if batch_size < 1:
        raise VaekitError(f"--batch-size must be at least 1, not {batch_size}.")
    if nelbo_samples < 1:
        raise VaekitError(f"--nelbo-samples must be at least 1, not {nelbo_samples}.")
    if split not in SPLITS:
        raise VaekitError(f"--split must be one of {', '.join(SPLITS)}, not {split}.")
    run = load_run(Path(run_dir), device)
    x = run.data.test if split == "test" else run.data.val
    model = run.model

    torch.manual_seed(seed)
    terms = nelbo_terms(model, x, batch_size, nelbo_samples)
    torch.manual_seed(seed)
    nll = iw_nll_chunked(model, x, k, batch_size, progress)
    torch.manual_seed(seed)
    means = posterior_means(model, x, batch_size)

    result: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "checkpoint": run.checkpoint.name,
        "epoch": run.epoch,
        "split": split,
        "num_examples": int(x.shape[0]),
        "k": k,
        "nelbo_samples": nelbo_samples,
        "seed": seed,
        "batch_size": batch_size,
        "device": str(run.device),
    }
    result.update({name.replace("/", "_"): value for name, value in terms.items()})
    result.update(
        iw_nll=nll,
        bpd=bits_per_dim(nll, run.data.num_dims),
        nelbo_bpd=bits_per_dim(terms["nelbo"], run.data.num_dims),
        active_units=active_units(means),
        latent_dims={level: int(mean.shape[1]) for level, mean in means.items()},
    )
    result["active_units_total"] = sum(result["active_units"].values())
    result["path"] = str(write_result(result))
    return result


def result_path(run_dir: Path, split: str, k: int) -> Path:
    """Where `vaekit evaluate` writes its JSON: beside best.pt."""
    return Path(run_dir) / f"eval_{split}_k{k}.json"


def write_result(result: dict[str, Any]) -> Path:
    """Write the result (without its own path) atomically; returns the path."""
    path = result_path(Path(result["run_dir"]), result["split"], result["k"])
    payload = {key: value for key, value in result.items() if key != "path"}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: a heading line and a two-column markdown table."""
    levels = list(result["latent_dims"])
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
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    heading = (
        f"{result['run_dir']} ({result['checkpoint']}, epoch {result['epoch']}) on {result['split']}: "
        f"{result['num_examples']} examples, seed {result['seed']}, {result['device']}"
    )
    lines = [heading, "", f"| {'metric':<{width}} | {'value':>{value_width}} |"]
    lines.append(f"|{'-' * (width + 2)}|{'-' * (value_width + 1)}:|")
    lines += [f"| {name:<{width}} | {value:>{value_width}} |" for name, value in rows]
    return "\n".join(lines)
