"""`vaekit evaluate RUN --ood OVERRIDES`: out-of-distribution scores of a run's best.pt.

The run's test split (in distribution) and the test split of another dataset, composed from
dataset overrides as `vaekit train` composes its own (`--ood dataset=fashion_mnist
dataset.root=DATA`), are scored per example: nll, typicality and complexity
(`vaekit.evaluation.ood`). Each score's AUROC, AUPRC and FPR at 95% TPR are printed as one
table and written to `ood_<name>.json` in the run directory, with a histogram of the scores
of both sets in `ood_<name>.png`. The other set is prepared as the run's own test split is
(the same levels, binarized once for Bernoulli likelihoods); its images are resized to the
run's height and width, and quantized to the run's levels, where they differ (both named in
the JSON); other channel counts are refused. Refused input writes nothing; the same --seed
gives the same numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vaekit.commands.evaluate import DEFAULTS, check_options
from vaekit.data import RawSplits
from vaekit.errors import VaekitError
from vaekit.evaluation.metrics import bits_per_dim, check_budget
from vaekit.evaluation.ood import (
    SCORES,
    complexity,
    compressed_bits,
    nll_kind,
    per_example_nll,
    separation,
    typicality,
)
from vaekit.runs import Run, load_run, write_json

DEFAULT_DATASET = "digits"  # configs/train.yaml's, which the --ood overrides start from
TYPICAL_EXAMPLES = 1000  # training examples whose mean NLL is the typical NLL (typicality)
OOD_KEYS = ("dataset", "data.limit_eval")  # what --ood may override: the dataset group, the test's size
SCORE_NAMES = {
    "iw_nll": "importance-weighted NLL",
    "free_energy": "free energy + dequantization offset (the NLL up to log Z)",
    "nll_per_example": "the model's nll_per_example",
}


def evaluate_ood(
    run_dir: Path,
    overrides: Sequence[str],
    k: int | None = None,
    split: str = "test",
    batch_size: int = DEFAULTS.batch_size,
    seed: int = DEFAULTS.seed,
    device: str = "auto",
    progress: bool = True,
    trust: Sequence[str] = (),
    typical_examples: int = TYPICAL_EXAMPLES,
) -> dict[str, Any]:
    """Score `run_dir/best.pt` on its `split` and on the same split of the dataset that
    `overrides` compose; returns the result and writes ood_<name>.json and ood_<name>.png.

    Scores per example (higher = more out of distribution): nll (the IW-NLL with k draws,
    None: eval.iw_samples; model=rbm: its free energy plus offset; other models: their
    nll_per_example), typicality against the mean NLL of `typical_examples` training examples
    (Nalisnick et al., 2019b) and complexity, the NLL in bits minus the PNG length of the image
    (Serra et al., 2020). For each: AUROC, AUPRC and FPR at 95% TPR with the run's set as the
    negatives. Each stage is seeded with `seed`. Raises VaekitError, writing nothing, for
    overrides that are not dataset overrides, a dataset that cannot be loaded, other channel
    counts, or a conditional run.
    """
    k = DEFAULTS.iw_samples if k is None else k
    check_options(k, split, batch_size, seed, None)
    if typical_examples < 1:
        raise VaekitError(f"typical_examples must be at least 1, not {typical_examples}.")
    words = check_overrides(overrides)
    run = load_run(Path(run_dir), device, trust)
    refuse_conditional(run.model)
    kind = nll_kind(run.model)
    ood_raw = load_ood_dataset(words)
    x_ood, ood_int, prepared = prepare_like(run, ood_raw, split, words)
    x_in = run.data.test if split == "test" else run.data.val
    x_train = typical_subset(run, typical_examples, seed)
    if kind == "iw_nll":
        check_budget(x_in.shape[0] + x_ood.shape[0] + x_train.shape[0], k, "--k")

    def nll_of(x: Tensor, desc: str) -> Tensor:
        torch.manual_seed(seed)  # each set's draws on their own: another --ood set leaves these alone
        nll = per_example_nll(run.model, x, k, batch_size, progress, desc=desc)
        return torch.nan_to_num(nll, nan=math.inf)  # a NaN score: as far out as can be

    nll_in, nll_ood = nll_of(x_in, f"{run.raw.name} {split}"), nll_of(x_ood, f"{ood_raw.name} {split}")
    nll_train = nll_of(x_train, f"{run.raw.name} train")
    typical = nll_train[nll_train.isfinite()].mean().item() if nll_train.isfinite().any() else math.nan
    bits_in, codec = compressed_bits(integer_values(run, x_in))
    bits_ood, _ = compressed_bits(ood_int)
    scores = {
        "nll": (nll_in, nll_ood),
        "typicality": (typicality(nll_in, typical), typicality(nll_ood, typical)),
        "complexity": (complexity(nll_in, bits_in), complexity(nll_ood, bits_ood)),
    }
    scores = {name: tuple(torch.nan_to_num(s, nan=math.inf).numpy() for s in pair)
              for name, pair in scores.items()}  # fmt: skip
    figures = {name: separation(*scores[name]) for name in SCORES}

    name = ood_name(ood_raw, words)
    stem = f"ood_{name}" + ("" if split == "test" else f"_{split}")
    json_path, png_path = run.run_dir / f"{stem}.json", run.run_dir / f"{stem}.png"
    num_dims = math.prod(run.raw.shape)
    result: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "checkpoint": run.checkpoint.name,
        "epoch": run.epoch,
        "split": split,
        "score": kind,
        "k": k if kind == "iw_nll" else None,
        "seed": seed,
        "batch_size": batch_size,
        "device": str(run.device),
        "in_distribution": side(run.raw.name, [], nll_in, bits_in, num_dims),
        "ood": {**side(ood_raw.name, words, nll_ood, bits_ood, num_dims), "name": name, **prepared},
        "typical_nll": typical,
        "typical_examples": int(x_train.shape[0]),
        "compressor": codec,
        "scores": figures,
        "histogram": str(png_path),
    }
    from vaekit.commands.figures import save_histograms

    units = "nats" if kind == "iw_nll" else "nats, up to log Z"
    panels = {
        f"nll ({units}); AUROC {figures['nll']['auroc']:.3f}": scores["nll"],
        f"typicality |nll - {typical:.1f}|; AUROC {figures['typicality']['auroc']:.3f}": scores["typicality"],
        f"complexity (bits); AUROC {figures['complexity']['auroc']:.3f}": scores["complexity"],
    }
    title = f"{run.run_dir.name}: {run.raw.name} {split} vs {name} {split}, {SCORE_NAMES[kind]}"
    save_histograms(panels, (f"{run.raw.name} (in)", f"{name} (OOD)"), png_path, title)
    write_json(json_path, result)
    result["path"] = str(json_path)
    return result


def check_overrides(overrides: Sequence[str]) -> list[str]:
    """The --ood words as a list, each a KEY=VALUE override of the dataset group (or
    data.limit_eval); one sentence for the first that is not."""
    words = [str(word) for word in overrides]
    if not words:
        raise VaekitError("--ood needs dataset overrides, e.g. --ood dataset=fashion_mnist dataset.root=DIR.")
    for word in words:
        key, equals, _ = word.partition("=")
        key = key.lstrip("+~")
        if not equals and not word.startswith("~"):
            raise VaekitError(
                f"--ood takes KEY=VALUE overrides such as dataset=fashion_mnist, not {word!r}."
            )
        if not any(key == allowed or key.startswith(f"{allowed}.") for allowed in OOD_KEYS):
            raise VaekitError(
                f"--ood takes dataset overrides only (dataset=NAME, dataset.KEY=VALUE, data.limit_eval=N), "
                f"not {word}."
            )
    return words


def refuse_conditional(model: torch.nn.Module) -> None:
    """A conditional VAE gives log p(x|y) for a known label only: refused in one sentence."""
    if getattr(model, "conditional", False):
        raise VaekitError(
            "--ood scores log p(x), but this run is a conditional VAE (model.conditional=true), which "
            "gives log p(x|y) only for a known label y: score an unconditional run."
        )


def load_ood_dataset(words: list[str]) -> RawSplits:
    """The splits of the dataset that `words` compose with the train config (as `vaekit train
    OVERRIDES` would); its errors, composing or loading, as one sentence naming the --ood set."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from vaekit.build import build_dataset
    from vaekit.commands import train  # registers the schema and resolvers

    said = f"--ood {' '.join(words)}"
    try:
        with initialize_config_dir(str(train.CONFIG_DIR), version_base="1.3", job_name="train"):
            config = compose("train", overrides=words)
        return build_dataset(config)
    except MissingConfigException as error:  # an unknown option: name the ones there are
        options = getattr(error, "options", None)
        known = f" (choose from: {', '.join(options)})" if options else ""
        raise VaekitError(f"{said}: {_first_line(error).rstrip('.')}{known}.") from error
    except (HydraException, OmegaConfBaseException) as error:
        chosen = any(word.lstrip("+").startswith("dataset=") for word in words)
        hint = "" if chosen else (
            f" (they apply to the default dataset, {DEFAULT_DATASET}: choose one with dataset=NAME)"
        )
        raise VaekitError(f"{said}: {_first_line(error).rstrip('.')}{hint}.") from error
    except VaekitError as error:
        raise VaekitError(f"{said}: {error}") from error


