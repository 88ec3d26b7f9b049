"""The command line: ``jaxsparse run CONFIG``, ``jaxsparse compare
RESULTS...`` and ``python -m jaxsparse [--experiment ...]``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jaxsparse.experiments.one_shot import (
    CRITERIA,
    DISTRIBUTIONS,
    Config,
    format_table,
    run,
)
from jaxsparse.experiments.regularized import format_regularized, run_regularized
from jaxsparse.experiments.schedule_comparison import (
    format_schedule_summary,
    run_schedules,
)
from jaxsparse.experiments.second_order import format_second_order, run_second_order
from jaxsparse.experiments.structured import format_structured, run_structured


def _parser() -> argparse.ArgumentParser:
    defaults = Config()
    p = argparse.ArgumentParser(
        prog="python -m jaxsparse",
        description="Prune an MLP on the embedded digits dataset and compare. "
        "Subcommands: 'run CONFIG' runs a config (python -m jaxsparse run --help), "
        "'compare RESULTS...' tabulates and plots results.",
    )
    p.add_argument(
        "--experiment",
        choices=("one-shot", "schedules", "second-order", "regularized", "structured"),
        default="one-shot",
        help="one-shot: prune a trained model to several sparsities and "
        "fine-tune; schedules: compare dense, one-shot, gradual, IHT, RigL "
        "and SET at one sparsity with the same number of steps; "
        "second-order: one-shot pruning without fine-tuning by magnitude, "
        "Fisher diagonal, OBD, OBS and WoodFisher (MLP 64-64-10, 150 epochs; "
        "--seeds and --sparsities apply); regularized: penalties, proximal "
        "steps, L0 gates, learned thresholds, Sparse VD and SBP (--seeds "
        "applies); structured: remove 50 and 75 %% of the units of a digits MLP "
        "and CNN by ten unit criteria, fine-tune, shrink (--seeds applies)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the schedules, second-order and regularized experiments "
        "(default 0-4) and of the structured one (default 0-2)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.9,
        help="target of the schedules experiment",
    )
    p.add_argument("--hidden", type=int, nargs="+", default=list(defaults.hidden))
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--finetune-epochs", type=int, default=defaults.finetune_epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument(
        "--sparsities", type=float, nargs="+", default=list(defaults.sparsities)
    )
    p.add_argument(
        "--criteria",
        nargs="+",
        choices=sorted(CRITERIA),
        default=list(defaults.criteria),
    )
    p.add_argument(
        "--distribution", choices=sorted(DISTRIBUTIONS), default=defaults.distribution
    )
    return p


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxsparse run",
        description="Run a config: a TOML file, or the name of a config shipped "
        "with jaxsparse (see --list).",
    )
    p.add_argument("config", nargs="?", help="a .toml file or a shipped config name")
    p.add_argument("--out", type=Path, default=Path("results"), help="results dir")
    p.add_argument(
        "--checkpoints",
        type=Path,
        default=None,
        help="checkpoint root (default OUT/NAME-checkpoints when the config sets "
        "checkpoint_every); a run resumes from its latest checkpoint",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the shipped configs")
    return p


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxsparse compare",
        description="Tabulate and plot results files of jaxsparse run.",
    )
    p.add_argument("results", nargs="+", type=Path, help="results .json files")
    p.add_argument(
        "--plots", type=Path, default=None, help="PNG dir (default: the first's dir)"
    )
    return p


def _run(argv: Sequence[str]) -> None:
    from jaxsparse.experiments.compare import compare_table, load_results
    from jaxsparse.experiments.config import load_config, shipped_configs
    from jaxsparse.experiments.runner import run

    parser = _run_parser()
    args = parser.parse_args(argv)
    if args.list or args.config is None:
        for name, path in sorted(shipped_configs().items()):
            print(f"{name:<22} {path}")
        if args.config is None and not args.list:
            parser.error("give a config file or a shipped config name")
        return
    try:
        config = load_config(args.config)
    except ValueError as err:
        parser.exit(2, f"jaxsparse run: {err}\n")
    start = time.perf_counter()
    run(config, args.out, checkpoints=args.checkpoints, progress=not args.quiet)
    path = args.out / f"{config.name}.json"
    print(compare_table(load_results([path])))
    print(f"results: {path} and .csv ({time.perf_counter() - start:.1f} s)")


def _compare(argv: Sequence[str]) -> None:
    from jaxsparse.experiments.compare import compare_table, load_results, plot_results

    parser = _compare_parser()
    args = parser.parse_args(argv)
    try:
        docs = load_results(args.results)
    except ValueError as err:
        parser.exit(2, f"jaxsparse compare: {err}\n")
    print(compare_table(docs))
    plots = args.plots or args.results[0].parent
    for path in plot_results(docs, plots):
        print(f"plot: {path}")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        return _run(argv[1:])
    if argv and argv[0] == "compare":
        return _compare(argv[1:])
    args = _parser().parse_args(argv)
    config = Config(
        seed=args.seed,
        hidden=tuple(args.hidden),
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        sparsities=tuple(args.sparsities),
        criteria=tuple(args.criteria),
        distribution=args.distribution,
    )
    start = time.perf_counter()
    if args.experiment != "structured":
        args.seeds = args.seeds or [0, 1, 2, 3, 4]
    model = f"digits MLP {'-'.join(map(str, (64, *config.hidden, 10)))}"
    if args.experiment == "structured":
        seeds = args.seeds or [0, 1, 2]
        rows = run_structured(seeds)
        print(
            "digits MLP 64-128-64-10 and CNN (16, 32 channels), 60 epochs, then "
            "units removed per hidden layer and 10 epochs of fine-tuning; test "
            f"accuracy (%), mean of seeds {seeds}"
        )
        print(format_structured(rows))
    elif args.experiment == "regularized":
        rows = run_regularized(args.seeds)
        print(f"digits MLP 64-256-128-10, 120 epochs per method, seeds {args.seeds}")
        print(format_regularized(rows))
    elif args.experiment == "second-order":
        rows = run_second_order(args.seeds, args.sparsities)
        print(
            "digits MLP 64-64-10 trained 150 epochs, one-shot pruning without "
            f"fine-tuning, test accuracy (mean of seeds {args.seeds})"
        )
        print(format_second_order(rows))
    elif args.experiment == "schedules":
        rows = run_schedules(config, args.seeds, args.sparsity)
        print(
            f"{model}, {args.sparsity:.0%} target, "
            f"{config.epochs + config.finetune_epochs} epochs each, seeds {args.seeds}"
        )
        print(format_schedule_summary(rows))
    else:
        rows = run(config)
        print(f"{model}, {config.distribution} distribution, seed {config.seed}")
        print(format_table(rows))
    print(f"({time.perf_counter() - start:.1f} s)")
