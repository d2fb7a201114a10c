"""Batch evaluation of a Dragonfly model on a LLaVA manifest with Ray Data.

    manifest records (read_manifest)
      -> rows: prompt = the conversation before its final answer, reference = that answer
      -> ray.data.from_items -> map_batches(Predictor): model replicas as actors (GPU or CPU, by
         config); each loads the model once, reads its batch's images and decodes greedily
      -> driver: per-sample and corpus scores (dragonfly.metrics.score_task)
      -> table (Parquet + CSV) and metrics to MLflow: on the evaluated model's run when the URI
         names one (``runs:/``, ``models:/``), else on a new evaluation run

A model URI is a local folder, an ``s3://`` prefix, ``runs:/<id>/<path>``, ``models:/<name>@<alias>``,
``models:/<name>/<version>`` or ``models:/<model_id>``. The folder is either a ``save_pretrained``
export (``config.json`` + ``model.safetensors`` + processor files) or an MLflow pyfunc model, whose
weights are its ``weights`` artifact (``artifacts/weights``). An alias is resolved to its version once,
on the driver, so every replica loads the same weights even if the alias moves meanwhile.

A sample that cannot be evaluated (missing or undecodable image, malformed conversation, no final
answer) gets an ``error`` and is left out of the scores; more than ``max_error_fraction`` of them
stops the evaluation, since scores over a different subset would not be comparable.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dragonfly.metrics import TASK_METRICS, score_task
from dragonfly.processor import ROLE_ALIASES, turn_fields
from dragonfly_platform.manifest import ManifestRecord, read_manifest
from dragonfly_platform.registry import WEIGHTS_ARTIFACT
from dragonfly_platform.storage import (
    RECORD_READ_ERRORS,
    StorageConfig,
    fetched_dir,
    is_s3,
    join,
    parent,
    read_error_reason,
    strip_scheme,
)
from dragonfly_platform.worker_env import settings_env

log = logging.getLogger("dragonfly.evaluate")

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:")
EXPORT_FILES = ("config.json", "model.safetensors")
TABLE_NAME = "predictions"
MAX_ERRORS_SHOWN = 5


class EvaluationError(RuntimeError):
    """The evaluation cannot give a meaningful score (too many samples failed)."""


class EvalConfig(BaseModel):
    """What to evaluate on and how the replicas run. GPU or CPU is ``num_gpus`` alone."""

    model_config = ConfigDict(extra="forbid")

    data: str  # LLaVA manifest (JSON / JSONL / Parquet; local or s3://)
    image_root: str | None = None  # None: the manifest's folder
    storage: StorageConfig = Field(default_factory=StorageConfig)
    task: str = "open"  # a dragonfly.metrics task: vqa, closed, open, chartqa, exact, caption
    name: str | None = None  # metric prefix eval/<name>/...; None: the manifest's file stem
    limit: int | None = None  # first N records only
    max_new_tokens: int = 32
    batch_size: int = 8  # samples per generate call
    replicas: int = 1  # model actors
    num_gpus: float = 0  # per replica; > 0 runs on CUDA
    num_cpus: float = 1  # per replica
    fetch_threads: int = 8  # concurrent image reads per batch
    max_error_fraction: float = 0.05
    download_dir: str | None = None  # where replicas download remote models; None: the temp dir
    experiment: str = "dragonfly-eval"  # for a new evaluation run

    @model_validator(mode="after")
    def _sensible(self):
        if self.task not in TASK_METRICS:
            raise ValueError(f"task must be one of {sorted(TASK_METRICS)}, got {self.task!r}")
        if self.batch_size < 1 or self.replicas < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size, replicas and max_new_tokens must be >= 1")
        return self

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def set_name(self) -> str:
        return self.name or Path(strip_scheme(self.data).rstrip("/")).name.split(".")[0]


# ---------------------------------------------------------------------------------------------
# Model URIs


@dataclass(frozen=True)
class ModelRef:
    uri: str  # as given
    pinned_uri: str  # what the replicas load: an alias resolved to its version
    run_id: str | None  # the MLflow run that produced it, when the URI says
    registered: tuple[str, str] | None = None  # (registered model, version)


def describe_model(
    uri: str, tracking_uri: str | None = None, storage: StorageConfig | None = None
) -> ModelRef:
    """Resolve registry aliases and find the producing run, without downloading anything. A local
    folder that holds no model, an ``s3://`` prefix with nothing under it (checked when ``storage``
    is given), or a registry name, alias or version that does not exist, is a ``FileNotFoundError``
    here, on the driver, before any replica starts."""
    if uri.startswith("runs:/"):
        return ModelRef(uri, uri, uri.removeprefix("runs:/").split("/", 1)[0])
    if not uri.startswith("models:/"):
        if is_s3(uri) and storage is not None and not storage.filesystem(uri).exists(strip_scheme(uri)):
            raise FileNotFoundError(f"model {uri}: nothing is stored under this prefix")
        if not uri.startswith(MLFLOW_SCHEMES) and not is_s3(uri):
            weights_dir(uri)  # raises naming what it expected to find
        return ModelRef(uri, uri, None)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    rest = uri.removeprefix("models:/").rstrip("/")
    try:
        if "@" in rest:
            name, alias = rest.rsplit("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in rest:
            name, version = rest.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        else:  # models:/<model_id>, a logged model
            return ModelRef(uri, uri, client.get_logged_model(rest).source_run_id)
    except MlflowException as err:
        if err.error_code not in (
            "RESOURCE_DOES_NOT_EXIST",
            "INVALID_PARAMETER_VALUE",
        ):  # unknown alias: the latter
            raise
        raise FileNotFoundError(
            f"model {uri}: {err.message} (registry names are case-sensitive; tracking URI "
            f"{client.tracking_uri})"
        ) from err
    return ModelRef(uri, f"models:/{mv.name}/{mv.version}", mv.run_id, (mv.name, str(mv.version)))


def weights_dir(path: str) -> str:
    """The ``save_pretrained`` folder inside ``path``: itself, or an MLflow model's weights artifact."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {path}: no such folder")
    if all(os.path.isfile(os.path.join(path, f)) for f in EXPORT_FILES):
        return path
    mlmodel = os.path.join(path, "MLmodel")
    if os.path.isfile(mlmodel):
        from mlflow.models import Model

        flavor = Model.load(mlmodel).flavors.get("python_function", {})
        artifact = flavor.get("artifacts", {}).get(WEIGHTS_ARTIFACT)
        if artifact is None:
            raise FileNotFoundError(f"{path} is an MLflow model without a '{WEIGHTS_ARTIFACT}' artifact")
        return weights_dir(os.path.join(path, artifact["path"]))
    raise FileNotFoundError(
        f"{path} is neither a Dragonfly export ({', '.join(EXPORT_FILES)} + processor files) nor an "
        "MLflow model with Dragonfly weights"
    )


