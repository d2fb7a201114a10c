"""The trained model as an MLflow model, and its promotion through the registry.

MLflow model: ``DragonflyPyfunc``, a ``pyfunc`` wrapper (image bytes + chat messages in, answer out)
whose weights folder (``save_pretrained`` model + processor) is the artifact ``weights``. The
``dragonfly`` and ``dragonfly_platform`` sources travel with it as code paths, so loading it, or
serving it with ``mlflow models serve --env-manager local``, needs neither our package installed
nor the network. A training run's export (``model/`` artifacts, what ``jobs/train.py`` logs) is
wrapped on first registration (``ensure_pyfunc_model``).

Promotion (``promote``): under a lock on the registered model, register the run's model as a version
with alias ``challenger`` (reusing the version if that run was registered before), evaluate
challenger and ``champion`` on the same held-out set, run the gate, tag the challenger with its
scores and the decision, and move ``champion`` only if the gate passes and ``champion`` still points
where it did before the evaluation (compare-and-set). ``rollback`` walks back one step along the
``promotion.previous_champion`` tags.

This module imports only MLflow, pandas and pydantic at import time: it is part of the served model's
code and must load without Ray.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dragonfly_platform.config import read_yaml_mapping, validate_config

log = logging.getLogger("dragonfly.registry")

PYFUNC_NAME = "dragonfly"  # the logged model's name in a run
WEIGHTS_ARTIFACT = "weights"  # the pyfunc artifact holding the save_pretrained folder
TRAINING_EXPORT_ARTIFACTS = "model"  # where jobs/train.py logs its export in the run's artifacts
CHAMPION, CHALLENGER = "champion", "challenger"

# Model-version tags written by promotion.
DECISION_TAG = "promotion.decision"  # promoted | refused | rolled_back
REASON_TAG = "promotion.reason"
PREVIOUS_CHAMPION_TAG = "promotion.previous_champion"  # version it replaced ("" for the first)
COMPARED_TO_TAG = "promotion.compared_to"
EVAL_DATA_TAG = "promotion.eval_data"
SCORE_TAG_PREFIX = "score."
# Registered-model tag holding the promotion lock.
LOCK_TAG = "promotion.lock"

# Packages the served model imports (dragonfly's runtime dependencies), pinned to this environment's
# versions, which are the ones pyproject.toml / requirements.lock pin.
SERVING_PACKAGES = (
    "mlflow",
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "open_clip_torch",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "pydantic",
    "cloudpickle",  # the DragonflyPyfunc instance is stored with it
)

EvaluateFn = Callable[[str], dict[str, float]]


class PromotionError(RuntimeError):
    """Promotion or rollback could not run (bad input, nothing to roll back to)."""


class PromotionConflict(PromotionError):
    """Another promotion holds the lock or moved ``champion`` meanwhile; nothing was changed."""


# ---------------------------------------------------------------------------------------------
# The MLflow model


class DragonflyPyfunc(mlflow.pyfunc.PythonModel):
    """``predict(DataFrame[image, messages]) -> DataFrame[answer]``, greedy decoding.

    ``image``: raw bytes or their base64 text (JSON requests); for a text-only row None/NaN, or empty
    (``""`` in JSON requests, where MLflow's parsing refuses null in a binary column).
    ``messages``: the conversation so far, ending with a user turn, as a list of
    ``{"role", "content"}`` (or LLaVA ``{"from", "value"}``) dicts or its JSON text; the image is
    placed at the start of the first user turn unless the text holds ``<image>``.
    Params: ``max_new_tokens``. Model config: ``device`` (``auto`` = CUDA when available).
    """

    def load_context(self, context) -> None:
        import torch

        from dragonfly.model import DragonflyModel
        from dragonfly.processor import DragonflyProcessor

        device = (context.model_config or {}).get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        weights = context.artifacts[WEIGHTS_ARTIFACT]
        self.model = DragonflyModel.from_pretrained(weights, device=device).eval()
        self.processor = DragonflyProcessor.from_pretrained(weights)

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if "messages" not in model_input.columns:
            raise ValueError(
                f"model input needs a 'messages' column (and 'image'), got {list(model_input.columns)}"
            )
        images = (
            [decode_image_cell(v, row) for row, v in enumerate(model_input["image"])]
            if "image" in model_input
            else [None] * len(model_input)
        )
        messages = [decode_messages_cell(v, row) for row, v in enumerate(model_input["messages"])]
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        answers = self.model.generate_text(self.processor, images, messages, max_new_tokens=max_new_tokens)
        return pd.DataFrame({"answer": answers})


def decode_image_cell(value: Any, row: int) -> bytes | None:
    """An ``image`` cell -> encoded image bytes, or None for text-only rows."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"row {row}: 'image' is text but not base64 of an image file") from None
    if isinstance(value, bytes | bytearray):
        # Empty means text-only: MLflow's JSON parsing cannot take null in a binary column.
        return bytes(value) or None
    raise ValueError(f"row {row}: 'image' must be bytes, base64 text or null, got {type(value).__name__}")


def decode_messages_cell(value: Any, row: int) -> list[dict]:
    """A ``messages`` cell -> a list of message dicts."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"row {row}: 'messages' is text but not JSON ({err.msg})") from None
    if hasattr(value, "tolist"):  # numpy arrays out of pandas / pyarrow
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ValueError(f"row {row}: 'messages' must be a list of message objects, got {value!r:.80}")
    return value


def pyfunc_signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "messages")]),
        outputs=Schema([ColSpec("string", "answer")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
    )


def serving_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in SERVING_PACKAGES]


def _copy_packages(into: str) -> list[str]:
    """Sources of ``dragonfly`` and ``dragonfly_platform`` (no bytecode caches) for ``code_paths``."""
    import dragonfly
    import dragonfly_platform

    copies = []
    for package in (dragonfly, dragonfly_platform):
        copies.append(os.path.join(into, package.__name__))
        shutil.copytree(
            Path(package.__file__).parent, copies[-1], ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return copies


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def log_pyfunc_model(run_id: str, export_dir: str, tracking_uri: str | None = None) -> str:
    """Log ``export_dir`` (a ``save_pretrained`` model + processor folder) as the run's ``dragonfly``
    pyfunc model; returns its ``models:/<model_id>`` URI. The run keeps its status."""
    if not (Path(export_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{export_dir} has no config.json: not a Dragonfly export")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    with tempfile.TemporaryDirectory(prefix="dragonfly-pyfunc-") as tmp:
        # MLflow stores a folder artifact under its base name: a fixed name gives a fixed layout,
        # artifacts/weights/ inside the model. Hard links spare a copy of the weights where the file
        # system allows (MLflow refuses symbolic links that lead outside the folder).
        weights = os.path.join(tmp, WEIGHTS_ARTIFACT)
        shutil.copytree(export_dir, weights, copy_function=_link_or_copy)
        try:
            with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*An input example was not provided")
                info = mlflow.pyfunc.log_model(
                    name=PYFUNC_NAME,
                    python_model=DragonflyPyfunc(),
                    artifacts={WEIGHTS_ARTIFACT: weights},
                    code_paths=_copy_packages(os.path.join(tmp, "code")),
                    signature=pyfunc_signature(),
                    # No input_example: MLflow would load the model in this process to validate it,
                    # which costs the full weights in memory at log time for a production-size model.
                    pip_requirements=serving_requirements(),
                    model_config={"device": "auto"},
                )
        finally:
            # start_run/end_run marked the training run RUNNING, then FINISHED (FAILED if the
            # upload failed): its own status stands either way.
            client.update_run(run_id, status=status)
    return info.model_uri


def find_pyfunc_model(client: MlflowClient, run_id: str):
    """The run's logged ``dragonfly`` model (newest), or None."""
    run = client.get_run(run_id)
    models = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{PYFUNC_NAME}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
    )
    return models[0] if models else None


