"""Hydra's launcher and sweeper plugins, as vaekit's presets use them.

`hydra/launcher=`, `hydra/sweeper=` and `hparams_search=` are checked before Hydra composes, so
an unknown name or a plugin that is not installed is one sentence (Hydra's own report is a page
of search paths). `joblib` and `submitit_local` are the plugins' own configs, used as they are: a
file of the same name in configs/ would be merged into them by Hydra's deprecated automatic schema
matching (with a warning on every run); `slurm` extends `submitit_slurm` (configs/hydra/launcher/).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

from vaekit.errors import VaekitError
from vaekit.presets import preset_names, user_config_dirs

INSTALL = "pip install 'vaekit[scale]'"
# option -> (the pip package that provides it, the modules it needs)
LAUNCHER_PLUGINS = {
    "joblib": ("hydra-joblib-launcher", ("hydra_plugins.hydra_joblib_launcher", "joblib")),
    "slurm": ("hydra-submitit-launcher", ("hydra_plugins.hydra_submitit_launcher", "submitit")),
    "submitit_local": ("hydra-submitit-launcher", ("hydra_plugins.hydra_submitit_launcher", "submitit")),
    "submitit_slurm": ("hydra-submitit-launcher", ("hydra_plugins.hydra_submitit_launcher", "submitit")),
}
SWEEPER_PLUGINS = {
    "optuna": ("hydra-optuna-sweeper", ("hydra_plugins.hydra_optuna_sweeper", "optuna")),
}
BUILT_IN = {"hydra/launcher": ["basic"], "hydra/sweeper": ["basic"]}  # Hydra's own options
PLUGINS = {"hydra/launcher": LAUNCHER_PLUGINS, "hydra/sweeper": SWEEPER_PLUGINS}
SEARCH_GROUP = "hparams_search"
SWEEPER_OF_PRESET = re.compile(r"override\s+/hydra/sweeper\s*:\s*(\w+)")


def installed(modules: Sequence[str]) -> bool:
    """True when every module can be imported (found without importing it)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in modules)
    except (ImportError, ValueError):  # a parent package is missing
        return False


def registered_options(group: str) -> list[str]:
    """The options of a hydra/ group that installed plugins register (e.g. a ray launcher)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # discovers the installed plugins, which register their configs
    try:
        return [Path(name).stem for name in ConfigStore.instance().list(group)]
    except OSError:  # no such group registered
        return []


def check_option(group: str, name: str, dirs: Sequence[Path]) -> None:
    """Refuse, in one sentence, an option of hydra/launcher or hydra/sweeper that names none,
    or whose plugin is not installed."""
    plugins = PLUGINS[group]
    if name in plugins:
        package, modules = plugins[name]
        if not installed(modules):
            raise VaekitError(f"{group}={name} needs the {package} plugin, not installed: {INSTALL}.")
        return
    files = preset_names(group, dirs)
    if name in BUILT_IN[group] or name in files or name in registered_options(group):
        return
    choices = ", ".join(sorted({*BUILT_IN[group], *plugins, *files}))
    raise VaekitError(f"{group}={name} names no {group.split('/')[1]}: choose from {choices}.")


def check_search(name: str, dirs: Sequence[Path], config_dir: Path) -> None:
    """Refuse an hparams_search preset that names none, or whose sweeper is not installed."""
    names = preset_names(SEARCH_GROUP, dirs)
    if name not in names:
        raise VaekitError(
            f"{SEARCH_GROUP}={name} names no search preset: choose from {', '.join(names) or 'none'} "
            f"(the files in {config_dir / SEARCH_GROUP})."
        )
    for folder in dirs:
        path = Path(folder) / SEARCH_GROUP / f"{name}.yaml"
        found = SWEEPER_OF_PRESET.search(path.read_text()) if path.is_file() else None
        if found:
            check_option("hydra/sweeper", found.group(1), dirs)
            return


def check_plugins(args: Sequence[str], config_dir: Path) -> None:
    """Check the command line's launcher, sweeper and search preset before Hydra composes.

    `args` are the words of `vaekit train`; a sweep over them (`a,b`, `choice(...)`) is left
    to Hydra, as is a search path extended through `hydra.searchpath`.
    """
    if any(arg.lstrip("+~").startswith("hydra.searchpath") for arg in args):
        return
    dirs = [config_dir, *user_config_dirs(args)]
    for arg in args:
        key, sep, value = arg.partition("=")
        group = key.lstrip("+~")
        if not sep or "," in value or "(" in value or not value:
            continue
        if group in PLUGINS:
            check_option(group, value, dirs)
        elif group == SEARCH_GROUP:
            check_search(value, dirs, config_dir)