def _first_line(error: Exception) -> str:
    """Hydra's message (an unknown option, a bad override) in one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return re.sub(r"^In '[^']*': ", "", lines[0]) if lines else type(error).__name__


def prepare_like(
    run: Run, raw: RawSplits, split: str, words: list[str]
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The other dataset's `split` prepared as the run's own: (x (N, C, H, W) floats in [0, 1] on
    the run's device, their integer values (N, C, H, W) uint8, what was changed).

    Other channel counts are refused; another height and width is resized (antialiased
    bilinear on intensities in [0, 1], "resized_from"); then the values are quantized to the
    run's levels where they differ ("levels_from"), x = x_int / (levels - 1), and binarized
    once, x ~ Bernoulli(x) with the dataset's binarize_seed, where the run's likelihood is
    Bernoulli: the rule of `vaekit.data.DeviceData` for the run's own test split."""
    images = raw.test if split == "test" else raw.val
    channels, height, width = run.raw.shape
    levels = run.raw.num_levels
    if images.shape[1] != channels:
        raise VaekitError(
            f"--ood {' '.join(words)}: its images have {images.shape[1]} channel(s) but the run's have "
            f"{channels}, and vaekit does not convert between them: use a dataset with {channels} "
            f"channel(s) (an image folder: dataset.channels={channels})."
        )
    changed: dict[str, Any] = {"resized_from": None, "levels_from": None}
    x_int = images
    if tuple(images.shape[2:]) != (height, width) or raw.num_levels != levels:
        values = images.float().div_(raw.num_levels - 1)
        if tuple(images.shape[2:]) != (height, width):
            changed["resized_from"] = list(images.shape[2:])
            values = torch.nn.functional.interpolate(
                values, size=(height, width), mode="bilinear", antialias=True, align_corners=False
            ).clamp_(0, 1)
        if raw.num_levels != levels:
            changed["levels_from"] = raw.num_levels
        x_int = values.mul_(levels - 1).round_().to(torch.uint8)
    x = x_int.float().mul_(1.0 / (levels - 1))
    if run.data.binarize:
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(raw.binarize_seed))
        x_int = x.to(torch.uint8)  # 0 and 1: what the Bernoulli likelihood codes
    return x.to(run.device), x_int, changed