def ensure_pyfunc_model(client: MlflowClient, run_id: str):
    """The run's pyfunc model, wrapping its training export (``model/`` artifacts) the first time."""
    found = find_pyfunc_model(client, run_id)
    if found is not None:
        return found
    artifacts = {a.path for a in client.list_artifacts(run_id, TRAINING_EXPORT_ARTIFACTS)}
    if f"{TRAINING_EXPORT_ARTIFACTS}/config.json" not in artifacts:
        raise PromotionError(
            f"run {run_id} has no model: expected a logged '{PYFUNC_NAME}' pyfunc model or a training "
            f"export under its '{TRAINING_EXPORT_ARTIFACTS}/' artifacts (jobs/train.py logs it there)"
        )
    with tempfile.TemporaryDirectory(prefix="dragonfly-export-") as tmp:
        export = client.download_artifacts(run_id, TRAINING_EXPORT_ARTIFACTS, tmp)
        log_pyfunc_model(run_id, export, client.tracking_uri)
    return find_pyfunc_model(client, run_id)


# ---------------------------------------------------------------------------------------------
# The gate


# What an evaluation reports besides its scores: counts, for which higher is not better.
EVALUATION_COUNTS = frozenset({"n_samples", "n_errors"})


class GateConfig(BaseModel):
    """When a challenger may replace the champion. Every metric is "higher is better" (all of
    ``dragonfly.metrics`` are); tolerances are absolute, in the metric's own units."""

    model_config = ConfigDict(extra="forbid")

    # metric -> minimum value the challenger must reach
    thresholds: dict[str, float] = Field(default_factory=dict)
    # metric -> how far the challenger may fall below the champion
    max_regression: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sensible(self):
        if not self.thresholds and not self.max_regression:
            raise ValueError("gate needs at least one metric in thresholds or max_regression")
        negative = sorted(m for m, tol in self.max_regression.items() if tol < 0)
        if negative:
            raise ValueError(f"gate.max_regression must be >= 0, negative for {negative}")
        counts = sorted(self.metrics() & EVALUATION_COUNTS)
        if counts:
            raise ValueError(
                f"gate metrics must be scores (higher is better); {counts} count samples (an evaluation "
                "with too many errors already fails through eval.max_error_fraction)"
            )
        return self

    def metrics(self) -> set[str]:
        return set(self.thresholds) | set(self.max_regression)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # every check, failed ones first

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons)