@contextlib.contextmanager
def fetched_model(
    uri: str, storage: StorageConfig, tracking_uri: str | None = None, download_dir: str | None = None
) -> Iterator[str]:
    """The ``save_pretrained`` folder of any model URI for the duration: a local export (or MLflow
    model folder) in place; an ``s3://`` prefix or an MLflow URI (``runs:/<id>/model``,
    ``models:/<name>@<alias>``: the registered pyfunc's weights) downloaded into a fresh folder under
    ``download_dir`` and removed afterwards (an 8B model is 16 GB, fetched by every worker)."""
    if not uri.startswith(MLFLOW_SCHEMES):
        with fetched_dir(uri, storage, download_dir) as folder:
            yield weights_dir(folder)
        return
    if download_dir:
        os.makedirs(download_dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="dragonfly-model-", dir=download_dir)
    try:
        import mlflow.artifacts

        # MLflow downloads into a subfolder of root named after the artifact path.
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=root, tracking_uri=tracking_uri
        )
        yield weights_dir(local)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def load_model(
    uri: str, storage: StorageConfig, device: str, tracking_uri: str | None = None, download_dir=None
):
    """``(DragonflyModel in eval mode, DragonflyProcessor)`` from any model URI."""
    from dragonfly.model import DragonflyModel
    from dragonfly.processor import DragonflyProcessor

    with fetched_model(uri, storage, tracking_uri, download_dir) as path:
        return DragonflyModel.from_pretrained(path, device=device).eval(), DragonflyProcessor.from_pretrained(
            path
        )


# ---------------------------------------------------------------------------------------------
# Rows


def eval_row(index: int, record: ManifestRecord, image_root: str) -> dict[str, Any]:
    """Prompt (the conversation before its final answer) and reference (that answer)."""
    row = {
        "index": index,
        "id": record.id,
        "image": join(image_root, record.image) if record.has_image else None,
        "messages": None,
        "reference": None,
        "error": None,
    }
    turns = record.conversations
    speaker, answer = turn_fields(turns[-1]) if isinstance(turns, list) and turns else (None, None)
    role = ROLE_ALIASES.get(speaker) if isinstance(speaker, str) else None
    if role != "assistant" or not isinstance(answer, str) or not answer.strip() or len(turns) < 2:
        row["error"] = f"record {record.id}: no final assistant answer to compare with"
        return row
    row["messages"] = json.dumps(turns[:-1])
    row["reference"] = answer
    return row


# ---------------------------------------------------------------------------------------------
# The replica


