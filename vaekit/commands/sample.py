"""`vaekit sample`: PNG figures of a trained run's best.pt.

Modes: prior samples (default, with an optional temperature), test images beside their
reconstructions, interpolations between test images in latent space, and for 2-D latents
the decoded latent manifold and a scatter of test-set posterior means coloured by label.

A conditional run (model.conditional=true) decodes with labels: prior samples of the --label
classes in turn (default every class, one per column), reconstructions and the scatter with
each test image's own label, interpolations between two test images of one class, and the
manifold of the one --label class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from vaekit.commands.figures import save_grid, save_scatter
from vaekit.commands.langevin import DEFAULT_STEP_SIZE as DEFAULT_LANGEVIN_STEP
from vaekit.commands.langevin import DEFAULT_STEPS as DEFAULT_LANGEVIN_STEPS
from vaekit.commands.langevin import (
    check_langevin_options,
    ebm_langevin_images,
    posterior_langevin_images,
    rbm_langevin_images,
)
from vaekit.errors import VaekitError
from vaekit.latents import lerp, mean_of, posterior_means, require_one_level, slerp
from vaekit.rng import check_seed
from vaekit.runs import LoadedRun, load_run

MODES = ("samples", "reconstruct", "interpolate", "manifold", "scatter")
DEFAULT_N = {"samples": 64, "reconstruct": 32, "interpolate": 8}  # images / pairs / rows
DEFAULT_STEPS = {"interpolate": 10, "manifold": 20}
MAX_FIGURE_IMAGES = 4096  # a 64 x 64 grid: beyond it a figure is unreadable and memory grows
MANIFOLD_QUANTILES = (0.05, 0.95)  # the grid spans these prior quantiles in each dimension
EMPIRICAL_QUANTILE_SAMPLES = 20000
MAX_CLASS_COLUMNS = 16  # a conditional run's samples: one column per class for up to this many
CLASS_ROWS = 8  # rows of such a grid when --n is not given


def _is_gaussian(distribution: Distribution) -> bool:
    while isinstance(distribution, Independent):
        distribution = distribution.base_dist
    return isinstance(distribution, (Normal, MultivariateNormal, LowRankMultivariateNormal))


def tempered_prior_sample(p_z: Distribution, n: int, temperature: float) -> Tensor:
    """n draws z (n, L) from p(z), spread around the mean by `temperature`.

    Gaussian prior N(m, S): z = m + T (z0 - m), z0 ~ p(z), i.e. N(m, T^2 S).
    Mixture of Gaussians (MixtureSameFamily, e.g. prior=mog, or a VampPrior of Gaussian
    posteriors): pick the component as usual, then scale around that component's mean.
    T = 1 is plain sampling from any prior; other priors (flows, priors on the sphere) have
    no mean to scale around that keeps the sample in the prior's typical set, so T != 1
    is refused for them.
    """
    if temperature <= 0 or not math.isfinite(temperature):
        raise VaekitError(f"--temperature must be a positive number, not {temperature}.")
    if temperature == 1.0:
        return p_z.sample((n,))
    if _is_gaussian(p_z):
        z0 = p_z.sample((n,))
        return p_z.mean + temperature * (z0 - p_z.mean)
    if isinstance(p_z, MixtureSameFamily) and _is_gaussian(p_z.component_distribution):
        components = p_z.component_distribution  # batch (K,), event (L,)
        which = p_z.mixture_distribution.sample((n,))  # (n,)
        z0 = components.sample((n,))  # (n, K, L)
        z = components.mean + temperature * (z0 - components.mean)
        return z[torch.arange(n, device=z.device), which]
    raise VaekitError(
        f"--temperature applies to Gaussian and Gaussian-mixture priors only; this run's prior "
        f"gives a {type(p_z).__name__}: use --temperature 1."
    )


@torch.no_grad()
def decode(model: nn.Module, z: Tensor, y: Tensor | None = None) -> Tensor:
    """Mean of p(x|z) for latent codes z (N, L): images (N, C, H, W); of p(x|z, y) given the
    labels y (N,) for a conditional model."""
    return (model.p_x(z) if y is None else model.p_x(z, y)).mean


def is_conditional(model: nn.Module) -> bool:
    """Whether the model is a conditional VAE (model.conditional=true): it decodes given labels."""
    return bool(getattr(model, "conditional", False))


def check_labels(model: nn.Module, labels: Sequence[int] | None) -> list[int] | None:
    """The --label classes for this run's model, checked: one sentence for labels given to an
    unconditional run, or a label outside 0..C-1. None when none were given."""
    if labels is None:
        return None
    if not is_conditional(model):
        raise VaekitError(
            "--label applies to conditional runs (trained with model.conditional=true), "
            "and this run is not one."
        )
    bad = [label for label in labels if not 0 <= label < model.num_classes]
    if bad:
        raise VaekitError(
            f"--label {bad[0]} is not a class of this run: its labels are 0..{model.num_classes - 1}."
        )
    return list(labels)


def sample_classes(model: nn.Module, labels: Sequence[int] | None) -> list[int] | None:
    """The classes prior samples cycle through: the --label classes, or every class of a
    conditional model; None for an unconditional one."""
    if not is_conditional(model):
        return None
    return list(labels) if labels is not None else list(range(model.num_classes))


def class_columns(classes: Sequence[int] | None) -> int | None:
    """Images per row that put one class per column (several classes, at most MAX_CLASS_COLUMNS)."""
    if classes is None or not 1 < len(classes) <= MAX_CLASS_COLUMNS:
        return None
    return len(classes)


@torch.no_grad()
def samples(
    run: LoadedRun, n: int, temperature: float = 1.0, labels: Sequence[int] | None = None
) -> Tensor:
    """n images (n, C, H, W): means of p(x|z) for z from the (tempered) prior; a conditional
    model's of p(x|z, y) for y the classes of `sample_classes` in turn, y_i = classes[i mod len]."""
    model = run.model
    classes = sample_classes(model, labels)
    y = None
    if classes is not None:
        y = torch.tensor(classes, dtype=torch.long)[torch.arange(n) % len(classes)].to(run.device)  # (n,)
    if temperature == 1.0:
        return model.sample(n) if y is None else model.sample(n, y=y)  # any model: its own sampler
    require_one_level(model, "--temperature")
    return decode(model, tempered_prior_sample(model.prior(), n, temperature), y)


