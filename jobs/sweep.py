"""Run a Ray Tune sweep over a training recipe: one Ray Train run per trial, ASHA early stopping.

    python jobs/sweep.py --config jobs/configs/sweep_pooling_tiny.yaml --num-cpus 4
    ray job submit --runtime-env infra/runtime_env.yaml -- python jobs/sweep.py --config jobs/configs/sweep_pooling.yaml

Every trial's run config is validated before anything starts. Ctrl-C stops the sweep with its state
saved (exit code 130, nothing published); rerunning the same command continues an interrupted or
killed sweep from its saved state (finished trials are not run again). Results: the MLflow
parent run's ``results/`` artifacts and ``<storage>/sweeps/<name>/results/``.
"""

from __future__ import annotations

import argparse
import sys

from dragonfly_platform.cli import add_overrides_argument, connect_ray
from dragonfly_platform.config import ConfigError
from dragonfly_platform.sweep_config import load_base, load_sweep_config, validate_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="a sweep recipe, e.g. jobs/configs/sweep_pooling.yaml"
    )
    add_overrides_argument(
        parser,
        "override a sweep key (num_samples=4) or a trial override (overrides.train.max_steps=8)",
    )
    parser.add_argument("--num-cpus", type=float, help="logical CPUs of a local Ray started here")
    parser.add_argument("--dry-run", action="store_true", help="validate every trial config and stop")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep_config(args.config, args.overrides)
        configs = validate_sweep(sweep, load_base(sweep))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{sweep.name}: {len(configs)} trial configs valid")
        return 0

    from dragonfly_platform.tune import SweepInterrupted, run_sweep

    connect_ray(args.num_cpus)
    try:
        rows, paths = run_sweep(sweep)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SweepInterrupted as err:
        print(str(err), file=sys.stderr)
        return 130  # the shell's code for an interrupt
    for row in rows:
        print({k: v for k, v in row.items() if v is not None})
    print(f"results: {paths['csv']}\nplot:    {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