def typical_subset(run: Run, n: int, seed: int) -> Tensor:
    """min(n, N) training examples drawn without replacement by `seed`, prepared as a training
    batch is (floats in [0, 1], binarized afresh by the same generator for Bernoulli runs):
    the examples whose mean NLL is the typical NLL."""
    generator = torch.Generator().manual_seed(seed)
    train = run.raw.train
    index = torch.randperm(train.shape[0], generator=generator)[: min(n, train.shape[0])]
    x = train[index].float().mul_(1.0 / (run.raw.num_levels - 1))
    if run.data.binarize:
        x = torch.bernoulli(x, generator=generator)
    return x.to(run.device)


def integer_values(run: Run, x: Tensor) -> Tensor:
    """The integer values (N, C, H, W) uint8 that the run's model codes for floats x in [0, 1]:
    0..levels-1, or 0 and 1 for binarized data."""
    top = 1 if run.data.binarize else run.raw.num_levels - 1
    return x.mul(top).round().to(torch.uint8).cpu()


def side(name: str, words: list[str], nll: Tensor, bits: Tensor, num_dims: int) -> dict[str, Any]:
    """One set's summary in the JSON: its name, the overrides that load it, its size, its mean
    NLL (nats and bits/dim) and mean PNG length (bits)."""
    mean = float(nll.mean())
    return {
        "dataset": name,
        **({"overrides": words} if words else {}),
        "num_examples": int(nll.shape[0]),
        "mean_nll": mean,
        "mean_bpd": bits_per_dim(mean, num_dims),
        "mean_compressed_bits": float(bits.mean()),
    }


