"""Faults: a training worker SIGKILLed mid-run and then the whole job killed and rerun; the run must end
where an uninterrupted run ends, with one MLflow run. (The S3 server dying while checkpoints upload is
the ZeRO-3 run of test_train.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
from safetensors.torch import load_file

from dragonfly_platform.config import parse_run_config
from dragonfly_platform.services import wait_until

ROOT = Path(__file__).resolve().parents[2]
# The conftest's tiny run: 2 workers x global batch 8, 2 epochs of 32 rows = 8 steps, 64 samples.
STEPS, SAMPLES = 8, 64
EXPERIMENT = "test-resume"


def mlflow_runs(cfg):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking_uri())
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    return client, client.search_runs(
        [experiment.experiment_id], f"tags.`dragonfly.run_name` = '{cfg.run.name}'"
    )


def final_weights(cfg) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(cfg.export_dir(), "model.safetensors"))


@pytest.fixture(scope="module")
def baseline(zero2_run):
    """The uninterrupted run every fault case must match: the conftest's ZeRO-2 run, which differs
    from the runs here only in checkpoint cadence."""
    cfg, result = zero2_run
    assert result.metrics["step"] == STEPS and result.metrics["samples"] == SAMPLES
    return cfg, final_weights(cfg)


def assert_same_weights(cfg, baseline):
    expected = baseline[1]
    got = final_weights(cfg)
    for key in expected:
        torch.testing.assert_close(
            got[key], expected[key], rtol=1e-5, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}"
        )


def test_killed_worker_then_killed_job_each_resume_and_end_like_an_uninterrupted_run(
    baseline, tiny_run_config, tmp_path, ray_cluster
):
    """One job meets both faults: a SIGKILLed training worker (Ray Train restarts the worker group
    from the last checkpoint, within the run), then the whole job killed (the rerun resumes instead
    of restarting)."""
    import ray

    raw = tiny_run_config(str(tmp_path / "runs"), "killed", EXPERIMENT, checkpoint_every=2)
    raw["run"]["max_failures"] = 2
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cfg = parse_run_config(raw)
    run_dir = Path(cfg.run_dir())
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(config_path)]
    # Ray's run snapshot names the checkpoints it registered: a checkpoint folder that is still
    # uploading is rightly not resumed from.
    snapshot = run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    def registered(step: int) -> bool:
        return snapshot.is_file() and f"checkpoint_step_{step:07d}" in snapshot.read_text()

    idle_cpus = ray.available_resources().get("CPU", 0)
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Fault 1: a worker dies after the first checkpoint.
        assert wait_until(lambda: registered(2) or first.poll() is not None, timeout=600)
        assert first.poll() is None, "the job ended before its worker could be killed"
        victim = int((run_dir / "workers" / "rank1.pid").read_text())
        os.kill(victim, signal.SIGKILL)
        # Fault 2: once the restarted worker group has checkpointed again, the whole job dies.
        assert wait_until(lambda: registered(4) or first.poll() is not None, timeout=900)
        assert first.poll() is None, "the job ended before it could be killed"
        # A new worker group did the work since: rank 1 is another process now.
        assert int((run_dir / "workers" / "rank1.pid").read_text()) != victim
    finally:
        first.kill()
        first.wait()
    # The job's actors die with their driver; the rerun starts once Ray has their CPUs back.
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) >= idle_cpus, timeout=60)

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    output = second.stdout + second.stderr
    run_lines = [line for line in output.splitlines() if "[killed]" in line]
    resumed = [line for line in run_lines if "resumed from step" in line]
    assert resumed, "\n".join(run_lines[-40:]) or output[-4000:]
    assert "resumed from step 0" not in resumed[0]
    client, runs = mlflow_runs(cfg)
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert max(m.value for m in client.get_metric_history(run_id, "samples")) == SAMPLES
    steps = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert steps == set(range(1, STEPS + 1))  # the curve continues to the end, no gap
    assert_same_weights(cfg, baseline)
