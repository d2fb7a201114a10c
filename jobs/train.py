"""Train Dragonfly with Ray Train + DeepSpeed from a recipe.

    python jobs/train.py --config jobs/configs/tiny_stage1.yaml [--set train.max_steps=4 ...]
    ray job submit --runtime-env infra/runtime_env.yaml -- python jobs/train.py --config jobs/configs/stage1.yaml

The config is validated before anything starts (exit status 2 for a bad config; 1 when bad records
pass ``data.max_bad_fraction``). Rerunning with the same run name and storage path
resumes from the run's latest checkpoint. Connects to a running Ray cluster when there is one
(``RAY_ADDRESS``, set inside ``ray job submit``), else starts a local one.
"""

from __future__ import annotations

import argparse
import sys

from dragonfly_platform.cli import add_overrides_argument, connect_ray
from dragonfly_platform.config import ConfigError, load_run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a recipe, e.g. jobs/configs/tiny_stage1.yaml")
    add_overrides_argument(
        parser, "override a config value (YAML scalar), e.g. --set train.lr=1e-4; repeatable"
    )
    parser.add_argument("--num-cpus", type=float, help="logical CPUs of a local Ray started here")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        cfg.tracking_uri()  # an S3 run needs an MLflow server: say so before Ray starts
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    connect_ray(args.num_cpus)
    from dragonfly_platform.data import TooManyBadRecords
    from dragonfly_platform.train import run_training

    try:
        result = run_training(cfg)
    except (ConfigError, TooManyBadRecords) as err:  # raised by a worker; not retried (docs/training.md)
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    print(f"run folder: {cfg.run_dir()}")
    print(f"export:     {cfg.export_dir()}")
    print(
        f"final:      { {k: v for k, v in (result.metrics or {}).items() if k in ('step', 'samples', 'val_loss')} }"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