@torch.no_grad()
def reconstructions(run: LoadedRun, n: int) -> tuple[Tensor, int]:
    """The first n test images and their reconstructions: rows of 8 originals over 8 reconstructions.

    Returns images (2n', C, H, W) for n' = n rounded up to full rows (when the test set allows) and
    the number of images per row.
    """
    x = run.data.test[:n]
    if is_conditional(run.model):  # each test image with its own label
        x_hat = run.model.reconstruct(x, y=run.data.test_labels[:n])
    else:
        x_hat = run.model.reconstruct(x)
    per_row = min(8, x.shape[0])
    rows = []
    for start in range(0, x.shape[0], per_row):
        original, rebuilt = x[start : start + per_row], x_hat[start : start + per_row]
        if original.shape[0] < per_row:  # pad the last row with blank tiles
            pad = per_row - original.shape[0]
            original = torch.cat([original, original.new_zeros(pad, *original.shape[1:])])
            rebuilt = torch.cat([rebuilt, rebuilt.new_zeros(pad, *rebuilt.shape[1:])])
        rows += [original, rebuilt]
    return torch.cat(rows), per_row


@torch.no_grad()
def interpolations(
    run: LoadedRun, rows: int, steps: int, seed: int, labels: Sequence[int] | None = None
) -> Tensor:
    """rows x (steps + 2) images: test image a, decodings from a's to b's latent mean, image b.

    Pairs of test images are drawn with `seed`. The path is the straight line between the
    posterior means, or the great circle (slerp) when the posterior lives on the sphere. A
    conditional model's pairs are two test images of one class (of `labels`, default any),
    encoded and decoded with that label.
    """
    model = run.model
    require_one_level(model, "--interpolate")
    x = run.data.test
    if x.shape[0] < 2:
        raise VaekitError("--interpolate needs at least two test images.")
    generator = torch.Generator().manual_seed(seed)
    if is_conditional(model):
        picks = same_class_pairs(run.data.test_labels.cpu(), rows, labels, generator)
    else:
        picks = [torch.randperm(x.shape[0], generator=generator)[:2] for _ in range(rows)]
    index = torch.stack(picks).to(x.device)  # (rows, 2)
    pairs = x[index]  # (rows, 2, C, H, W)
    y = run.data.test_labels[index] if is_conditional(model) else None  # (rows, 2): one class per row
    given = {} if y is None else {"y": y.flatten()}
    means = mean_of(model.q_z(pairs.flatten(0, 1), **given)).view(rows, 2, -1)  # (rows, 2, L)
    path = slerp if getattr(model.posterior, "on_sphere", False) else lerp
    tiles = []
    for row, ((a, b), (za, zb)) in enumerate(zip(pairs, means, strict=True)):
        path_labels = None if y is None else y[row, 0].expand(steps)
        tiles += [a[None], decode(model, path(za, zb, steps), path_labels), b[None]]
    return torch.cat(tiles)


