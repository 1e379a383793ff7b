"""Experiment and debug presets (configs/experiment/, configs/debug/): the names that exist.

`vaekit train +experiment=NAME` and `+debug=NAME` are checked against the preset folders
before Hydra composes, so a misspelled name is one sentence that lists the choices instead
of Hydra's search-path report. Cheap: reads folder listings, imports neither torch nor Hydra.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vaekit.errors import VaekitError

PRESET_GROUPS = ("experiment", "debug")
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def preset_names(group: str, config_dirs: Sequence[Path]) -> list[str]:
    """The presets of `group` in any of `config_dirs` (the names of its .yaml files), sorted."""
    names = {path.stem for folder in config_dirs for path in (Path(folder) / group).glob("*.yaml")}
    return sorted(names)


def user_config_dirs(args: Sequence[str]) -> list[Path]:
    """The folders that `--config-dir DIR` / `-cd DIR` / `--config-dir=DIR` add to Hydra's search."""
    found = []
    for i, arg in enumerate(args):
        if arg in CONFIG_DIR_FLAGS and i + 1 < len(args):
            found.append(Path(args[i + 1]).expanduser())
        elif arg.startswith("--config-dir="):
            found.append(Path(arg.split("=", 1)[1]).expanduser())
    return found


def check_presets(args: Sequence[str], config_dir: Path) -> None:
    """Refuse, in one sentence, a preset override naming no preset, or one given without `+`.

    `args` are the command line's words (or the API's overrides); a sweep's `a,b` and a list
    `[a,b]` name each of their values. A search path extended through `hydra.searchpath`, or a
    sweep function such as `choice(...)`, is left to Hydra.
    """
    if any(arg.lstrip("+~").startswith("hydra.searchpath") for arg in args):
        return
    dirs = [config_dir, *user_config_dirs(args)]
    for arg in args:
        key, sep, value = arg.partition("=")
        group = key.lstrip("+")
        if not sep or group not in PRESET_GROUPS or "(" in value:
            continue
        if not key.startswith("+"):
            raise VaekitError(f"{arg}: a preset is added to the config, with a plus: +{group}={value}.")
        names = preset_names(group, dirs)
        for name in value.strip("[]").split(","):
            if name.strip() not in names:
                choices = ", ".join(names) or "none"
                raise VaekitError(
                    f"+{group}={name.strip()} names no {group} preset: choose from {choices} "
                    f"(the files in {config_dir / group})."
                )