class Predictor:
    """One model replica (a Ray actor): loads the model once; each call reads a batch's images and
    generates its answers. A sample whose image or conversation is unusable gets an ``error``
    instead of failing its batch."""

    def __init__(
        self,
        model_uri: str,
        storage: StorageConfig,
        device: str,
        max_new_tokens: int,
        fetch_threads: int,
        tracking_uri: str | None = None,
        download_dir: str | None = None,
    ):
        self.model, self.processor = load_model(model_uri, storage, device, tracking_uri, download_dir)
        self.storage = storage
        self.max_new_tokens = max_new_tokens
        self.fetch_threads = fetch_threads

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        images, errors = self._read_images(rows)
        predictions = [""] * len(rows)
        self._generate(rows, images, [i for i, e in enumerate(errors) if e is None], predictions, errors)
        return pa.table(
            {
                "index": pa.array([r["index"] for r in rows], pa.int64()),
                "prediction": pa.array(predictions, pa.string()),
                "error": pa.array(errors, pa.string()),
            }
        )

    def _read_images(self, rows: list[dict]) -> tuple[list[bytes | None], list[str | None]]:
        images: list[bytes | None] = [None] * len(rows)
        errors: list[str | None] = [None] * len(rows)

        def read(i: int) -> None:
            try:
                images[i] = self.storage.read_bytes(rows[i]["image"])
            except RECORD_READ_ERRORS as err:
                what = "missing" if read_error_reason(err) == "missing_file" else "unreadable"
                errors[i] = f"record {rows[i]['id']}: {what} image {rows[i]['image']} ({type(err).__name__})"

        wanted = [i for i, r in enumerate(rows) if r["image"] is not None]
        if wanted:
            with ThreadPoolExecutor(max_workers=max(1, min(self.fetch_threads, len(wanted)))) as pool:
                list(pool.map(read, wanted))  # list(): an unreachable store raises here
        return images, errors

    def _generate(
        self, rows, images, todo: list[int], predictions: list[str], errors: list[str | None]
    ) -> None:
        """Generate for ``todo`` in one call; if a sample in it is unusable, retry one by one so
        that only that sample is marked."""
        from dragonfly.processor import RecordError
        from dragonfly.zoom import ImageError

        if not todo:
            return
        try:
            answers = self.model.generate_text(
                self.processor,
                [images[i] for i in todo],
                [json.loads(rows[i]["messages"]) for i in todo],
                max_new_tokens=self.max_new_tokens,
            )
        except (RecordError, ImageError) as err:
            if len(todo) == 1:
                errors[todo[0]] = f"record {rows[todo[0]]['id']}: {err}"
                return
            for i in todo:
                self._generate(rows, images, [i], predictions, errors)
            return
        for i, answer in zip(todo, answers, strict=True):
            predictions[i] = answer


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class EvalResult:
    metrics: dict[str, float]  # corpus scores + n_samples, n_errors
    table: pd.DataFrame  # one row per record: ids, prompt, reference, prediction, error, scores
    model: ModelRef
    run_id: str | None  # where the evaluation was logged


def predict_rows(
    rows: list[dict], model: ModelRef, cfg: EvalConfig, tracking_uri: str | None
) -> pd.DataFrame:
    """``rows`` with ``prediction`` (and ``error``) filled in by the Ray Data replicas."""
    import ray.data

    table = pd.DataFrame(rows)
    table["prediction"] = None
    todo = [r for r in rows if r["error"] is None]
    if not todo:
        return table
    ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / cfg.batch_size)))
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_uri": model.pinned_uri,
            "storage": cfg.storage,
            "device": cfg.device,
            "max_new_tokens": cfg.max_new_tokens,
            "fetch_threads": cfg.fetch_threads,
            "tracking_uri": tracking_uri,
            "download_dir": cfg.download_dir,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        concurrency=cfg.replicas,
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        runtime_env={"env_vars": settings_env()},
    )
    out = ds.to_pandas().set_index("index")
    table = table.set_index("index", drop=False)
    table.loc[out.index, "prediction"] = out["prediction"]
    table.loc[out.index, "error"] = out["error"]
    return table.sort_index().reset_index(drop=True)


def score_table(table: pd.DataFrame, task: str, max_error_fraction: float) -> dict[str, float]:
    """Add one column per metric (NaN on error rows) and return the corpus scores + counts."""
    failed = table["error"].notna()
    n, n_errors = len(table), int(failed.sum())
    if n_errors > max_error_fraction * n or n_errors == n:
        shown = "\n  ".join(table.loc[failed, "error"].head(MAX_ERRORS_SHOWN))
        raise EvaluationError(
            f"{n_errors} of {n} samples could not be evaluated (max_error_fraction={max_error_fraction}):\n  {shown}"
        )
    good = table[~failed]
    scores = score_task(task, good["prediction"].tolist(), good["reference"].tolist())
    for metric, values in scores.per_sample.items():
        table[metric] = float("nan")
        table.loc[good.index, metric] = values
    return {**scores.corpus, "n_samples": float(n), "n_errors": float(n_errors)}