def same_class_pairs(
    labels: Tensor, rows: int, allowed: Sequence[int] | None, generator: torch.Generator
) -> list[Tensor]:
    """`rows` pairs of indices (2,) of distinct test images with the same label (one of
    `allowed`, default any), drawn from `generator`; one sentence when no class has two."""
    counts = torch.bincount(labels)
    usable = counts[labels] >= 2  # (N,) images with another of their class
    if allowed is not None:
        usable &= torch.isin(labels, torch.tensor(list(allowed), dtype=labels.dtype))
    if not usable.any():
        raise VaekitError(
            "--interpolate of a conditional run needs two test images of one class (of --label), "
            "and the test split has none: choose another --label."
        )
    picks = []
    for _ in range(rows):
        order = torch.randperm(labels.shape[0], generator=generator)
        a = order[usable[order]][0]
        b = order[(labels[order] == labels[a]) & (order != a)][0]
        picks.append(torch.stack([a, b]))
    return picks


def _require_plane(run: LoadedRun, what: str) -> None:
    model = run.model
    require_one_level(model, what)
    latent_dim = getattr(model, "latent_dim", None)
    if latent_dim != 2:
        raise VaekitError(
            f"{what} needs a 2-D latent, but this run has model.latent_dim={latent_dim}: "
            f"train with model.latent_dim=2 (or explore the latents in TensorBoard's projector)."
        )


def manifold_axes(p_z: Distribution, steps: int) -> Tensor:
    """Grid coordinates per latent dimension (2, steps) at evenly spaced prior quantiles.

    Exact Gaussian quantiles for a factorised Gaussian prior (Kingma & Welling, 2014, fig. 4);
    otherwise empirical quantiles of the marginals from EMPIRICAL_QUANTILE_SAMPLES prior draws.
    """
    levels = torch.linspace(*MANIFOLD_QUANTILES, steps)
    base = p_z.base_dist if isinstance(p_z, Independent) else p_z
    if isinstance(base, Normal):
        loc, scale = base.loc.detach().cpu(), base.scale.detach().cpu()  # (2,)
        return Normal(loc[:, None], scale[:, None]).icdf(levels[None, :])
    z = p_z.sample((EMPIRICAL_QUANTILE_SAMPLES,)).detach().cpu().float()  # (S, 2)
    return torch.quantile(z, levels, dim=0).T


@torch.no_grad()
def manifold(run: LoadedRun, steps: int, labels: Sequence[int] | None = None) -> Tensor:
    """steps x steps decodings over the latent plane; z[0] grows to the right, z[1] upwards.
    A conditional model decodes the plane for the one class of `labels`."""
    _require_plane(run, "--manifold")
    model = run.model
    y = None
    if is_conditional(model):
        if labels is None or len(labels) != 1:
            raise VaekitError(
                f"--manifold of a conditional run decodes the plane for one class: add one --label N "
                f"(N in 0..{model.num_classes - 1})."
            )
        y = torch.full((steps * steps,), labels[0], dtype=torch.long, device=run.device)
    if getattr(model.posterior, "on_sphere", False):
        raise VaekitError(
            "--manifold decodes a grid over the plane, but this run's latent lives on the circle."
        )
    axes = manifold_axes(model.prior(), steps)  # (2, steps)
    z1, z0 = torch.meshgrid(axes[1].flip(0), axes[0], indexing="ij")  # top row: largest z[1]
    z = torch.stack([z0.reshape(-1), z1.reshape(-1)], dim=1).to(run.device)  # (steps^2, 2)
    return decode(model, z, y)


