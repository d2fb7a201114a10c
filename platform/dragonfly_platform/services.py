"""Local S3, MLflow and Ray head processes for tests and the local stack, all on 127.0.0.1.

Every service is a real process started in its own session (so one signal reaches the whole process
tree and a terminal hang-up does not), health-checked before its handle is returned, and stopped by
pid, never by name: several stacks and test sessions can share one machine. Ports default to free
ones. Handles are plain dataclasses, so the CLI can write them to a state file in ``up`` and stop
them from that file in ``down``.

    python -m dragonfly_platform.services up [--dir .stack]    # S3 + MLflow (artifacts on S3) + Ray head
    python -m dragonfly_platform.services status|down [--dir .stack]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
DEFAULT_ACCESS_KEY = "dragonfly"
DEFAULT_SECRET_KEY = "dragonfly-local-secret"
DEFAULT_REGION = "us-east-1"
STATE_FILE = "stack.json"
# With this at "0" Ray keeps a single-node cluster on 127.0.0.1 instead of the machine's address;
# it must be in the environment before `ray` is imported.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# What `ray start` prints when its node is complete, and when the raylet missed its start window.
RAY_STARTED = "Ray runtime started."
RAY_START_TIMEOUT = "timed out during startup"
RAY_START_ATTEMPTS = 5

# Popen objects of the processes this interpreter started, so stop() can reap them (a zombie child
# still answers os.kill(pid, 0)). Handles loaded from a state file have no entry and poll /proc.
_CHILDREN: dict[int, subprocess.Popen] = {}


class ServiceError(RuntimeError):
    """A local service failed to start or to stop; the message carries the tail of its log."""


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on loopback (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ensure_port_free(port: int, what: str) -> None:
    """Fail early on a taken port: otherwise the health check would find the other server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            raise ServiceError(f"{what}: port {port} on {LOOPBACK} is already in use") from exc


