"""`python -m vaekit ...` runs the `vaekit` command, e.g. `torchrun --nproc_per_node=2 -m vaekit train`."""

from vaekit.cli import main

main()
