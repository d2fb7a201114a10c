"""Promote a trained run through the MLflow registry, behind an evaluation gate.

    python jobs/promote.py --run <run id> --registered-model Dragonfly --config jobs/configs/promote.yaml
    python jobs/promote.py --rollback --registered-model Dragonfly --config jobs/configs/promote.yaml

Registers the run's model as a version with alias ``challenger`` (the same version again on a rerun),
evaluates challenger and ``champion`` on the config's held-out set, and moves ``champion`` only if the
config's gate passes; the version is tagged with its scores and the decision. ``--rollback`` points
``champion`` back at the version it replaced. Exit status: 0 promoted (or already champion) /
rolled back, 3 refused by the gate, 4 another promotion is running or moved champion meanwhile
(nothing changed: rerun), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dragonfly_platform.cli import connect_ray
from dragonfly_platform.config import ConfigError, validate_config
from dragonfly_platform.registry import (
    PromotionConflict,
    PromotionError,
    load_promote_config,
    promote,
    rollback,
)

EXIT_REFUSED = 3
EXIT_CONFLICT = 4


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--run", help="MLflow run id of the trained model")
    action.add_argument("--rollback", action="store_true", help="restore the previous champion")
    parser.add_argument("--registered-model", help="registered model name (default: the config's)")
    parser.add_argument("--config", default="jobs/configs/promote.yaml", help="gate and evaluation set")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: config, $MLFLOW_TRACKING_URI)")
    parser.add_argument("--num-ray-cpus", type=float, help="logical CPUs of a local Ray started here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_promote_config(
            args.config, {"registered_model": args.registered_model, "tracking_uri": args.tracking_uri}
        )
        client = MlflowClient(cfg.resolved_tracking_uri())
        if args.rollback:
            before, after = rollback(client, cfg.registered_model, cfg.lock_stale_after_s, cfg.lock_settle_s)
            print(f"{cfg.registered_model}: champion rolled back from v{before} to v{after}")
            return 0
        result = promote(client, args.run, cfg, _evaluator(cfg, args.config, args.num_ray_cpus))
    except PromotionConflict as err:
        print(f"conflict: {err}", file=sys.stderr)
        return EXIT_CONFLICT
    except (PromotionError, ConfigError, MlflowException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.__dict__, indent=2, default=str))
    return 0 if result.promoted else EXIT_REFUSED


def _evaluator(cfg, config_path: str, num_ray_cpus: float | None):
    from dragonfly_platform.evaluate import EvalConfig, evaluator

    eval_cfg = validate_config(EvalConfig, cfg.eval, f"{config_path} (eval section)")  # before Ray starts
    connect_ray(num_ray_cpus)
    return evaluator(eval_cfg, cfg.resolved_tracking_uri())


if __name__ == "__main__":
    sys.exit(main())
