"""Which `_target_`s a config read from a file may name, checked before anything is built.

A checkpoint's saved config goes through Hydra's `instantiate()` in `vaekit evaluate`,
`vaekit sample` and `vaekit train resume=DIR`. `torch.load(weights_only=True)` keeps a crafted
file from unpickling code, but not a config whose `_target_` chain (at any depth, through
`_args_` or partials) calls e.g. `torch.load(weights_only=False)` on bytes it carries. So a
config from a file may name only vaekit's own components and torch.optim's optimizers, one per
group at the top of the group, and otherwise hold plain data. A user whose run used their own
code opts in by module prefix (`--trust mylab`, or `trust=[mylab]` on resume).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vaekit.errors import VaekitError

# The config groups whose node is built by `_target_` (vaekit/build.py).
BUILT_GROUPS = ("dataset", "likelihood", "model", "prior", "posterior", "net", "optimizer")
# Keys that make Hydra's instantiate() call or import something.
HYDRA_KEYS = frozenset({"_target_", "_args_", "_partial_", "_recursive_", "_convert_"})
VAEKIT_TARGETS = frozenset(
    {
        "vaekit.data.load_digits",
        "vaekit.data.load_torchvision",
        "vaekit.data.load_cifar10",
        "vaekit.data.load_omniglot",
        "vaekit.data.load_image_folder",
        "vaekit.data.load_celeba64",
        "vaekit.likelihoods.BernoulliLikelihood",
        "vaekit.likelihoods.CategoricalLikelihood",
        "vaekit.likelihoods.GaussianLikelihood",
        "vaekit.likelihoods.DiscretizedLogisticLikelihood",
        "vaekit.likelihoods.DiscretizedMixtureLikelihood",
        "vaekit.models.VAE",
        "vaekit.hierarchical.TwoLevelVAE",
        "vaekit.hierarchical.TopDownVAE",
        "vaekit.image_rbm.ImageRBM",
        "vaekit.ebm.EnergyModel",
        "vaekit.priors.StandardPrior",
        "vaekit.priors.MixtureOfGaussiansPrior",
        "vaekit.priors.VampPrior",
        "vaekit.priors.FlowPrior",
        "vaekit.priors.UniformSpherePrior",
        "vaekit.posteriors.GaussianPosterior",
        "vaekit.posteriors.PlanarPosterior",
        "vaekit.posteriors.SylvesterPosterior",
        "vaekit.posteriors.IAFPosterior",
        "vaekit.posteriors.VonMisesFisherPosterior",
        "vaekit.posteriors.PowerSphericalPosterior",
        "vaekit.nets.MLPNets",
        "vaekit.nets.ConvNets",
        "vaekit.resnet.ResNets",
        "vaekit.training.optimizers.FlatAdam",
        "vaekit.training.optimizers.FlatAdamax",
    }
)


def optimizer_targets() -> frozenset[str]:
    """'torch.optim.<Name>' for every optimizer class that torch.optim exports."""
    import torch

    names = getattr(torch.optim, "__all__", dir(torch.optim))
    return frozenset(
        f"torch.optim.{name}"
        for name in names
        if isinstance(getattr(torch.optim, name, None), type)
        and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
        and name != "Optimizer"
    )


def is_trusted(target: str, trusted_prefixes: Sequence[str] = ()) -> bool:
    """True for vaekit's components, torch.optim's optimizers, and targets under a prefix the
    user trusts ('mylab' trusts 'mylab.priors.Fancy', not 'mylabx.y')."""
    if target in VAEKIT_TARGETS or target in optimizer_targets():
        return True
    return any(target == prefix or target.startswith(f"{prefix}.") for prefix in trusted_prefixes if prefix)


def check_trusted(config: Mapping[str, Any], source: Path, trusted_prefixes: Sequence[str] = ()) -> None:
    """Refuse, in one sentence naming `source`, a config (plain data, as read from a file)
    that names an untrusted `_target_`, puts Hydra's keys anywhere but a built group's
    `_target_`, or holds an interpolation instead of a value."""
    for group in BUILT_GROUPS:
        node = config.get(group)
        if not isinstance(node, Mapping):
            raise VaekitError(
                f"The config saved in {source} has no {group} settings, so it cannot be rebuilt."
            )
        target = node.get("_target_")
        if not isinstance(target, str):
            raise VaekitError(f"The config saved in {source} names no class for its {group} (_target_).")
        if not is_trusted(target, trusted_prefixes):
            module = target.rsplit(".", 1)[0] if "." in target else target
            raise VaekitError(
                f"The config saved in {source} asks to build its {group} from {target}, which is not "
                f"vaekit's or torch.optim's, so it is refused (it could run code); if you trust that "
                f"code, pass --trust {module.split('.')[0]} (on resume: trust=[{module.split('.')[0]}])."
            )
    for path, key, value in _walk(config, ""):
        if key in HYDRA_KEYS and not (
            key == "_target_" and path.count(".") == 1 and path.split(".")[0] in BUILT_GROUPS
        ):
            raise VaekitError(
                f"The config saved in {source} holds {path}, which would make Hydra call code where "
                f"vaekit expects plain data, so it is refused."
            )
        if isinstance(value, str) and "${" in value:
            raise VaekitError(
                f"The config saved in {source} holds an interpolation at {path} ({value!r}) where a "
                f"saved config holds plain values, so it is refused."
            )


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, str, Any]]:
    """(dotted path, key, value) of every entry at any depth of nested mappings and lists."""
    if isinstance(node, Mapping):
        items = [(str(key), value) for key, value in node.items()]
    elif isinstance(node, (list, tuple)):
        items = [(str(index), value) for index, value in enumerate(node)]
    else:
        return
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else key
        yield path, key, value
        yield from _walk(value, path)