def langevin_figure(
    run_dir: Path,
    n: int | None,
    out: Path | None,
    steps: int | None,
    seed: int,
    device: str,
    trust: Sequence[str],
    source: int | None,
    step_size: float | None,
    mala: bool,
    init: str | None = None,
) -> Path:
    """The figure of `--sampler langevin` (see `sample_figure`): n chains (default 64) of `steps`
    (default 500; a model=ebm's model.sample_steps) steps; with `source`, test image `source` first,
    then its posterior's decodings; a model=ebm's chains start at `init` (noise or buffer)."""
    n = DEFAULT_N["samples"] if n is None else n
    if not 1 <= n <= MAX_FIGURE_IMAGES - 1:
        raise VaekitError(f"--n must be between 1 and {MAX_FIGURE_IMAGES - 1}, not {n}.")
    check_seed(seed, "--seed")
    if step_size is not None and not step_size > 0:
        raise VaekitError(f"--step-size must be positive, not {step_size}.")
    run = load_run(Path(run_dir), device, trust)
    check_langevin_options(run.model, source, steps, step_size, init)
    out = Path(out) if out is not None else run.run_dir / "langevin.png"
    if getattr(run.model, "trained_by", None) == "contrastive":  # model=ebm: its own sampler's settings
        if init == "buffer" and n > run.model.buffer_size:
            size = run.model.buffer_size
            raise VaekitError(f"--n {n} is more than the {size} states of the replay buffer: lower --n.")
        torch.manual_seed(seed)
        steps = run.model.sample_steps if steps is None else steps
        images = ebm_langevin_images(run.model, n, steps, step_size, mala, init)
        return save_grid(images, out, nrow=min(8, n))
    step_size = DEFAULT_LANGEVIN_STEP if step_size is None else step_size
    steps = DEFAULT_LANGEVIN_STEPS if steps is None else steps
    torch.manual_seed(seed)
    if source is None:  # model=rbm
        return save_grid(rbm_langevin_images(run.model, n, steps, step_size, mala), out, nrow=min(8, n))
    if not 0 <= source < run.data.test.shape[0]:
        raise VaekitError(f"--from must index a test image, 0..{run.data.test.shape[0] - 1}, not {source}.")
    x = run.data.test[source : source + 1]
    images = posterior_langevin_images(run.model, x, n, steps, step_size, mala)
    return save_grid(images, out, nrow=min(8, n + 1))