def gate(challenger: dict[str, float], champion: dict[str, float] | None, cfg: GateConfig) -> GateDecision:
    """Judge the challenger's scores against the thresholds and, if there is a champion, against
    the champion's scores on the same set. A metric the evaluation did not produce is an error."""
    for name, scores in (("challenger", challenger), ("champion", champion)):
        if scores is None:
            continue
        needed = set(cfg.thresholds) | (set(cfg.max_regression) if champion is not None else set())
        missing = sorted(needed - set(scores))
        if missing:
            raise PromotionError(
                f"the gate uses {missing}, which the {name}'s evaluation did not produce "
                f"(it produced {sorted(scores)}); check the gate against the evaluation task"
            )
    failed, passed = [], []
    for metric, minimum in sorted(cfg.thresholds.items()):
        value = challenger[metric]
        ok = value >= minimum  # NaN fails
        (passed if ok else failed).append(
            f"{metric} {value:.4f} {'>=' if ok else '<'} threshold {minimum:.4f}"
        )
    if champion is None:
        passed.append("no champion yet: no regression check")
    else:
        for metric, tolerance in sorted(cfg.max_regression.items()):
            new, old = challenger[metric], champion[metric]
            if math.isnan(old):  # nothing to regress from; a NaN would refuse every challenger
                passed.append(f"{metric}: the champion has no score (nan): no regression check")
                continue
            ok = new >= old - tolerance
            (passed if ok else failed).append(
                f"{metric} {old:.4f} -> {new:.4f} "
                f"({'within' if ok else 'regressed beyond'} tolerance {tolerance:.4f})"
            )
    return GateDecision(passed=not failed, reasons=failed + passed)


# ---------------------------------------------------------------------------------------------
# Configuration of a promotion


class PromoteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    registered_model: str = "Dragonfly"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI
    # The held-out evaluation both models run (dragonfly_platform.evaluate.EvalConfig fields).
    eval: dict[str, Any]
    gate: GateConfig
    # A lock older than this is taken over (its holder is presumed dead); longer than a promotion's
    # two evaluations.
    lock_stale_after_s: float = 6 * 3600
    # Wait between writing the lock and reading it back; two promotions starting within this window
    # see each other's write and only the last writer proceeds.
    lock_settle_s: float = 1.0

    def resolved_tracking_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise PromotionError("set tracking_uri in the config or $MLFLOW_TRACKING_URI")
        return uri


def load_promote_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> PromoteConfig:
    raw = read_yaml_mapping(path, "promotion config")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validate_config(PromoteConfig, raw, str(path))