def _bin(name: str) -> str:
    """An executable from this interpreter's environment first (the venv need not be on PATH)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"executable {name!r} not found next to {sys.executable} or on PATH")
    return found


def _process_state(pid: int) -> str | None:
    """The one-letter state from /proc (None when the pid is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _process_group(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[2])


def pid_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    return _process_state(pid) not in (None, "Z", "X")


def processes_in_group(pgid: int) -> list[int]:
    """Live pids whose process group is `pgid`: what is left of a service after it was stopped."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _process_group(int(entry.name)) == pgid and pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def processes_mentioning(text: str) -> list[int]:
    """Live pids whose command line contains `text` (a data or temp dir unique to one service).

    Catches processes that left the service's process group, e.g. Ray workers.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if text in cmdline and pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _log_tail(path: str, lines: int = 30) -> str:
    return "\n".join(_read(path).splitlines()[-lines:]) or "(empty log)"


@dataclass
class ServiceProcess:
    """One started command: enough to stop, kill or start it again from another process."""

    name: str
    command: list[str]
    log_path: str
    extra_env: dict[str, str] = field(default_factory=dict)
    # Processes that leave the process group are found through this unique text in their command line.
    marker: str = ""
    pid: int = 0

    def launch(self) -> None:
        env = {**os.environ, **self.extra_env}
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # pgid == pid: one killpg reaches the whole tree
            )
        _CHILDREN[proc.pid] = proc
        self.pid = proc.pid

    def alive(self) -> bool:
        return self.pid > 0 and pid_alive(self.pid)

    def leftovers(self) -> list[int]:
        pids = set(processes_in_group(self.pid)) if self.pid else set()
        if self.marker:
            pids.update(processes_mentioning(self.marker))
        return sorted(pids)

    def _signal(self, sig: int, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to the leader, then to what is left of the tree, then SIGKILL; verified.

        The leader goes first and alone: `ray start --block` shuts its node down in order in ~5 s,
        while a SIGTERM to the whole group at once leaves raylet and GCS waiting on each other.
        """
        if not self.pid:
            return
        self._signal(signal.SIGTERM, [self.pid])
        if not wait_until(lambda: not self.alive(), grace):
            self._signal(signal.SIGKILL, [self.pid])
        self._reap()
        if not wait_until(lambda: not self.leftovers(), 5.0):
            self._signal(signal.SIGTERM, self.leftovers())
            if not wait_until(lambda: not self.leftovers(), 5.0):
                self._signal(signal.SIGKILL, self.leftovers())
        if not wait_until(lambda: not self.leftovers(), 5.0):
            raise ServiceError(f"{self.name}: processes {self.leftovers()} still running after SIGKILL")

    def kill(self) -> None:
        """Die like a crashed server: SIGKILL, no shutdown."""
        if self.pid:
            self._signal(signal.SIGKILL, self.leftovers())
            self._reap()

    def _reap(self) -> None:
        child = _CHILDREN.pop(self.pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        """Poll `check` until it passes; fail fast with the log when the process exits first."""

        def ready() -> bool:
            if not self.alive():
                raise ServiceError(f"{self.name} exited during start-up:\n{_log_tail(self.log_path)}")
            return check()

        if not wait_until(ready, timeout):
            self.kill()
            raise ServiceError(f"{self.name} not healthy after {timeout:.0f} s:\n{_log_tail(self.log_path)}")


# ---------------------------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    backend: str  # "seaweedfs" or "moto"
    data_dir: str
    process: ServiceProcess

    def client(self, retries: int = 3, timeout: float = 10.0):
        """A botocore S3 client for this server (botocore comes with s3fs)."""
        import botocore.config
        import botocore.session

        config = botocore.config.Config(
            retries={"max_attempts": retries, "mode": "standard"},
            connect_timeout=timeout,
            read_timeout=timeout,
            s3={"addressing_style": "path"},
        )
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=config,
        )

    def healthy(self) -> bool:
        try:
            self.client(retries=1, timeout=2.0).list_buckets()
        except Exception:
            return False
        return True

    def create_bucket(self, name: str) -> None:
        """Create `name`; a bucket that already exists is fine (idempotent)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass

    def storage_options(self) -> dict:
        """Keyword arguments for `s3fs.S3FileSystem` / fsspec `storage_options`.

        No region: s3fs with a region set failed to create buckets on moto.
        """
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }

    def pyarrow_filesystem(self):
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=self.endpoint_url,
            scheme="http",
            region=self.region,
        )

    def env(self) -> dict[str, str]:
        """The standard AWS variables (boto, s3fs, pyarrow, MLflow read them) for this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()

    def restart(self, timeout: float = 60.0) -> None:
        """Start the same command again (same ports, same data dir: objects survive). Returns once
        stored objects read back: SeaweedFS answers bucket listings before its volume server has
        loaded its data, and a read in between fails with InternalError."""
        self.process.stop()
        self.process.launch()
        self.process.wait_ready(lambda: self.healthy() and self._serves_stored_objects(), timeout)

    def _serves_stored_objects(self) -> bool:
        """One stored object (the first of the first non-empty bucket) reads back; True when none is stored."""
        client = self.client(retries=1, timeout=2.0)
        try:
            for bucket in client.list_buckets()["Buckets"]:
                listing = client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1)
                for stored in listing.get("Contents", []):
                    client.get_object(Bucket=bucket["Name"], Key=stored["Key"])["Body"].read()
                    return True
        except Exception:
            return False
        return True


def _seaweedfs_command(data_dir: Path, port: int) -> list[str]:
    # `weed mini` runs master, volume, filer, S3 and admin servers, each with an HTTP and a gRPC port
    # (default: fixed ports, gRPC = HTTP + 10000). Every port is pinned to a free one so that parallel
    # stacks never collide; the gateways we do not use are off, and telemetry too (no network here).
    names = ["master", "volume", "filer", "admin"]
    ports = free_ports(2 * len(names) + 1)
    s3_grpc, rest = ports[0], ports[1:]
    command = [
        _bin("weed"),
        "mini",
        f"-dir={data_dir}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        f"-s3.port={port}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    for i, name in enumerate(names):
        command += [f"-{name}.port={rest[2 * i]}", f"-{name}.port.grpc={rest[2 * i + 1]}"]
    return command


def start_s3(
    data_dir: str | Path,
    port: int | None = None,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    region: str = DEFAULT_REGION,
    backend: str = "auto",
    timeout: float = 60.0,
) -> S3Server:
    """An S3 server on loopback: SeaweedFS (a real object store), moto when weed cannot start.

    `backend` is "auto", "seaweedfs" or "moto". SeaweedFS takes its admin identity from the AWS_*
    variables of its environment; without them it has no keys and signed uploads fail.
    """
    if backend not in ("auto", "seaweedfs", "moto"):
        raise ValueError(f"unknown S3 backend {backend!r}: expected auto, seaweedfs or moto")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    candidates = ["seaweedfs", "moto"] if backend == "auto" else [backend]
    errors = []
    for name in candidates:
        chosen_port = port or free_ports(1)[0]
        ensure_port_free(chosen_port, f"s3 ({name})")
        store = data_dir / name
        store.mkdir(exist_ok=True)
        try:
            if name == "seaweedfs":
                command = _seaweedfs_command(store, chosen_port)
            else:
                command = [_bin("moto_server"), "-H", LOOPBACK, "-p", str(chosen_port)]
        except ServiceError as exc:
            errors.append(str(exc))
            continue
        server = S3Server(
            endpoint_url=f"http://{LOOPBACK}:{chosen_port}",
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            backend=name,
            data_dir=str(data_dir),
            process=ServiceProcess(
                name=f"s3 ({name})",
                command=command,
                log_path=str(data_dir / f"{name}.log"),
                extra_env={"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
                marker=str(store) if name == "seaweedfs" else "",
            ),
        )
        server.process.launch()
        try:
            server.process.wait_ready(server.healthy, timeout)
        except ServiceError as exc:
            errors.append(str(exc))
            continue
        return server
    raise ServiceError("no S3 server could start:\n" + "\n\n".join(errors))


# ------------------------------------------------------------------------------------------ MLflow


@dataclass
class MlflowServer:
    tracking_uri: str
    backend_store_uri: str
    artifacts_destination: str
    process: ServiceProcess

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri}

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()


def start_mlflow(
    backend_dir: str | Path,
    port: int | None = None,
    artifacts_destination: str | None = None,
    s3: S3Server | None = None,
    timeout: float = 240.0,
) -> MlflowServer:
    """An MLflow tracking server: SQLite backend in `backend_dir`, artifacts proxied by the server.

    Artifacts go to `artifacts_destination` if given, else to ``s3://mlflow/artifacts`` on `s3` (the
    bucket is created) if given, else to `backend_dir/artifacts`. Clients upload through the server
    (``mlflow-artifacts:``), so they need no S3 credentials.
    """
    backend_dir = Path(backend_dir).resolve()
    backend_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_ports(1)[0]
    ensure_port_free(port, "mlflow")
    env = {
        # Otherwise the server starts 7 job consumers (~2.4 GB) that nothing here uses.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    if s3 is not None:
        env.update(s3.env())
        if artifacts_destination is None:
            s3.create_bucket("mlflow")
            artifacts_destination = "s3://mlflow/artifacts"
    if artifacts_destination is None:
        artifacts_destination = (backend_dir / "artifacts").as_uri()
    backend_store_uri = f"sqlite:///{backend_dir / 'mlflow.db'}"
    command = [
        _bin("mlflow"),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    server = MlflowServer(
        tracking_uri=f"http://{LOOPBACK}:{port}",
        backend_store_uri=backend_store_uri,
        artifacts_destination=artifacts_destination,
        process=ServiceProcess(
            name="mlflow",
            command=command,
            log_path=str(backend_dir / "mlflow.log"),
            extra_env=env,
            marker=str(backend_dir / "mlflow.db"),
        ),
    )
    server.process.launch()
    server.process.wait_ready(server.healthy, timeout)
    return server


# -------------------------------------------------------------------------------------- Ray head


@dataclass
class RayHead:
    address: str  # GCS address, for ray.init(address=...)
    dashboard_url: str  # job API, for `ray job submit --address` / RAY_ADDRESS
    temp_dir: str
    auth_token_path: str
    process: ServiceProcess

    def _auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {Path(self.auth_token_path).read_text().strip()}"}

    def healthy(self) -> bool:
        """The node finished starting and the job API answers (~30 s after the GCS).

        The dashboard can answer while the raylet is still registering (or has failed to): only
        `ray start`'s own "Ray runtime started." says the node is complete.
        """
        if RAY_STARTED not in _read(self.process.log_path):
            return False
        request = urllib.request.Request(f"{self.dashboard_url}/api/jobs/", headers=self._auth_header())
        try:
            with urllib.request.urlopen(request, timeout=3) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def env(self) -> dict[str, str]:
        """What `ray job submit` / `ray.init` clients need: the address and the cluster's token.

        Ray 2.60 turns token auth on for new clusters; each head here has its own token file, so it
        neither needs nor touches ~/.ray/auth_token.
        """
        return {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.auth_token_path,
        }

    def stop(self) -> None:
        # Only our processes: `ray stop` would end every Ray instance of this user on the machine.
        self.process.stop(grace=20.0)

    def kill(self) -> None:
        self.process.kill()


def start_ray_head(
    num_cpus: int | None = None,
    port: int | None = None,
    dashboard_port: int | None = None,
    temp_dir: str | Path | None = None,
    object_store_memory: int | None = None,
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> RayHead:
    """A Ray head node with the job API on loopback, run by `ray start --head --block`.

    `--block` keeps `ray start` alive as the leader of a new session: SIGTERM to it shuts the node
    down, and its reaper kills the group if it dies. `temp_dir` must be short (Unix socket paths are
    limited to 107 bytes); it also holds this head's `ray_current_cluster`, so a stale
    /tmp/ray/ray_current_cluster is never read. `env` reaches every worker and job driver
    (e.g. the S3 server's AWS_* variables, DS_ACCELERATOR=cpu).
    """
    temp_dir = Path(temp_dir or tempfile.mkdtemp(prefix="dfray-", dir="/tmp")).resolve()
    temp_dir.mkdir(parents=True, exist_ok=True)
    token_path = temp_dir / "auth_token"
    if not token_path.exists():
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
    # Every port Ray would otherwise take from a fixed default (10001, 52365, 8265, ...) is pinned.
    (
        gcs,
        dashboard,
        client,
        node_manager,
        object_manager,
        metrics,
        agent_http,
        agent_grpc,
        runtime_env_agent,
    ) = free_ports(9)
    port, dashboard_port = port or gcs, dashboard_port or dashboard
    ensure_port_free(port, "ray head (GCS)")
    ensure_port_free(dashboard_port, "ray head (dashboard)")
    command = [
        _bin("ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--node-ip-address={LOOPBACK}",
        f"--port={port}",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--metrics-export-port={metrics}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}",
        f"--temp-dir={temp_dir}",
    ]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if object_store_memory is not None:
        command.append(f"--object-store-memory={object_store_memory}")
    if resources:
        command.append(f"--resources={json.dumps(resources)}")
    head = RayHead(
        address=f"{LOOPBACK}:{port}",
        dashboard_url=f"http://{LOOPBACK}:{dashboard_port}",
        temp_dir=str(temp_dir),
        auth_token_path=str(token_path),
        process=ServiceProcess(
            name="ray head",
            command=command,
            log_path=str(temp_dir / "ray-start.log"),
            extra_env={
                **(env or {}),
                # Job entrypoints run `python` from PATH: make it this environment's interpreter.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(token_path),
                # Ray's own actors that look for "their" cluster (e.g. Train's placement group
                # cleaner) otherwise refuse to choose when other Ray instances run on the machine.
                "RAY_ADDRESS": f"{LOOPBACK}:{port}",
                # Ray swaps a loopback --node-ip-address for the machine's address (and binds the
                # client server there) unless it believes multi-node clusters are off.
                LOOPBACK_ONLY_ENV: "0",
            },
            marker=str(temp_dir),
        ),
    )
    # The raylet gives its dashboard agent (a Python process importing most of Ray) a fixed ~15 s to
    # write its port files and aborts otherwise, and `ray start` gives the raylet a fixed 30 s; on a
    # busy 2-core machine those imports take longer, `ray start` reports "timed out during startup" and
    # hangs with its node half dead. Such a start is thrown away and retried (no setting widens them).
    log_path = head.process.log_path
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        head.process.launch()
        try:
            head.process.wait_ready(lambda: head.healthy() or _ray_start_failed(head), timeout)
        except ServiceError:  # `ray start` exited or never became healthy
            if not _ray_start_failed(head):
                head.process.stop()
                raise
        if head.healthy():
            return head
        head.process.stop()
        failed_log = f"{log_path}.failed-{attempt}"
        os.replace(log_path, failed_log)  # the next attempt starts a clean log
    raise ServiceError(
        f"ray head failed to start {RAY_START_ATTEMPTS} times (Ray's logs: {temp_dir}/session_*/logs):\n"
        f"{_log_tail(failed_log)}"
    )


def _ray_start_failed(head: RayHead) -> bool:
    return RAY_START_TIMEOUT in _read(head.process.log_path)


# ------------------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    s3: S3Server
    mlflow: MlflowServer
    ray: RayHead
    bucket: str

    def env(self) -> dict[str, str]:
        return {**self.s3.env(), **self.mlflow.env(), **self.ray.env()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Stack:
        raw = json.loads(text)

        def load(kind, data):
            return kind(**{**data, "process": ServiceProcess(**data["process"])})

        return cls(
            s3=load(S3Server, raw["s3"]),
            mlflow=load(MlflowServer, raw["mlflow"]),
            ray=load(RayHead, raw["ray"]),
            bucket=raw["bucket"],
        )

    def services(self) -> list:
        # Stop order: Ray first (its jobs write to S3 and MLflow), S3 last.
        return [self.ray, self.mlflow, self.s3]


def stack_up(
    state_dir: Path,
    s3_port: int | None = None,
    mlflow_port: int | None = None,
    ray_port: int | None = None,
    dashboard_port: int | None = None,
    num_cpus: int | None = None,
    bucket: str = "dragonfly",
) -> Stack:
    state_dir = state_dir.resolve()
    state_file = state_dir / STATE_FILE
    if state_file.exists():
        stack = Stack.from_json(state_file.read_text())
        if all(service.process.alive() for service in stack.services()):
            return stack  # idempotent: already up
        stack_down(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    started = []
    try:
        s3 = start_s3(state_dir / "s3", port=s3_port)
        started.append(s3)
        s3.create_bucket(bucket)
        mlflow = start_mlflow(state_dir / "mlflow", port=mlflow_port, s3=s3)
        started.append(mlflow)
        # The Ray temp dir stays short and outside the state dir (Unix socket path limit).
        ray_head = start_ray_head(
            num_cpus=num_cpus,
            port=ray_port,
            dashboard_port=dashboard_port,
            env={**s3.env(), **mlflow.env(), "DS_ACCELERATOR": "cpu"},
        )
        started.append(ray_head)
    except BaseException:
        for service in reversed(started):
            service.stop()
        raise
    stack = Stack(s3=s3, mlflow=mlflow, ray=ray_head, bucket=bucket)
    state_file.write_text(stack.to_json())
    state_file.chmod(0o600)  # it holds the local S3 keys
    return stack


def stack_down(state_dir: Path) -> list[int]:
    """Stop every service in the state file; returns leftover pids (empty when all is gone)."""
    state_file = state_dir.resolve() / STATE_FILE
    if not state_file.exists():
        return []
    stack = Stack.from_json(state_file.read_text())
    for service in stack.services():
        with contextlib.suppress(ServiceError):  # stop the others anyway; leftovers are reported below
            service.stop()
    left = [pid for service in stack.services() for pid in service.process.leftovers()]
    if not left:
        state_file.unlink()
        shutil.rmtree(stack.ray.temp_dir, ignore_errors=True)
    return left


def _print_stack(stack: Stack) -> None:
    print(f"S3 ({stack.s3.backend}):  {stack.s3.endpoint_url}   bucket s3://{stack.bucket}")
    print(f"MLflow:         {stack.mlflow.tracking_uri}")
    print(f"Ray dashboard:  {stack.ray.dashboard_url}   (GCS {stack.ray.address})")
    print("\n# export these to use the stack:")
    for key, value in stack.env().items():
        print(f"export {key}={shlex.quote(value)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragonfly_platform.services", description=__doc__)
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=Path(".stack"), help="state and data directory")
    parser.add_argument("--s3-port", type=int)
    parser.add_argument("--mlflow-port", type=int)
    parser.add_argument("--ray-port", type=int)
    parser.add_argument("--dashboard-port", type=int)
    parser.add_argument("--num-cpus", type=int, help="logical CPUs of the Ray head (default: detected)")
    parser.add_argument("--bucket", default="dragonfly")
    args = parser.parse_args(argv)

    if args.action == "up":
        stack = stack_up(
            args.dir,
            s3_port=args.s3_port,
            mlflow_port=args.mlflow_port,
            ray_port=args.ray_port,
            dashboard_port=args.dashboard_port,
            num_cpus=args.num_cpus,
            bucket=args.bucket,
        )
        _print_stack(stack)
        return 0
    if args.action == "down":
        left = stack_down(args.dir)
        if left:
            print(f"still running after stop: pids {left}", file=sys.stderr)
            return 1
        print("stack stopped; no processes left")
        return 0
    state_file = args.dir.resolve() / STATE_FILE
    if not state_file.exists():
        print("stack is down")
        return 1
    stack = Stack.from_json(state_file.read_text())
    healthy = {"s3": stack.s3.healthy(), "mlflow": stack.mlflow.healthy(), "ray": stack.ray.healthy()}
    for name, ok in healthy.items():
        print(f"{name:7s} {'up' if ok else 'DOWN'}")
    _print_stack(stack)
    return 0 if all(healthy.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