def ood_name(raw: RawSplits, words: list[str]) -> str:
    """The OOD set's name in file names: the dataset's name, and its root folder's where one was
    given (image_folder_noise), with anything but letters, digits, '.', '-' and '_' as '_'."""
    roots = [word.partition("=")[2] for word in words if word.lstrip("+").partition("=")[0] == "dataset.root"]
    folder = Path(roots[-1]).expanduser().name if roots else ""
    name = raw.name if not folder or folder == raw.name else f"{raw.name}_{folder}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._") or "dataset"


def format_ood_table(result: dict[str, Any]) -> str:
    """The printed summary: a heading, each set's mean NLL, and score x {AUROC, AUPRC, FPR@95TPR}."""
    inside, ood = result["in_distribution"], result["ood"]
    estimator = SCORE_NAMES[result["score"]] + (f", k={result['k']}" if result["k"] else "")
    lines = [
        f"{result['run_dir']} ({result['checkpoint']}, epoch {result['epoch']}): {inside['dataset']} "
        f"{result['split']} ({inside['num_examples']}) against {ood['name']} {result['split']} "
        f"({ood['num_examples']}), seed {result['seed']}, {result['device']}",
        f"score: {estimator}; mean nll {inside['mean_nll']:.3f} (in) vs {ood['mean_nll']:.3f} (OOD) nats, "
        f"typical nll {result['typical_nll']:.3f} over {result['typical_examples']} training examples",
    ]
    if ood["resized_from"] or ood["levels_from"]:
        changes = []
        if ood["resized_from"]:
            changes.append("resized from {}x{}".format(*ood["resized_from"]))
        if ood["levels_from"]:
            changes.append(f"quantized from {ood['levels_from']} levels")
        lines.append(f"the OOD images were {' and '.join(changes)} to the run's")
    lines += ["", "| score      | AUROC | AUPRC | FPR@95TPR |", "|------------|------:|------:|----------:|"]
    for name in SCORES:
        figures = result["scores"][name]
        lines.append(
            f"| {name:<10} | {figures['auroc']:.3f} | {figures['auprc']:.3f} | {figures['fpr95']:>9.3f} |"
        )
    return "\n".join(lines)
