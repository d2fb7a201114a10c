"""The run config: one YAML file (plus ``--set a.b=c`` overrides) describes a whole training run.

Sections: ``data`` (the Ray Data pipeline, ``dragonfly_platform.data.DataConfig``), ``model`` (a
``DragonflyConfig``, optionally from a preset), ``processor`` (tokenizer and sequence length),
``train`` (stage, batch, schedule, ZeRO, checkpoints), ``run`` (name, storage, workers, failures) and
``mlflow``. Everything is validated before any work starts: ``load_run_config`` raises one
``ConfigError`` listing every problem it found (unknown keys, wrong types, impossible combinations).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dragonfly.config import ConfigError
from dragonfly_platform.data import DataConfig

BaseModelT = TypeVar("BaseModelT", bound=BaseModel)

FREEZE_PLANS = ("stage1", "stage2", "med_stage1")
# Which parts each named freeze plan leaves trainable (dragonfly.model.apply_freeze_plan): the paper's
# Table 10 (stage 1: projector; stage 2: everything) and Table 16 (Med stage 1: projector + tower).
VISION_FROZEN_PLANS = ("stage1",)
MODEL_PRESETS = ("tiny", "paper")
# Stands in for the tokenizer's size while a config is validated before any tokenizer exists.
_PLACEHOLDER_VOCAB = 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProcessorSection(_Section):
    # "tiny": dragonfly.tiny.build_tiny_tokenizer (no downloads); otherwise a Hugging Face name or a
    # local path. None: the tokenizer saved with `train.init_from`'s export.
    tokenizer: str | None = None
    max_length: Annotated[int, Field(gt=0)] = 4096
    train_on_user_turns: bool = False
    # None: the tokenizer's own chat template (an init_from export's, as saved); "released": the
    # released Dragonfly's prompt, for checkpoints converted with dragonfly.convert; or a Jinja template.
    chat_template: str | None = None


class TrainConfig(_Section):
    # A named plan of dragonfly.model.apply_freeze_plan, or the list of parameter-name prefixes to train.
    freeze: Literal["stage1", "stage2", "med_stage1"] | list[str] = "stage2"
    global_batch_size: Annotated[int, Field(gt=0)] = 16
    micro_batch_size: Annotated[int, Field(gt=0)] = 1
    lr: Annotated[float, Field(gt=0)] = 2e-6
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.01
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    # Training stops after `epochs` passes or `max_steps` optimizer steps, whichever comes first.
    epochs: Annotated[int, Field(gt=0)] = 1
    max_steps: Annotated[int, Field(gt=0)] | None = None
    # The initial weights (alike on every rank); the data order follows data.shuffle_seed.
    seed: Annotated[int, Field(ge=0)] = 0
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    # auto: bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    checkpoint_every: Annotated[int, Field(gt=0)] = 500
    keep_checkpoints: Annotated[int, Field(gt=0)] = 2
    # auto: asynchronous uploads on GPU (training goes on while shards upload), synchronous on CPU.
    checkpoint_upload: Literal["auto", "sync", "async"] = "auto"
    # Validation loss on the `val` split at every checkpoint and at the end (0 batches: no validation).
    eval_batches: Annotated[int, Field(ge=0)] = 8
    log_every: Annotated[int, Field(gt=0)] = 1
    # Start from another run's export: a local path, an s3:// URI or an MLflow model/artifact URI
    # (models:/name@alias, runs:/<id>/model).
    init_from: str | None = None

    @field_validator("freeze")
    @classmethod
    def _prefixes_not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("a list freeze plan must name at least one parameter prefix to train")
        return value


class RunSection(_Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    # A local folder or s3://bucket/prefix; the run lives in <storage_path>/<name>/.
    storage_path: str = "runs"
    num_workers: Annotated[int, Field(gt=0)] = 1
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    # Worker failures survived by restarting from the latest checkpoint (-1: forever).
    max_failures: Annotated[int, Field(ge=-1)] = 0

    @field_validator("storage_path")
    @classmethod
    def _local_or_s3(cls, value):
        if "://" in value and not value.startswith("s3://"):
            raise ValueError(f"must be a local folder or s3://bucket/prefix, got {value!r}")
        return value

    @property
    def on_s3(self) -> bool:
        return self.storage_path.startswith("s3://")


class MlflowSection(_Section):
    # None: $MLFLOW_TRACKING_URI if set, else a sqlite store in the (local) storage folder.
    tracking_uri: str | None = None
    experiment: str = "dragonfly"


class RunConfig(_Section):
    run: RunSection
    data: DataConfig
    # A DragonflyConfig as a dict (optionally `preset: tiny | paper` plus overrides); None with
    # `train.init_from` (the architecture comes from the export's config.json).
    model: dict[str, Any] | None = None
    processor: ProcessorSection = ProcessorSection()
    train: TrainConfig = TrainConfig()
    mlflow: MlflowSection = MlflowSection()

    @field_validator("model")
    @classmethod
    def _model_builds(cls, value):
        if value is not None:
            resolve_model_config(value)  # raises ConfigError -> one line in the report
        return value

    @model_validator(mode="after")
    def _combinations(self):
        problems = combination_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # -- derived values --------------------------------------------------------------------

    def gradient_accumulation_steps(self, world_size: int | None = None) -> int:
        world_size = world_size or self.run.num_workers
        per_step = self.train.micro_batch_size * world_size
        if self.train.global_batch_size % per_step:
            raise ConfigError(_accumulation_problem(self.train, world_size))
        return self.train.global_batch_size // per_step

    def resolved_precision(self) -> Literal["bf16", "fp32"]:
        if self.train.precision == "auto":
            return "bf16" if self.run.use_gpu else "fp32"
        return self.train.precision

    def resolved_checkpoint_upload(self) -> Literal["sync", "async"]:
        if self.train.checkpoint_upload == "auto":
            return "async" if self.run.use_gpu else "sync"
        return self.train.checkpoint_upload

    def run_dir(self) -> str:
        """``<storage_path>/<name>``: the Ray Train run folder (checkpoints) and our exports."""
        return f"{self.run.storage_path.rstrip('/')}/{self.run.name}"

    def export_dir(self) -> str:
        return f"{self.run_dir()}/export"

    def dragonfly_config(self, processor=None):
        """The ``DragonflyConfig`` of the ``model`` section (None with ``init_from``), with the image
        token id and tiny vocabulary of ``processor``'s tokenizer."""
        return None if self.model is None else resolve_model_config(self.model, processor)

    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        if self.run.on_s3:
            raise ConfigError(
                "run.storage_path is on S3: set mlflow.tracking_uri or $MLFLOW_TRACKING_URI (the "
                "embedded sqlite store needs a local folder)"
            )
        return f"sqlite:///{Path(self.run.storage_path).resolve() / 'mlflow.db'}"

    def with_absolute_paths(self, base: str | os.PathLike | None = None) -> RunConfig:
        """Relative local paths (storage, manifests, image root, init_from) made absolute against
        ``base`` (default: this process's working directory). The driver does this before handing
        the config to workers, whose working directory is elsewhere."""
        base = Path(base or os.getcwd())

        def absolute(path: str | None) -> str | None:
            if path is None or "://" in path or path.startswith(("models:/", "runs:/", "mlflow-artifacts:")):
                return path
            return str((base / path).resolve())

        return self.model_copy(
            update={
                "run": self.run.model_copy(update={"storage_path": absolute(self.run.storage_path)}),
                "data": self.data.model_copy(
                    update={
                        "train_manifest": absolute(self.data.train_manifest),
                        "val_manifest": absolute(self.data.val_manifest),
                        "image_root": absolute(self.data.image_root),
                    }
                ),
                "train": self.train.model_copy(update={"init_from": absolute(self.train.init_from)}),
            }
        )

    def flatten(self) -> dict[str, str]:
        """``{"train.lr": "2e-05", ...}`` for MLflow params, with secrets left out and credentials
        stripped from URIs."""
        return redact_params(_flatten(self.model_dump(mode="json")))


