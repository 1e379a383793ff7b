"""vaekit: a config-driven training CLI for variational autoencoders."""

__version__ = "0.1.0"