# ---------------------------------------------------------------------------------------------
# The lock


@dataclass(frozen=True)
class LockHolder:
    owner: str
    since: float
    action: str

    def to_json(self) -> str:
        return json.dumps({"owner": self.owner, "since": self.since, "action": self.action})

    @classmethod
    def from_json(cls, text: str | None) -> LockHolder | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(str(data["owner"]), float(data["since"]), str(data.get("action", "")))
        except (ValueError, KeyError, TypeError):
            return cls(owner=f"unreadable lock {text!r:.60}", since=0.0, action="")  # 0: stale


def _read_lock(client: MlflowClient, name: str) -> LockHolder | None:
    return LockHolder.from_json(client.get_registered_model(name).tags.get(LOCK_TAG))


@contextmanager
def registry_lock(
    client: MlflowClient, name: str, action: str, stale_after_s: float, settle_s: float
) -> Iterator[LockHolder]:
    """Hold the registered model's promotion lock (a tag) for the block.

    MLflow has no transactions: the lock is write-then-read-back. Two processes that both find the
    tag free, write within ``settle_s`` of each other and read back: only the later writer sees its
    own id and proceeds. The residual window (one process reads back before the other writes, with
    both having seen the lock free) is closed by the champion compare-and-set in ``promote``.
    """
    me = LockHolder(
        owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", since=time.time(), action=action
    )
    held = _read_lock(client, name)
    if held is not None and time.time() - held.since < stale_after_s:
        raise PromotionConflict(
            f"registered model {name!r} is locked by {held.owner} ({held.action or 'unknown action'}) "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held.since))}; wait for it, or "
            f"delete the registered-model tag {LOCK_TAG!r} if that process is gone"
        )
    if held is not None:
        log.warning("taking over the stale promotion lock of %s (%s)", held.owner, held.action)
    try:
        client.set_registered_model_tag(name, LOCK_TAG, me.to_json())
    except MlflowException as err:
        # The SQL store inserts a new tag row; a concurrent first insert makes ours fail with a
        # UNIQUE-constraint error. That is the same race as losing the read-back below.
        rival = _read_lock(client, name)
        if rival is None or rival.owner == me.owner:
            raise
        raise PromotionConflict(
            f"another promotion ({rival.owner}) took the lock on {name!r} at the same time; nothing "
            "was changed, rerun when it is done"
        ) from err
    time.sleep(settle_s)
    again = _read_lock(client, name)
    if again is None or again.owner != me.owner:
        raise PromotionConflict(
            f"another promotion ({again.owner if again else 'unknown'}) took the lock on {name!r} at the "
            "same time; nothing was changed, rerun when it is done"
        )
    try:
        yield me
    finally:
        current = _read_lock(client, name)
        if current is not None and current.owner == me.owner:
            client.delete_registered_model_tag(name, LOCK_TAG)


def _ensure_lock_is_mine(client: MlflowClient, name: str, me: LockHolder) -> None:
    current = _read_lock(client, name)
    if current is None or current.owner != me.owner:
        raise PromotionConflict(
            f"lost the promotion lock on {name!r} to {current.owner if current else 'nobody'} while "
            "evaluating (stale-lock takeover?); champion was not moved, rerun"
        )


# ---------------------------------------------------------------------------------------------
# Registry operations


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
            return None
        raise


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_challenger(client: MlflowClient, run_id: str, name: str) -> str:
    """Register the run's model as a version of ``name`` (or reuse the version already registered
    from that run) and point ``challenger`` at it; returns the version."""
    _ensure_registered_model(client, name)
    existing = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    if existing:
        version = str(min(int(v.version) for v in existing))
        log.info("run %s is already version %s of %s", run_id, version, name)
    else:
        logged = ensure_pyfunc_model(client, run_id)
        mv = client.create_model_version(
            name, source=logged.model_uri, run_id=run_id, model_id=logged.model_id
        )
        version = str(mv.version)
        log.info("registered run %s as version %s of %s", run_id, version, name)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


@dataclass(frozen=True)
class PromotionResult:
    name: str
    version: str  # the challenger
    decision: str  # promoted | refused | already_champion
    champion_before: str | None
    champion_after: str | None
    challenger_scores: dict[str, float]
    champion_scores: dict[str, float] | None
    reasons: list[str]

    @property
    def promoted(self) -> bool:
        return self.decision in ("promoted", "already_champion")


