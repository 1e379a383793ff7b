"""The `vaekit` command: dispatches subcommands (train is a Hydra app)."""

from __future__ import annotations

import sys

USAGE = """usage: vaekit <command> [arguments]

commands:
  train     fit a VAE chosen by config groups (Hydra app):
              vaekit train model.latent_dim=32 dataset=mnist dataset.root=data
              vaekit train -m model.latent_dim=8,16      # multirun sweep
              vaekit train --help                         # groups, options, settings
              vaekit train --cfg job                      # the composed config

Runs land in outputs/; watch them with: tensorboard --logdir outputs
"""

COMMANDS = ("train",)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `vaekit` console script."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0)
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"vaekit: unknown command '{command}' (choose from: {', '.join(COMMANDS)}).", file=sys.stderr)
        print(USAGE, end="", file=sys.stderr)
        sys.exit(2)
    from vaekit import train  # deferred: imports torch and Hydra

    sys.argv = [f"{sys.argv[0]} {command}", *rest]
    train.hydra_main()
    if train.FAILED_JOBS:
        print(f"vaekit: {len(train.FAILED_JOBS)} sweep job(s) failed:", file=sys.stderr)
        for line in train.FAILED_JOBS:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
