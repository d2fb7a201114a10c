"""MLflow tracking of training runs: one MLflow run per training run name, whatever restarts happen.

The driver resolves the MLflow run before the workers start (``resolve_mlflow_run``): an existing
run tagged with the same run folder is reused, so a worker restart, a ``FailureConfig`` retry or
rerunning the whole job all log into one run. World rank 0 then opens that run by id
(``RankZeroTracker``) and logs params, per-step metrics and the export; the checkpoint tags come
from Ray Train's controller once a checkpoint is uploaded (``train_callbacks.CheckpointTags``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dragonfly_platform.config import RunConfig

log = logging.getLogger(__name__)

RUN_DIR_TAG = "dragonfly.run_dir"
RUN_NAME_TAG = "dragonfly.run_name"


def _artifact_root(cfg: RunConfig) -> str | None:
    """Where a new experiment keeps artifacts with the embedded store: beside the sqlite file (MLflow
    would otherwise default to ./mlruns of whatever directory the process started in)."""
    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
    return None


def find_mlflow_run(cfg: RunConfig):
    """This training run's MLflow run (an ``mlflow.entities.Run``, params included) if an earlier
    attempt created it, found by its run-folder tag; else None. Creates nothing."""
    from mlflow.tracking import MlflowClient

    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return None
    existing = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{cfg.run_dir()}'", max_results=1
    )
    return existing[0] if existing else None


def resolve_mlflow_run(cfg: RunConfig) -> str:
    """The id of this training run's MLflow run: found by its run-folder tag, or created."""
    from mlflow.tracking import MlflowClient

    existing = find_mlflow_run(cfg)
    if existing is not None:
        return existing.info.run_id
    client = MlflowClient(tracking_uri=cfg.tracking_uri())
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(cfg.mlflow.experiment, artifact_location=_artifact_root(cfg))
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(
        experiment_id,
        run_name=cfg.run.name,
        tags={RUN_DIR_TAG: cfg.run_dir(), RUN_NAME_TAG: cfg.run.name, "mlflow.source.name": "jobs/train.py"},
    )
    return run.info.run_id


def mark_failed(cfg: RunConfig, run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=cfg.tracking_uri()).set_terminated(run_id, status="FAILED")


class RankZeroTracker:
    """MLflow logging from world rank 0; on other ranks every method does nothing."""

    def __init__(self, cfg: RunConfig, run_id: str, rank: int):
        self.enabled = rank == 0
        self.run_id = run_id
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.tracking_uri())
        # Reopen (a restart finds the run FINISHED or FAILED from the previous attempt).
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, params: dict[str, str]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v[:6000])
        if changed:
            # MLflow params are immutable; a rerun with other settings keeps the first values.
            log.warning("MLflow run %s keeps its first values for changed params %s", self.run_id, changed)
        for start in range(0, len(fresh), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)


__all__ = ["RankZeroTracker", "find_mlflow_run", "resolve_mlflow_run", "mark_failed"]