# -- validation helpers ----------------------------------------------------------------------


def _accumulation_problem(train: TrainConfig, world_size: int) -> str:
    return (
        f"train.global_batch_size={train.global_batch_size} is not divisible by "
        f"train.micro_batch_size={train.micro_batch_size} x run.num_workers={world_size} "
        f"(= {train.micro_batch_size * world_size} samples per micro-step)"
    )


def combination_problems(cfg: RunConfig) -> list[str]:
    """Settings that each validate alone but cannot work together."""
    train, run = cfg.train, cfg.run
    problems = []
    if train.global_batch_size % (train.micro_batch_size * run.num_workers):
        problems.append(_accumulation_problem(train, run.num_workers))
    if cfg.model is None and train.init_from is None:
        problems.append("give a `model` section or `train.init_from` (the model to start from)")
    if cfg.model is not None and train.init_from is not None:
        problems.append(
            "`model` and `train.init_from` exclude each other: the architecture comes from the export"
        )
    if cfg.processor.tokenizer is None and train.init_from is None:
        problems.append("processor.tokenizer is required without train.init_from ('tiny' or a name/path)")
    vision_frozen = train.freeze in VISION_FROZEN_PLANS or (
        isinstance(train.freeze, list) and not any(p.startswith("vision") for p in train.freeze)
    )
    if train.zero_stage == 3 and vision_frozen:
        problems.append(
            f"train.zero_stage=3 with freeze={train.freeze!r} would shard the frozen vision tower: "
            "ZeRO-3 partitions every parameter, so the frozen tower is gathered on every forward for "
            "no optimizer-memory saving; use zero_stage 2 (or a plan that trains the tower)"
        )
    if train.zero_stage == 3 and cfg.model is not None:
        problems += zero3_model_problems(resolve_model_config(cfg.model), train.micro_batch_size)
    if train.offload_params and train.zero_stage != 3:
        problems.append(
            "train.offload_params needs train.zero_stage=3 (DeepSpeed offloads parameters only in ZeRO-3)"
        )
    if train.offload_optimizer and train.zero_stage == 0:
        problems.append("train.offload_optimizer needs train.zero_stage >= 1")
    if (train.offload_optimizer or train.offload_params) and not run.use_gpu:
        problems.append("offloading to CPU needs run.use_gpu: on CPU everything already lives in host memory")
    if train.precision == "bf16" and not run.use_gpu:
        problems.append("train.precision=bf16 needs run.use_gpu (CPU runs train in fp32)")
    return problems