def sample_figure(
    run_dir: Path,
    mode: str = "samples",
    n: int | None = None,
    out: Path | None = None,
    temperature: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str = "auto",
    trust: Sequence[str] = (),
    labels: Sequence[int] | None = None,
    sampler: str | None = None,
    source: int | None = None,
    step_size: float | None = None,
    mala: bool = False,
    init: str | None = None,
) -> Path:
    """Draw one figure of `run_dir/best.pt` as a PNG; returns its path.

    Defaults: n = 64 samples, 32 reconstructed test images, 8 interpolation rows; steps =
    10 points per interpolation, a 20 x 20 manifold; out = <run_dir>/<mode>.png. `labels`
    (--label): the classes of a conditional run (model.conditional=true) to sample, interpolate
    within or (one) to decode the manifold of; its prior samples default to every class in turn,
    one class per column (8 rows of them unless n is given). `sampler` "langevin" (prior samples
    only): Langevin chains of `steps` steps of size `step_size` (MALA with `mala`), on a
    Gaussian-visible RBM's free energy, on a VAE's latent posterior of test image `source`, or on a
    model=ebm's energy from `init` ("noise", default, or "buffer": its replay buffer)
    (`vaekit.commands.langevin`); "gibbs" (model=rbm's default) block Gibbs chains.
    """
    if mode not in MODES:
        raise VaekitError(f"mode must be one of {', '.join(MODES)}, not {mode}.")
    if sampler is not None and mode != "samples":
        raise VaekitError(f"--sampler applies to samples, not to --{mode}.")
    if sampler != "langevin" and (source is not None or step_size is not None or mala or init is not None):
        raise VaekitError(
            "--from, --step-size, --mala and --init set up Langevin chains: add --sampler langevin."
        )
    if sampler == "langevin":
        return langevin_figure(run_dir, n, out, steps, seed, device, trust, source, step_size, mala, init)
    if labels is not None and mode in ("reconstruct", "scatter"):
        raise VaekitError(
            f"--label applies to prior samples, --interpolate and --manifold; --{mode} uses each test "
            f"image's own label."
        )
    if labels is not None and len(labels) == 0:
        raise VaekitError("--label needs at least one class.")
    n_given = n is not None
    n = DEFAULT_N.get(mode, 0) if n is None else n
    steps = DEFAULT_STEPS.get(mode, 0) if steps is None else steps
    if mode in DEFAULT_N and n < 1:
        raise VaekitError(f"--n must be at least 1, not {n}.")
    if mode in DEFAULT_STEPS and steps < 2:
        raise VaekitError(f"--steps must be at least 2, not {steps}.")
    if temperature is not None and mode != "samples":
        raise VaekitError("--temperature applies to prior samples only, not to --" + mode + ".")
    temperature = 1.0 if temperature is None else temperature
    if temperature <= 0 or not math.isfinite(temperature):
        raise VaekitError(f"--temperature must be a positive number, not {temperature}.")
    if out is not None and Path(out).suffix.lower() != ".png":
        raise VaekitError(f"--out must name a .png file, not {out}.")
    if out is not None and Path(out).is_dir():
        raise VaekitError(f"--out {out} is a directory: name a .png file to write.")
    check_seed(seed, "--seed")
    images = {"samples": n, "reconstruct": 2 * n, "interpolate": n * steps, "manifold": steps * steps}
    if images.get(mode, 0) > MAX_FIGURE_IMAGES:
        raise VaekitError(
            f"That --{mode} figure would hold {images[mode]} images, more than the "
            f"{MAX_FIGURE_IMAGES} one figure shows: lower --n or --steps."
        )

    run = load_run(Path(run_dir), device, trust)
    if len(run.data.shape) != 3:
        raise VaekitError(
            f"vaekit sample draws images, but this run's data have shape {list(run.data.shape)}."
        )
    labels = check_labels(run.model, labels)
    if sampler == "gibbs" and getattr(run.model, "trained_by", None) != "cd":
        raise VaekitError("--sampler gibbs runs model=rbm's chains; a VAE draws its prior samples directly.")
    out = Path(out) if out is not None else run.run_dir / f"{mode}.png"
    torch.manual_seed(seed)
    if mode == "samples":
        columns = class_columns(sample_classes(run.model, labels))  # a conditional run: a class per column
        if columns is not None and not n_given:
            n = CLASS_ROWS * columns
        return save_grid(samples(run, n, temperature, labels), out, nrow=columns or min(8, n))
    if mode == "reconstruct":
        images, per_row = reconstructions(run, n)
        return save_grid(images, out, nrow=per_row)
    if mode == "interpolate":
        return save_grid(interpolations(run, n, steps, seed, labels), out, nrow=steps + 2)
    if mode == "manifold":
        return save_grid(manifold(run, steps, labels), out, nrow=steps)
    _require_plane(run, "--scatter")
    given = {"y": run.data.test_labels} if is_conditional(run.model) else {}
    means = posterior_means(run.model, run.data.test, 1000, **given)
    points = next(iter(means.values())).cpu().numpy()
    labels = run.raw.test_labels.cpu().numpy()
    title = f"test-set posterior means: {run.run_dir.name} (epoch {run.epoch})"
    return save_scatter(points, labels, out, title)
