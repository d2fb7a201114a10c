"""Train Dragonfly with Ray Train + DeepSpeed from a recipe.

    python jobs/train.py --config jobs/configs/tiny_stage1.yaml [--set train.max_steps=4 ...]
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/stage1.yaml

The config is validated before anything starts. Rerunning with the same run name and storage path
resumes from the run's latest checkpoint. Connects to a running Ray cluster when there is one
(``RAY_ADDRESS``, set inside ``ray job submit``), else starts a local one.
"""

from __future__ import annotations

import argparse
import os
import sys

from dragonfly_platform.config import ConfigError, load_run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a recipe, e.g. jobs/configs/tiny_stage1.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (YAML scalar), e.g. --set train.lr=1e-4; repeatable",
    )
    parser.add_argument("--num-cpus", type=float, help="logical CPUs of a local Ray started here")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # A local single-node Ray stays on 127.0.0.1 (must be set before `ray` is imported).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from dragonfly_platform.train import run_training

    if not ray.is_initialized():
        # Under `ray job submit` (or with RAY_ADDRESS set) this joins that cluster; otherwise it
        # starts a local one. Never "auto": that would join whatever cluster happens to run here.
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    result = run_training(cfg)
    print(f"run folder: {cfg.run_dir()}")
    print(f"export:     {cfg.export_dir()}")
    print(
        f"final:      { {k: v for k, v in (result.metrics or {}).items() if k in ('step', 'samples', 'val_loss')} }"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
