"""Conditional parts of an Optuna search space (hydra-optuna-sweeper's `custom_search_space`).

A flow length means something only where the trial drew a flow: searching
`posterior.num_flows` for a Gaussian posterior would spend trials on a setting that changes
nothing. The sweeper calls these functions with (config, trial) after the trial drew its
`params`; what they suggest becomes more of the trial's overrides.
"""

from __future__ import annotations

from typing import Any

# group -> the options of that group whose config has num_flows
FLOW_OPTIONS = {"posterior": ("planar", "iaf", "sylvester"), "prior": ("flow",)}
FLOW_LENGTHS = (1, 8)  # the range searched, both ends included


def chosen(group: str, config: Any, trial: Any) -> str:
    """The trial's option of `group`: drawn, fixed on the command line, or the config's default."""
    if group in trial.params:
        return str(trial.params[group])
    if group in trial.user_attrs:  # fixed by an override such as posterior=iaf
        return str(trial.user_attrs[group])
    return str(config.hydra.runtime.choices.get(group, ""))


def flow_lengths(config: Any, trial: Any) -> None:
    """Suggest `<group>.num_flows` in FLOW_LENGTHS for each flow the trial uses (a flow
    posterior, the flow prior), unless the search already sets it."""
    low, high = FLOW_LENGTHS
    for group, options in FLOW_OPTIONS.items():
        key = f"{group}.num_flows"
        if key in trial.params or key in trial.user_attrs:
            continue
        if chosen(group, config, trial) in options:
            trial.suggest_int(key, low, high)