def write_table(table: pd.DataFrame, folder: str, storage: StorageConfig) -> None:
    """``<folder>/predictions.parquet`` and ``.csv`` (local folder or s3:// prefix)."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    if not is_s3(folder):
        folder = os.path.abspath(folder)  # pyarrow's local file system wants absolute paths
        os.makedirs(folder, exist_ok=True)
    pq.write_table(
        arrow,
        strip_scheme(join(folder, f"{TABLE_NAME}.parquet")),
        filesystem=storage.pyarrow_filesystem(folder),
    )
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    with storage.open(join(folder, f"{TABLE_NAME}.csv"), "wb") as f:
        f.write(buffer.getvalue().encode("utf-8"))


def log_evaluation(
    client, run_id: str, set_name: str, metrics: dict[str, float], table: pd.DataFrame, model: ModelRef
) -> None:
    """Metrics ``eval/<set>/<metric>``, the table under artifacts ``eval/<set>/`` and the model URI."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(f"eval/{set_name}/{k}", float(v), now, 0) for k, v in metrics.items()],
        tags=[RunTag(f"eval.{set_name}.model_uri", model.pinned_uri)],
    )
    with tempfile.TemporaryDirectory(prefix="dragonfly-eval-") as tmp:
        write_table(table, tmp, StorageConfig())
        client.log_artifacts(run_id, tmp, f"eval/{set_name}")


def evaluate_model(
    model_uri: str,
    cfg: EvalConfig,
    *,
    tracking_uri: str | None = None,
    log_to: str = "auto",
    out_dir: str | None = None,
) -> EvalResult:
    """Evaluate ``model_uri`` on ``cfg.data``.

    ``log_to``: ``auto`` logs on the model's run when the URI names one, else on a new run of
    ``cfg.experiment``; ``new`` always starts a new run; ``none`` logs nothing. ``out_dir`` (local or
    s3://) also receives the table."""
    if log_to not in ("auto", "new", "none"):
        raise ValueError(f"log_to must be auto, new or none, got {log_to!r}")
    model = describe_model(model_uri, tracking_uri, cfg.storage)
    records = read_manifest(cfg.data, cfg.storage)[: cfg.limit]
    root = cfg.image_root if cfg.image_root is not None else parent(cfg.data)
    table = predict_rows([eval_row(i, r, root) for i, r in enumerate(records)], model, cfg, tracking_uri)
    metrics = score_table(table, cfg.task, cfg.max_error_fraction)
    set_name = cfg.set_name()
    log.info("evaluated %s on %s: %s", model.pinned_uri, set_name, metrics)
    if out_dir is not None:
        write_table(table, out_dir, cfg.storage)

    run_id = None
    if log_to != "none":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        run_id = model.run_id if log_to == "auto" else None
        if run_id is None:
            run_id = _new_evaluation_run(client, cfg, model, set_name)
        own_run = run_id != model.run_id
        try:
            log_evaluation(client, run_id, set_name, metrics, table, model)
        except BaseException:
            if own_run:  # not left RUNNING
                client.set_terminated(run_id, status="FAILED")
            raise
        if own_run:
            client.set_terminated(run_id)
    return EvalResult(metrics, table, model, run_id)


def _new_evaluation_run(client, cfg: EvalConfig, model: ModelRef, set_name: str) -> str:
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    tags = {"dragonfly.model_uri": model.pinned_uri, "dragonfly.eval_data": cfg.data}
    if model.run_id:
        tags["dragonfly.evaluated_run_id"] = model.run_id
    return client.create_run(experiment_id, run_name=f"eval-{set_name}", tags=tags).info.run_id


def evaluator(cfg: EvalConfig, tracking_uri: str | None = None) -> Callable[[str], dict[str, float]]:
    """``model URI -> corpus metrics``, logging each evaluation on the evaluated model's run: the
    evaluation ``registry.promote`` runs for challenger and champion."""

    def evaluate(model_uri: str) -> dict[str, float]:
        return evaluate_model(model_uri, cfg, tracking_uri=tracking_uri).metrics

    return evaluate


__all__ = [
    "EvalConfig",
    "EvalResult",
    "EvaluationError",
    "ModelRef",
    "Predictor",
    "describe_model",
    "evaluate_model",
    "evaluator",
    "fetched_model",
    "load_model",
    "score_table",
    "weights_dir",
    "write_table",
]