def _score_tags(scores: dict[str, float]) -> dict[str, str]:
    return {f"{SCORE_TAG_PREFIX}{k}": f"{v:.6g}" for k, v in scores.items()}


def _set_version_tags(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def promote(
    client: MlflowClient,
    run_id: str,
    cfg: PromoteConfig,
    evaluate: EvaluateFn,
    name: str | None = None,
) -> PromotionResult:
    """Register ``run_id`` as challenger, evaluate it and the champion with ``evaluate`` (a pinned
    ``models:/<name>/<version>`` URI -> metrics), gate, and move ``champion`` if the gate passes.

    Raises ``PromotionConflict`` (nothing changed beyond the challenger registration) when another
    promotion holds the lock or ``champion`` moved during the evaluation."""
    name = name or cfg.registered_model
    _ensure_registered_model(client, name)
    with registry_lock(
        client, name, f"promote run {run_id}", cfg.lock_stale_after_s, cfg.lock_settle_s
    ) as me:
        version = register_challenger(client, run_id, name)
        champion = _alias_version(client, name, CHAMPION)
        if champion == version:
            log.info("version %s of %s is already the champion", version, name)
            return PromotionResult(name, version, "already_champion", champion, champion, {}, None, [])

        challenger_scores = evaluate(f"models:/{name}/{version}")
        champion_scores = evaluate(f"models:/{name}/{champion}") if champion is not None else None
        decision = gate(challenger_scores, champion_scores, cfg.gate)
        tags = {
            **_score_tags(challenger_scores),
            COMPARED_TO_TAG: champion or "",
            EVAL_DATA_TAG: str(cfg.eval.get("data", "")),
            REASON_TAG: decision.summary[:5000],
        }
        if champion is not None:
            _set_version_tags(client, name, champion, _score_tags(champion_scores))

        if not decision.passed:
            _set_version_tags(client, name, version, {**tags, DECISION_TAG: "refused"})
            return PromotionResult(
                name,
                version,
                "refused",
                champion,
                champion,
                challenger_scores,
                champion_scores,
                decision.reasons,
            )

        # Compare-and-set: the champion we judged against must still be the champion.
        now = _alias_version(client, name, CHAMPION)
        if now != champion:
            raise PromotionConflict(
                f"champion moved during promotion from v{champion} to v{now}; champion was not changed, rerun"
            )
        _ensure_lock_is_mine(client, name, me)
        _set_version_tags(client, name, version, {**tags, PREVIOUS_CHAMPION_TAG: champion or ""})
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, DECISION_TAG, "promoted")
        return PromotionResult(
            name, version, "promoted", champion, version, challenger_scores, champion_scores, decision.reasons
        )


def rollback(
    client: MlflowClient, name: str, stale_after_s: float = 6 * 3600, settle_s: float = 1.0
) -> tuple[str, str]:
    """Point ``champion`` back at the version the current champion replaced; returns
    ``(from_version, to_version)``. Repeating it walks further back."""
    with registry_lock(client, name, "rollback", stale_after_s, settle_s):
        current = _alias_version(client, name, CHAMPION)
        if current is None:
            raise PromotionError(f"{name!r} has no champion to roll back")
        previous = client.get_model_version(name, current).tags.get(PREVIOUS_CHAMPION_TAG, "")
        if not previous:
            raise PromotionError(f"v{current} of {name!r} was the first champion: nothing to roll back to")
        client.get_model_version(name, previous)  # still there? (raises if it was deleted)
        client.set_registered_model_alias(name, CHAMPION, previous)
        _set_version_tags(
            client, name, current, {DECISION_TAG: "rolled_back", REASON_TAG: f"rolled back to v{previous}"}
        )
        return current, previous


__all__ = [
    "DragonflyPyfunc",
    "GateConfig",
    "GateDecision",
    "PromoteConfig",
    "PromotionConflict",
    "PromotionError",
    "PromotionResult",
    "ensure_pyfunc_model",
    "find_pyfunc_model",
    "gate",
    "load_promote_config",
    "log_pyfunc_model",
    "promote",
    "register_challenger",
    "registry_lock",
    "rollback",
]
