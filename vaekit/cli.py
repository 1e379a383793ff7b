"""The `vaekit` command: dispatches subcommands (train is a Hydra app; the others use argparse)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

USAGE = """usage: vaekit <command> [arguments]

commands:
  train     fit a VAE chosen by config groups (Hydra app):
              vaekit train model.latent_dim=32 dataset=mnist dataset.root=data
              vaekit train -m model.latent_dim=8,16      # multirun sweep
              vaekit train --help                         # groups, options, settings
              vaekit train --cfg job                      # the composed config
  evaluate  NELBO, importance-weighted NLL, bits/dim and active units of a run's best.pt:
              vaekit evaluate outputs/2024-05-01/12-00-00 --k 5000
            and out-of-distribution scores (AUROC, AUPRC, FPR@95TPR) against another dataset:
              vaekit evaluate RUN_DIR --ood dataset=fashion_mnist dataset.root=DATA
  sample    PNG figures of a run: prior samples, --reconstruct, --interpolate,
            and for 2-D latents --manifold and --scatter:
              vaekit sample RUN_DIR --n 64 --temperature 0.8
  report    compare every run under a folder (markdown table, report.csv, report_curves.png):
              vaekit report outputs/multirun/2024-05-01/12-00-00

Runs land in outputs/; watch them with: tensorboard --logdir outputs
`vaekit <command> --help` describes each command's options.
"""

COMMANDS = ("train", "evaluate", "sample", "report")
DEVICE_HELP = "auto (cuda if available, else cpu), cpu, cuda, cuda:1"


def _add_run_arguments(parser: argparse.ArgumentParser, seed: int) -> None:
    """RUN_DIR, --seed and --device: what every command on one trained run takes."""
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a run directory that vaekit train wrote"
    )
    parser.add_argument("--seed", type=int, default=seed, help=f"seed of every random draw (default {seed})")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="MODULE",
        help="also build components from this module (and below) named in the run's saved config; "
        "only for code you trust (repeatable)",
    )


def _evaluate_parser() -> argparse.ArgumentParser:
    from vaekit.schema import EvalConfig  # the defaults of the final evaluation, eval.*

    defaults = EvalConfig()
    parser = argparse.ArgumentParser(
        prog="vaekit evaluate",
        description=(
            "Evaluate a run's best.pt on the test (or validation) split: NELBO, importance-weighted "
            "NLL with k samples (Burda et al., 2016), bits/dim and active units. Prints a table and "
            "writes eval_<split>_k<k>.json into the run directory. Same --seed, same numbers."
        ),
    )
    _add_run_arguments(parser, defaults.seed)
    parser.add_argument(
        "--k",
        type=int,
        default=None,
        help=(
            f"importance samples per example (default {defaults.iw_samples}, as eval.iw_samples); for "
            "model=rbm the AIS chains of log Z (default: the run's eval.ais_chains)"
        ),
    )
    parser.add_argument(
        "--ais-betas",
        type=int,
        default=None,
        help="model=rbm: AIS's intermediate distributions (default: the run's eval.ais_betas)",
    )
    parser.add_argument(
        "--nelbo-samples",
        type=int,
        default=defaults.nelbo_samples,
        help="draws of z per example in the NELBO, the first of the IW-NLL's draws (default: all k)",
    )
    parser.add_argument(
        "--split", choices=("test", "val"), default="test", help="split to evaluate (default test)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"examples per batch; memory stays bounded (default {defaults.batch_size})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--ood",
        nargs="+",
        default=None,
        metavar="OVERRIDE",
        help=(
            "out-of-distribution scores instead: the run's split against the same split of the dataset "
            "these overrides compose (e.g. --ood dataset=fashion_mnist dataset.root=DATA): per-example "
            "nll, typicality and complexity, each's AUROC, AUPRC and FPR at 95%% TPR, written to "
            "RUN_DIR/ood_<name>.json with a histogram, ood_<name>.png"
        ),
    )
    return parser


def _sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaekit sample",
        description=(
            "Draw a PNG figure of a run's best.pt: a grid of prior samples (default), test images "
            "beside their reconstructions, interpolations between test images in latent space, or, "
            "for 2-D latents, the decoded latent manifold or a scatter of test-set latent means."
        ),
        epilog=(
            "--temperature T scales a Gaussian prior sample around the prior mean, z = m + T (z0 - m), "
            "i.e. N(m, T^2 S); for a Gaussian mixture (prior=mog) each sample is scaled around the mean "
            "of the component it was drawn from. Other priors (flows, the sphere) refuse T != 1. "
            "A conditional run (model.conditional=true) draws prior samples of the --label classes in "
            "turn; without --label every class in turn, one class per column (8 rows unless --n is "
            "given). Its reconstructions and scatter use each test image's own label, --interpolate "
            "joins two test images of one class, --manifold decodes the plane of one --label class."
        ),
    )
    _add_run_arguments(parser, seed=0)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--reconstruct",
        dest="mode",
        action="store_const",
        const="reconstruct",
        help="rows of test images over rows of their reconstructions",
    )
    mode.add_argument(
        "--interpolate",
        dest="mode",
        action="store_const",
        const="interpolate",
        help="rows of decodings between two test images' latent means (great circle on the sphere)",
    )
    mode.add_argument(
        "--manifold",
        dest="mode",
        action="store_const",
        const="manifold",
        help="2-D latents: decodings on a grid of prior quantiles over the latent plane",
    )
    mode.add_argument(
        "--scatter",
        dest="mode",
        action="store_const",
        const="scatter",
        help="2-D latents: test-set posterior means coloured by label",
    )
    parser.set_defaults(mode="samples")
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="samples (default 64), test images to reconstruct (32) or interpolation rows (8)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=(
            "points per interpolation (default 10), manifold grid side (20) or Langevin steps "
            "(500; an EBM's model.sample_steps)"
        ),
    )
    parser.add_argument("--temperature", type=float, default=None, help="prior temperature (default 1)")
    parser.add_argument(
        "--label",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="conditional runs: the class(es) 0..C-1 to draw (default: every class in turn)",
    )
    parser.add_argument(
        "--sampler",
        choices=("gibbs", "langevin"),
        default=None,
        help=(
            "samples by Langevin chains: on a Gaussian-visible RBM's free energy, on an EBM's energy, or "
            "with --from on a VAE's latent posterior of one test image (default: ancestral for VAEs, "
            "Gibbs for RBMs, Langevin for EBMs)"
        ),
    )
    parser.add_argument(
        "--from", dest="source", type=int, default=None, metavar="INDEX",
        help="--sampler langevin on a VAE: the test image whose posterior p(z|x) the chains sample",
    )  # fmt: skip
    parser.add_argument(
        "--step-size", type=float, default=None,
        help="Langevin step size (default 0.01; an EBM's model.sgld_step_size)",
    )  # fmt: skip
    parser.add_argument("--mala", action="store_true", help="Langevin with the Metropolis correction")
    parser.add_argument(
        "--init",
        choices=("noise", "buffer"),
        default=None,
        help="model=ebm: start the Langevin chains at uniform noise (default) or at its replay buffer",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="PNG file to write (default RUN_DIR/<mode>.png)"
    )
    return parser


def _report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaekit report",
        description=(
            "Compare every run under DIR (a multirun folder or outputs/). Runs whose overrides differ "
            "only in the seed form a group: mean +- standard error and n of each test metric, groups "
            "sorted by test IW-NLL; with --baseline, each group's paired difference (same seed) with a "
            "95% t-interval. Then every run's overrides, status and metrics. Writes DIR/report.csv "
            "(one row per run) and DIR/report_curves.png (each group's validation NELBO, +- one "
            "standard error). Failed and unfinished runs are named, never averaged in. For an Optuna "
            "sweep, its trials come first: parameters, status and the validation NELBO searched on."
        ),
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="a folder holding runs")
    parser.add_argument(
        "--baseline",
        metavar="KEY=VALUE",
        help="paired differences (same seed) of every group against the group with this override",
    )
    parser.add_argument(
        "--by", metavar="KEY", help="group by this override only (default: all but the seeds)"
    )
    parser.add_argument(
        "--seed-keys",
        nargs="+",
        default=[],
        metavar="KEY",
        help="overrides that count as seeds besides trainer.seed (runs differing only in them are one group)",
    )
    parser.add_argument(
        "--format",
        default="markdown",
        choices=("markdown", "csv", "json", "latex"),
        help="what is printed (default markdown: the groups, paired differences and every run)",
    )
    return parser


def _evaluate(args: argparse.Namespace) -> None:
    if args.ood is not None:
        from vaekit.commands.ood import evaluate_ood, format_ood_table

        found = evaluate_ood(
            args.run_dir, args.ood, args.k, args.split, args.batch_size, args.seed, args.device,
            not args.no_progress, trust=args.trust,
        )  # fmt: skip
        print(format_ood_table(found))
        print(f"\nwrote {found['path']} and {found['histogram']}")
        return
    from vaekit.commands.evaluate import evaluate_run, format_table

    result = evaluate_run(
        args.run_dir,
        args.k,
        args.split,
        args.batch_size,
        args.seed,
        args.device,
        not args.no_progress,
        nelbo_samples=args.nelbo_samples,
        trust=args.trust,
        ais_betas=args.ais_betas,
    )
    print(format_table(result))
    print(f"\nwrote {result['path']}")


def _sample(args: argparse.Namespace) -> None:
    from vaekit.commands.sample import sample_figure

    path = sample_figure(
        args.run_dir,
        args.mode,
        args.n,
        args.out,
        args.temperature,
        args.steps,
        args.seed,
        args.device,
        args.trust,
        labels=args.label,
        sampler=args.sampler,
        source=args.source,
        step_size=args.step_size,
        mala=args.mala,
        init=args.init,
    )
    print(f"wrote {path}")


def _report(args: argparse.Namespace) -> None:
    from vaekit.commands.report import report

    text, csv_path, png_path = report(args.dir, args.by, args.seed_keys, args.baseline, args.format)
    print(text)
    where = sys.stdout if args.format == "markdown" else sys.stderr  # keep `> table.tex` clean
    print(f"\nwrote {csv_path} and {png_path}", file=where)


TOOLS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], None]]] = {
    "evaluate": (_evaluate_parser, _evaluate),
    "sample": (_sample_parser, _sample),
    "report": (_report_parser, _report),
}


def run_tool(command: str, rest: list[str]) -> None:
    """Parse one argparse subcommand and run it; a VaekitError is one line on stderr, exit 1."""
    make_parser, handler = TOOLS[command]
    args = make_parser().parse_args(rest)  # exits 2 with usage on bad syntax; 0 on --help
    from vaekit.errors import VaekitError, describe_os_error

    try:
        handler(args)
    except VaekitError as error:
        print(f"vaekit: error: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:  # a read-only run directory, a full disk, a directory where a file goes
        print(f"vaekit: error: {describe_os_error(error)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("vaekit: interrupted.", file=sys.stderr)
        sys.exit(130)


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
    if command != "train":
        run_tool(command, rest)
        return
    from vaekit.commands import train  # deferred: imports torch and Hydra
    from vaekit.commands.plugins import check_plugins
    from vaekit.errors import VaekitError
    from vaekit.presets import check_presets
    from vaekit.training import distributed

    try:
        check_presets(rest, train.CONFIG_DIR)  # a misspelled +experiment= or +debug=: one sentence
        check_plugins(rest, train.CONFIG_DIR)  # an unknown launcher or sweeper, or one not installed
        rest = distributed.prepare_argv(rest)  # under torchrun: one run directory, written by rank 0
    except VaekitError as error:
        print(f"vaekit: error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.argv = [f"{sys.argv[0]} {command}", *rest]
    finished = False
    try:
        train.hydra_main()  # a sweep's failed jobs are summarised by vaekit.commands.callbacks
        finished = True
    finally:
        distributed.leave(finished)


if __name__ == "__main__":
    main()
