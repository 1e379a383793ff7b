"""The `vaekit` subcommands: train (the Hydra app), evaluate, sample, report."""
