"""Driver-side pieces of a training run that need no Ray: what happens to the MLflow run when
training fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dragonfly_platform.config import load_run_config
from dragonfly_platform.train import PreparedRun, fit

TINY_RECIPE = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny_stage1.yaml"


class DiesBeforeItsFirstReport:
    def fit(self):
        raise RuntimeError("worker died at step 1")


def test_a_failed_fit_marks_the_mlflow_run_failed(tmp_path, monkeypatch):
    """A trial or run whose workers die before any report cannot close its run itself; the driver
    does, or the run (and the sweep's child run) shows RUNNING forever."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_run_config(TINY_RECIPE, [f"run.storage_path={tmp_path}"])
    client = MlflowClient(cfg.tracking_uri())
    run = client.create_run(client.create_experiment("fit-fails"))
    with pytest.raises(RuntimeError, match="worker died"):
        fit(DiesBeforeItsFirstReport(), cfg, PreparedRun(cfg, run.info.run_id, str(tmp_path)))
    assert client.get_run(run.info.run_id).info.status == "FAILED"
