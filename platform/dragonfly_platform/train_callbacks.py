"""Ray Train callbacks of every training run. They run on Ray Train's controller, not in the workers.

- ``StopOnPermanentError``: Ray Train retries every worker error up to ``run.max_failures`` (the
  production recipes allow 3), and its failure policy has no public hook to tell a crash from an
  error that a restart cannot fix. A dataset over its bad-record budget or a config that the workers
  reject would reload the model and fail again on every retry. The callback re-raises such an error
  on the controller, which Ray Train treats as a controller failure, never retried; ``train.fit``
  hands the original error back to the caller.
- ``CheckpointTags``: the MLflow tags that point at the run's checkpoints. The controller hears of a
  checkpoint once every rank has uploaded its part (also with asynchronous uploads), so a tag never
  names a checkpoint that is still being written; tags of checkpoint folders that are gone (Ray
  keeps ``train.keep_checkpoints``) are removed.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

from ray.train import UserCallback

from dragonfly.config import ConfigError
from dragonfly_platform.data import TooManyBadRecords
from dragonfly_platform.storage import StorageConfig, strip_scheme

log = logging.getLogger("dragonfly.train")

# Errors that say the same thing on every attempt: the run's data or config, not a machine.
PERMANENT_ERRORS = (ConfigError, TooManyBadRecords)
LATEST_CHECKPOINT_TAG = "checkpoint.latest"
CHECKPOINT_FOLDER_PREFIX = "checkpoint_step_"
CHECKPOINT_TAG_PREFIX = f"checkpoint.{CHECKPOINT_FOLDER_PREFIX}"


def checkpoint_folder_name(step: int) -> str:
    """``checkpoint_step_NNNNNNN``: zero-padded, so folder names sort by step."""
    return f"{CHECKPOINT_FOLDER_PREFIX}{step:07d}"


class StopOnPermanentError(UserCallback):
    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            if isinstance(worker_exceptions[rank], PERMANENT_ERRORS):
                log.error("rank %d: %s (not retried)", rank, worker_exceptions[rank])
                raise worker_exceptions[rank]


class CheckpointTags(UserCallback):
    """``checkpoint.latest`` and ``checkpoint.<folder name>`` tags on the run's MLflow run, for the
    checkpoint folders that exist, i.e. hold files (Ray deletes evicted ones before this callback
    hears of the new one)."""

    def __init__(self, tracking_uri: str, run_id: str, run_dir: str, storage: StorageConfig):
        self.tracking_uri, self.run_id, self.run_dir, self.storage = tracking_uri, run_id, run_dir, storage

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None:
            return
        try:
            self._tag(checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
        except Exception as err:  # a tag is a pointer for people: never fail training over it
            log.warning("could not tag checkpoint %s on MLflow run %s: %s", checkpoint.path, self.run_id, err)

    def _tag(self, name: str) -> None:
        from mlflow.entities import RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        uri = f"{self.run_dir}/{name}"
        client.log_batch(
            self.run_id, tags=[RunTag(LATEST_CHECKPOINT_TAG, uri), RunTag(f"checkpoint.{name}", uri)]
        )
        # Folders that hold files: some S3 stores (SeaweedFS) keep listing a deleted folder as an
        # empty prefix.
        fs, root = self.storage.filesystem(self.run_dir), strip_scheme(self.run_dir).rstrip("/")
        fs.invalidate_cache(root)
        present = {posixpath.relpath(path, root).split("/", 1)[0] for path in fs.find(root)}
        for tag in client.get_run(self.run_id).data.tags:
            if tag.startswith(CHECKPOINT_TAG_PREFIX) and tag.removeprefix("checkpoint.") not in present:
                client.delete_tag(self.run_id, tag)
