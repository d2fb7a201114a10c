"""End to end on the local stack: bring it up with its CLI, `ray job submit` a tiny training run, find
its checkpoints on the S3 server and its run on the MLflow server, stop the stack with its CLI, and
find nothing left running.

The job is submitted as the cluster guide says, with `--runtime-env infra/runtime_env.yaml` (the
checkout as working dir, plus its platform package). Data travels through S3 like on a cluster:
`data/` is git-ignored, so it is not uploaded; the demo set is written locally and copied to the
stack's bucket.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dragonfly_platform.services import Stack, processes_mentioning

REPO = Path(__file__).resolve().parents[2]
TRAIN_JOB = REPO / "jobs" / "train.py"
TINY_RECIPE = "jobs/configs/tiny_stage1.yaml"
RUN_NAME = "e2e-tiny"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not TRAIN_JOB.exists(), reason="jobs/train.py is not in the repo yet"),
]


def _job_failure(result: subprocess.CompletedProcess) -> str:
    """The job's error lines (its output is mostly progress bars) and the end of both streams."""
    lines = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", result.stdout).replace("\r", "\n").splitlines()
    errors = list(dict.fromkeys(line for line in lines if re.search(r"Error|Traceback|failed", line)))
    return "\n".join(errors[:40]) + "\n...\n" + "\n".join(lines[-20:]) + "\n" + result.stderr[-2000:]


def _ray_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


def _stack_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m dragonfly_platform.services ...`` (what ``make stack-up`` runs), in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "dragonfly_platform.services", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The stack brought up and down by its CLI; the services outlive the command that started them."""
    state_dir = tmp_path_factory.mktemp("stack")
    # 4 logical CPUs: 2 train workers at 0.5 CPU, the job driver and Ray Data tasks all fit.
    up = _stack_cli("up", "--dir", str(state_dir), "--num-cpus", "4", "--bucket", "dragonfly")
    assert up.returncode == 0, up.stdout + up.stderr
    stack = Stack.from_json((state_dir / "stack.json").read_text())
    try:
        assert f"export MLFLOW_TRACKING_URI={stack.mlflow.tracking_uri}" in up.stdout
        assert f"export RAY_ADDRESS={stack.ray.dashboard_url}" in up.stdout
        # MLflow's artifacts are on the stack's S3 server.
        assert stack.mlflow.artifacts_destination == "s3://mlflow/artifacts"
        # Up again is a no-op on a running stack.
        assert _stack_cli("up", "--dir", str(state_dir)).returncode == 0
        assert (
            Stack.from_json((state_dir / "stack.json").read_text()).ray.process.pid == stack.ray.process.pid
        )
        assert _stack_cli("status", "--dir", str(state_dir)).returncode == 0
        # Token auth is on: the head's token lists jobs, another token is turned away.
        wrong_token = state_dir / "wrong_token"
        wrong_token.write_text("0" * 64)
        for token, allowed in ((stack.ray.auth_token_path, True), (str(wrong_token), False)):
            listed = subprocess.run(
                [_ray_bin(), "job", "list"],
                env={**os.environ, **stack.ray.env(), "RAY_AUTH_TOKEN_PATH": token},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert (listed.returncode == 0) == allowed, listed.stdout + listed.stderr
        yield stack
    finally:
        down = _stack_cli("down", "--dir", str(state_dir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (state_dir / "stack.json").exists()
    for service in stack.services():
        assert service.process.leftovers() == []
    assert processes_mentioning(stack.ray.temp_dir) == []
    assert _stack_cli("status", "--dir", str(state_dir)).returncode == 1


def test_submitted_training_job_checkpoints_to_s3_and_logs_to_mlflow(stack, tmp_path):
    import s3fs
    from mlflow import MlflowClient

    from dragonfly_platform.demo_data import PLANTED_BAD_REASONS, write_demo_dataset

    write_demo_dataset(tmp_path / "demo", 16, 4, 0, with_bad_records=True)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **stack.s3.storage_options())
    fs.put(str(tmp_path / "demo"), f"{stack.bucket}/demo", recursive=True)
    assert fs.exists(f"{stack.bucket}/demo/train.jsonl")

    # TODO(lead): keep these override keys in step with dragonfly_platform.config.RunConfig.
    overrides = {
        "run.name": RUN_NAME,
        "run.storage_path": f"s3://{stack.bucket}/runs",
        "data.train_manifest": f"s3://{stack.bucket}/demo/train.jsonl",
        "data.val_manifest": f"s3://{stack.bucket}/demo/val.jsonl",
        "train.max_steps": "2",
        "train.checkpoint_every": "1",
        "train.eval_batches": "1",
        "data.max_bad_fraction": "0.6",  # 6 planted bad records in 22, 5 of them in rank 0's 11
    }
    command = [_ray_bin(), "job", "submit", "--runtime-env", "infra/runtime_env.yaml", "--"]
    command += ["python", "jobs/train.py"]
    command += ["--config", TINY_RECIPE]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    # The client needs only the head's address and token; S3 and MLflow settings reach the job from
    # the head's environment, as they would from a cluster's.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MLFLOW_"))}
    result = subprocess.run(
        command, cwd=REPO, env={**env, **stack.ray.env()}, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, _job_failure(result)
    assert "succeeded" in result.stdout
    # The training workers ran on the head's loopback node.
    assert re.search(r"\(ip=127\.0\.0\.1, pid=\d+\) world_rank=1", result.stdout), _job_failure(result)

    run_dir = f"{stack.bucket}/runs/{RUN_NAME}"
    stored = fs.find(run_dir)
    checkpoints = {match.group(0) for path in stored if (match := re.search(r"checkpoint_[^/]+", path))}
    assert checkpoints, f"no checkpoint under s3://{run_dir}: {stored[:20]}"

    client = MlflowClient(stack.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("dragonfly-tiny")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert {"loss", "val_loss"} <= set(runs[0].data.metrics)

    # The workers' bad-records files are published next to the checkpoints, list planted records
    # only, add up to the run's bad_records metric, and are in the MLflow run too.
    published = sorted(path for path in stored if "/bad_records/" in path)
    assert [path.rsplit("/", 1)[-1] for path in published] == [
        "bad_records-train-rank0.jsonl",
        "bad_records-train-rank1.jsonl",
    ], stored
    entries = [json.loads(line) for path in published for line in fs.cat(path).decode().splitlines()]
    assert entries and all(PLANTED_BAD_REASONS[e["id"]] == e["reason"] for e in entries), entries
    assert len({(e["id"], e["epoch"]) for e in entries}) == len(entries)  # once per epoch
    assert runs[0].data.metrics["bad_records"] == len(entries)
    logged = [a.path for a in client.list_artifacts(runs[0].info.run_id, "bad_records")]
    assert logged == [f"bad_records/{path.rsplit('/', 1)[-1]}" for path in published]
