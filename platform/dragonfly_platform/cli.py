"""What the job entrypoints in ``jobs/`` share: ``--set`` overrides and how a job finds its Ray."""

from __future__ import annotations

import argparse
import os

from dragonfly_platform.services import LOOPBACK_ONLY_ENV


def add_overrides_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE``, repeatable, collected in ``args.overrides``."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def start_local_ray(num_cpus: float | None = None) -> None:
    """A single-node Ray on 127.0.0.1 owned by this process.

    The dashboard runs, on loopback: Ray Train's placement-group cleaner asks the state API (served
    by the dashboard) whether the controller lives, and warns every few seconds without it.
    """
    os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")  # effective if `ray` is not imported yet
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")


def connect_ray(num_cpus: float | None = None) -> None:
    """Join the cluster this job was submitted to, or start a local single-node Ray.

    ``ray job submit`` (and a user) points a driver at its cluster with ``RAY_ADDRESS``; without it a
    local Ray starts on 127.0.0.1 with ``num_cpus`` logical CPUs. Never ``address="auto"``: that
    would join whatever cluster happens to run on the machine (a test's, a stale one).
    """
    os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")  # before `ray` is first imported
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        start_local_ray(num_cpus)