def zero3_model_problems(model_cfg, micro_batch_size: int) -> list[str]:
    """ZeRO-3 gathers parameters collectively on every module call, so every rank must make the same
    calls: the ViT must encode a micro-batch's crops in one chunk whatever its image count."""
    crops = micro_batch_size * model_cfg.zoom.n_tiles
    if model_cfg.vision.chunk_size < crops:
        return [
            f"train.zero_stage=3 needs model.vision.chunk_size >= micro_batch_size x crops per image "
            f"= {crops} (got {model_cfg.vision.chunk_size}): with fewer, ranks whose micro-batches hold "
            "different numbers of images call the ViT a different number of times and ZeRO-3's "
            "parameter all-gathers stop matching (a hang)"
        ]
    return []


def resolve_model_config(section: dict[str, Any], processor=None):
    """``{"preset": "tiny", "pooling": "perceiver", ...}`` -> ``DragonflyConfig``. Overrides of nested
    sections (zoom, tokens, vision) merge key by key into the preset's.

    The image token id (and the tiny LLM's vocabulary) come from ``processor``'s tokenizer; without
    one (validating a config before any tokenizer exists) placeholders stand in."""
    from dragonfly.model import DragonflyConfig

    section = copy.deepcopy(section)
    preset = section.pop("preset", None)
    if "image_token_id" in section:
        raise ConfigError("model.image_token_id comes from the tokenizer; remove it from the config")
    image_token_id = processor.image_token_id if processor is not None else 0
    vocab_size = len(processor.tokenizer) if processor is not None else _PLACEHOLDER_VOCAB
    if preset is None:
        base: dict[str, Any] = {"image_token_id": image_token_id}
    elif preset == "tiny":
        base = DragonflyConfig.tiny(vocab_size, image_token_id).to_dict()
    elif preset == "paper":
        base = DragonflyConfig(image_token_id=image_token_id).to_dict()
    else:
        raise ConfigError(f"model.preset must be one of {MODEL_PRESETS}, got {preset!r}")
    try:
        return DragonflyConfig.from_dict(_deep_merge(base, section))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# -- secrets ---------------------------------------------------------------------------------

# Key names whose values never reach MLflow or logs. `tokens` (the image token budget) is not a secret.
_SECRET_KEY = re.compile(
    r"(secret|password|passwd|credential|access_key|api_key|session_token|^token$)", re.I
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def redact_params(params: dict[str, Any]) -> dict[str, str]:
    """Flat ``{"a.b": value}`` params as MLflow may show them: keys that name a secret left out,
    passwords in URIs (``postgresql://user:pw@host``) masked."""
    return {
        key: _redact_uri(str(value))
        for key, value in params.items()
        if not any(_SECRET_KEY.search(part) for part in str(key).split("."))
    }


def _redact_uri(text: str) -> str:
    """``https://user:pw@host/x`` -> ``https://user:***@host/x``; other text unchanged."""
    if "://" not in text or "@" not in text:
        return text
    parts = urlsplit(text)
    if parts.password is None:
        return text
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# -- loading ---------------------------------------------------------------------------------


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "run.name=x"]`` applied to the YAML dict; values parse as YAML scalars."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-4), got {item!r}")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[leaf] = yaml.safe_load(text) if text else None
    return raw


def read_yaml_mapping(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing file, bad YAML or anything else is a ConfigError."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def validate_config(model: type[BaseModelT], raw: dict[str, Any], source: str) -> BaseModelT:
    """``model.model_validate(raw)``, with every problem listed in one ConfigError."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def parse_run_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    return validate_config(RunConfig, raw, source)


def load_run_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config; ``ConfigError`` lists every problem at once."""
    return parse_run_config(apply_overrides(read_yaml_mapping(path), list(overrides)), str(path))


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        elif e["type"] == "missing":
            message = "required key is missing"
        elif "input" in e and e["type"] not in ("value_error",) and not isinstance(e["input"], dict):
            message += f" (got {e['input']!r})"
        for part in message.split("; ") if where == "(top level)" else [message]:
            lines.append(f"  - {where}: {part}")
    return f"{source}: {len(lines)} problem(s):\n" + "\n".join(lines)


__all__ = [
    "ConfigError",
    "RunConfig",
    "TrainConfig",
    "RunSection",
    "ProcessorSection",
    "MlflowSection",
    "load_run_config",
    "parse_run_config",
    "apply_overrides",
    "redact_params",
    "resolve_model_config",
]
