"""Session-scoped real services for integration tests: a local Ray instance, an S3 server, MLflow.

Each is started once, on first use, on 127.0.0.1 with free ports, and stopped at the end of the
session whatever happened. Tests pass S3 settings explicitly (`s3_server.storage_options()`,
`.pyarrow_filesystem()`); `s3_env` is for code that only reads the standard AWS variables.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from dragonfly_platform.services import (
    LOOPBACK_ONLY_ENV,
    processes_mentioning,
    start_mlflow,
    start_s3,
    wait_until,
)

# Keep the Ray instance on loopback; it has to be in the environment before `ray` is imported.
os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
# Ray Train starts a spot-preemption watcher actor with every worker group (one more process on two
# cores, ~20 times a session); a loopback node is never preempted. Controllers read the driver's
# value, job drivers started from here inherit it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

TEST_BUCKET = "test-bucket"
TINY_RECIPE = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny_stage1.yaml"
RAY_NUM_CPUS = 4  # logical, on 2 cores: Ray Data map tasks and train workers both need a CPU slot
RAY_OBJECT_STORE_BYTES = 1536 * 1024**2
RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


def _short_temp_dir(prefix: str) -> str:
    # Ray puts Unix sockets under its temp dir; pytest's tmp paths overflow the 107-byte limit.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A fresh local Ray instance owned by this session (never one found on the machine).

    `address="local"` ignores RAY_ADDRESS and a stale /tmp/ray/ray_current_cluster; the temp dir and
    the auth token are this session's own, so concurrent sessions cannot disturb each other.
    Workers see DS_ACCELERATOR=cpu, and the S3 server's credentials in the environment they inherit
    from the raylet, as cluster nodes get them from a Kubernetes Secret (the runtime env, which Ray
    logs, never carries credentials).
    """
    import ray

    temp_dir = _short_temp_dir("dfrt-")
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(os.urandom(32).hex())
    # Ray 2.60 turns token auth on for new local clusters and would share ~/.ray/auth_token with every
    # other session on the machine; this one gets its own token.
    saved = _set_ray_auth({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)})
    try:
        with pytest.MonkeyPatch.context() as env:  # read by the raylet that ray.init spawns
            for key, value in s3_server.env().items():
                env.setenv(key, value)
            context = ray.init(
                address="local",
                num_cpus=RAY_NUM_CPUS,
                include_dashboard=False,
                object_store_memory=RAY_OBJECT_STORE_BYTES,
                _temp_dir=temp_dir,
                runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
            )
        yield context
    finally:
        ray.shutdown()
        _set_ray_auth(saved)
        # Some Ray daemons outlive shutdown() by a few seconds and keep writing logs there.
        wait_until(lambda: not processes_mentioning(temp_dir), timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _set_ray_auth(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (None: unset) the RAY_AUTH_* variables; returns the previous values.

    Ray caches its config and token at import: refresh both, as Ray's own auth test helpers do.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    previous = {key: os.environ.get(key) for key in RAY_AUTH_VARS}
    for key in RAY_AUTH_VARS:
        value = values.get(key)
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    return previous


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS, moto as fallback) with an empty bucket `test-bucket`."""
    server = start_s3(tmp_path_factory.mktemp("s3"))
    try:
        server.create_bucket(TEST_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS_* variables (and AWS_ENDPOINT_URL) pointing at `s3_server`, for this test only."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """An MLflow tracking server (SQLite backend) whose artifacts live on `s3_server`."""
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"), s3=s3_server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def train_demo(tmp_path_factory) -> dict:
    """The demo set the training and fault tests train on: 32 train and 8 validation samples."""
    from dragonfly_platform.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("train-demo"), n_train=32, n_val=8, seed=0)


@pytest.fixture(scope="session")
def tiny_run_config(train_demo, mlflow_server):
    """``make(storage_path, name, experiment, **train)``: tiny_stage1.yaml as the training and fault
    tests run it, a from-scratch full fine-tune (ZeRO-3 needs a trained tower) on ``train_demo``.

    2 workers x micro-batch 2 x accumulation 2 = global batch 8: 16 rows per rank make 4 steps per
    epoch; 2 epochs = 8 steps, 64 samples. Returns the raw dict (write it to YAML for a job, or
    ``parse_run_config`` it); ``train`` overrides the train section.
    """

    def make(storage_path: str, name: str, experiment: str, **train) -> dict:
        raw = yaml.safe_load(TINY_RECIPE.read_text())
        raw["run"].update(name=name, storage_path=storage_path, max_failures=0)
        raw["data"].update(
            train_manifest=train_demo["train_manifest"], val_manifest=train_demo["val_manifest"]
        )
        raw["mlflow"] = {"tracking_uri": mlflow_server.tracking_uri, "experiment": experiment}
        # One ViT call per micro-batch (2 images x 41 crops), which ZeRO-3 requires.
        raw["model"]["vision"] = {"chunk_size": 82}
        defaults = {"freeze": "stage2", "lr": 5e-3, "warmup_ratio": 0.1, "epochs": 2, "checkpoint_every": 4}
        raw["train"].update({**defaults, "eval_batches": 2, **train})
        return raw

    return make


@pytest.fixture(scope="session")
def zero2_run(ray_cluster, tiny_run_config, tmp_path_factory):
    """``(config, result)`` of one uninterrupted ZeRO-2 run on local storage: what the training tests
    check, and the run every fault case must end like (one run serves both: each costs ~1 min).
    Checkpoints every 3 steps: 3, 6 and the last step, 8, off that grid."""
    from dragonfly_platform.config import parse_run_config
    from dragonfly_platform.train import run_training

    storage = str(tmp_path_factory.mktemp("zero2-runs"))
    cfg = parse_run_config(tiny_run_config(storage, "zero2", "test-train", zero_stage=2, checkpoint_every=3))
    return cfg, run_training(cfg)
