"""Sweep recipes: the YAML schema, its search space, and every trial's run config resolved and
validated before anything launches.

A sweep YAML names a training recipe (``base``), overrides applied to every trial, and a search space
over dotted run-config keys (``model.tokens.tokens.medium``, ``model.zoom.levels``, ``train.lr``)::

    name: sweep_pooling
    base: stage1.yaml                 # relative to this file
    overrides: {train.max_steps: 200}
    search:                           # one space, or a list of spaces (their union)
      - model.zoom.levels: {grid: [[low, medium]]}
        model.tokens.tokens.medium: {grid: [576, 144, 64, 36, 16]}
      - model.zoom.levels: {grid: [[low, high]]}
        model.tokens.tokens.high: {grid: [64, 36, 16, 9]}
    algorithm: grid                   # grid | random | bayesian (Optuna's TPE)
    scheduler: {type: asha, grace_period: 1, max_t: 8}

Everything that can be checked before launching is: every finite combination of the space is
resolved into a run config and validated, so a bad value fails the sweep upfront, naming the trial.
Also here: what a trial holds on the cluster, and so how many fit side by side.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dragonfly.budget import config_report
from dragonfly.config import ConfigError
from dragonfly_platform.config import (
    RunConfig,
    apply_overrides,
    parse_run_config,
    read_yaml_mapping,
    validate_config,
)

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform")
# Keys the sweep itself sets for every trial (where the trial's run lives); a search may not vary
# where trials log either.
SWEEP_OWNED_KEYS = ("run.name", "run.storage_path")
UNSEARCHABLE_PREFIXES = ("run.name", "run.storage_path", "mlflow.")
# The trial function only launches and watches its Ray Train run; Tune rejects 0 CPUs.
DRIVER_CPUS = 0.01
# Tune config key holding one point of the (union of) grids.
GRID_KEY = "grid_point"
# Metrics every trial reports besides the training loop's own.
IMAGE_TOKENS = "image_tokens"
TFLOPS = "tflops_per_image"


# -- the sweep config -------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchDim(_Section):
    """One axis of a search space: exactly one of ``grid``/``choice`` (values) or
    ``uniform``/``loguniform`` (``[low, high]``)."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [kind for kind in SEARCH_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {SEARCH_KINDS}, got {given or 'none'}")
        values = self.grid if self.grid is not None else self.choice
        if values is not None and not values:
            raise ValueError(f"{self.kind} needs at least one value")
        bounds = self.uniform or self.loguniform
        if bounds is not None:
            low, high = bounds
            if not low < high:
                raise ValueError(f"{self.kind} needs low < high, got {list(bounds)}")
            if self.loguniform is not None and low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in SEARCH_KINDS if getattr(self, kind) is not None)

    @property
    def sampled(self) -> bool:
        return self.kind != "grid"

    def finite_values(self) -> list[Any]:
        """Values that cover the axis for validation: all listed values, or both bounds."""
        return list(getattr(self, self.kind))

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(self.choice)
        if self.kind == "uniform":
            return tune.uniform(*self.uniform)
        if self.kind == "loguniform":
            return tune.loguniform(*self.loguniform)
        raise ConfigError("grid axes are expanded into grid points, not sampled")


Space = dict[str, SearchDim]


class SchedulerSection(_Section):
    """ASHA: a trial is stopped at rung ``grace_period * reduction_factor**k`` (counted in validation
    reports) when its metric is outside the best ``1/reduction_factor`` of the trials that reached
    that rung. ``max_t``: the validation reports of a full trial (``train.max_steps /
    train.checkpoint_every``); rungs lie strictly below it (a trial is never cut at the report that
    ends its training), and trials that pass them all finish."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: Annotated[int, Field(gt=0)] = 1
    max_t: Annotated[int, Field(gt=0)] = 100
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0

    @model_validator(mode="after")
    def _grace_within_budget(self):
        if self.grace_period >= self.max_t:
            raise ValueError(
                f"grace_period={self.grace_period} must be below max_t={self.max_t}: the first cut "
                "comes before a trial's last validation"
            )
        return self


class SweepConfig(_Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    # The training recipe every trial starts from (a run-config YAML), relative to the sweep file.
    base: str
    # Dotted run-config keys set for every trial, e.g. {train.max_steps: 8}.
    overrides: dict[str, Any] = {}
    # One space or a list of spaces; a list searches their union (e.g. L+M x tokens, L+H x tokens).
    search: list[Space]
    algorithm: Literal["grid", "random", "bayesian"] = "grid"
    # Repeats of the grid (grid/random) or number of trials (bayesian).
    num_samples: Annotated[int, Field(gt=0)] = 1
    seed: int | None = None
    # What ASHA and the search algorithm optimise; every validation report carries it.
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSection | None = None
    # "auto": as many as the cluster's CPUs (and GPUs) fit (`derive_max_concurrent_trials`).
    max_concurrent_trials: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    # Retries of a failed trial (its Train run resumes from its latest checkpoint); -1: forever.
    max_failures: Annotated[int, Field(ge=-1)] = 1
    # Where the sweep lives (<storage_path>/<name>); default: the base recipe's run.storage_path.
    storage_path: str | None = None
    # The results table/plot rank trials by this metric (default: `metric`/`mode`).
    report_metric: str | None = None
    report_mode: Literal["min", "max"] | None = None
    # Validation records each finished trial answers greedily for exact match (0: skip).
    exact_match_samples: Annotated[int, Field(ge=0)] = 32

    @field_validator("search", mode="before")
    @classmethod
    def _one_space_is_a_list_of_one(cls, value):
        return [value] if isinstance(value, dict) else value

    @field_validator("search")
    @classmethod
    def _spaces_not_empty(cls, spaces):
        if not spaces or any(not space for space in spaces):
            raise ValueError("search needs at least one space with at least one key")
        return spaces

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        for key in self.overrides:
            if key in SWEEP_OWNED_KEYS:
                problems.append(f"overrides: {key!r} is set by the sweep for each trial (its run folder)")
        for key in dict.fromkeys(k for space in self.search for k in space):
            if key.startswith(UNSEARCHABLE_PREFIXES):
                problems.append(
                    f"search: {key!r} cannot vary between trials (run folder and MLflow are the sweep's)"
                )
        sampled = [_sampled_axes(space) for space in self.search]
        if any(s != sampled[0] for s in sampled):
            problems.append(
                "sampled axes (choice/uniform/loguniform) must be the same in every space of a union; "
                "only grid axes may differ"
            )
        if self.algorithm == "grid" and sampled[0]:
            problems.append(
                f"algorithm 'grid' takes only grid axes; {sorted(sampled[0])} are sampled (use 'random')"
            )
        if self.algorithm == "bayesian":
            grids = sorted({k for space in self.search for k, dim in space.items() if not dim.sampled})
            if grids:
                problems.append(
                    f"algorithm 'bayesian' proposes every value itself: make {grids} 'choice' axes "
                    "(and use a single space)"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def table_metric(self) -> str:
        return self.report_metric or self.metric

    @property
    def table_mode(self) -> str:
        return self.report_mode or ("max" if self.report_metric else self.mode)


def _sampled_axes(space: Space) -> dict[str, SearchDim]:
    return {key: dim for key, dim in space.items() if dim.sampled}


def load_sweep_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read a sweep YAML (``--set`` overrides apply to the sweep's own keys, e.g. ``num_samples=4``)."""
    raw = _apply_sweep_overrides(read_yaml_mapping(path, "sweep config"), overrides)
    if isinstance(raw.get("base"), str):
        raw["base"] = str((Path(path).parent / raw["base"]).resolve())
    return validate_config(SweepConfig, raw, str(path))


def _apply_sweep_overrides(raw: dict[str, Any], overrides) -> dict[str, Any]:
    # Sweep keys are one level deep except `overrides`/`scheduler`, whose dotted keys stay whole:
    # `overrides.train.max_steps=4` sets raw["overrides"]["train.max_steps"].
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. num_samples=4), got {item!r}")
        section, dot, rest = key.partition(".")
        value = yaml.safe_load(text) if text else None
        if dot:
            raw.setdefault(section, {})[rest] = value
        else:
            raw[key] = value
    return raw


# -- spaces -> trials -------------------------------------------------------------------------


def grid_points(spaces: list[Space]) -> list[dict[str, Any]]:
    """The union, in order, of each space's cartesian product of grid axes (``[{}]`` when no space
    has a grid axis)."""
    points: list[dict[str, Any]] = []
    for space in spaces:
        grid = {key: dim.grid for key, dim in space.items() if not dim.sampled}
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values, strict=True))
            if point not in points:
                points.append(point)
    return points


def build_param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's ``param_space``: grid points under ``GRID_KEY`` plus the sampled axes, each under its
    dotted key."""
    from ray import tune

    space = {key: dim.to_tune() for key, dim in _sampled_axes(sweep.search[0]).items()}
    points = grid_points(sweep.search)
    if points != [{}]:
        space[GRID_KEY] = tune.grid_search(points)
    return space


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's Tune config -> its dotted run-config overrides."""
    flat = {key: value for key, value in config.items() if key != GRID_KEY}
    return {**config.get(GRID_KEY, {}), **flat}


def validation_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every finite combination the sweep can produce: grid points x every choice x both bounds of
    each continuous axis."""
    sampled = _sampled_axes(sweep.search[0])
    combos = [
        dict(zip(sampled, values, strict=True))
        for values in itertools.product(*(d.finite_values() for d in sampled.values()))
    ]
    return [{**point, **combo} for point in grid_points(sweep.search) for combo in combos]


def _as_set_items(overrides: dict[str, Any]) -> list[str]:
    # YAML's own dump keeps types on the way back (PyYAML reads "1e-05" as a string, "1.0e-05" as a float).
    return [
        f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in overrides.items()
    ]


def resolve_trial_config(
    base_raw: dict[str, Any],
    sweep: SweepConfig,
    overrides: dict[str, Any],
    *,
    trial_name: str = "validation",
    sweep_dir: str | None = None,
) -> RunConfig:
    """The run config of one trial: base recipe + sweep overrides + the trial's point, living in
    ``<sweep_dir>/trials/<trial_name>``."""
    sweep_dir = sweep_dir or sweep_storage_dir(sweep, base_raw)
    owned = {"run.name": trial_name, "run.storage_path": f"{sweep_dir}/trials"}
    raw = apply_overrides(base_raw, _as_set_items({**sweep.overrides, **overrides, **owned}))
    return parse_run_config(raw, source=f"sweep {sweep.name}, trial {overrides}")


def sweep_storage_dir(sweep: SweepConfig, base_raw: dict[str, Any]) -> str:
    root = sweep.storage_path or (base_raw.get("run") or {}).get("storage_path") or "runs"
    return f"{_absolute(root).rstrip('/')}/sweeps/{sweep.name}"


def _absolute(path: str) -> str:
    # Tune wants absolute local paths; URIs (s3://...) pass through.
    return path if "://" in path else str(Path(path).resolve())


def image_budget(cfg: RunConfig) -> dict[str, float]:
    """Image tokens and forward TFLOPs per image of a run config (the appendix-F calculator)."""
    model = cfg.dragonfly_config()
    if model is None:
        raise ConfigError("a sweep needs a `model` section in its base recipe to count image tokens")
    report = config_report(model.zoom, model.tokens)
    return {IMAGE_TOKENS: report["image_tokens"], TFLOPS: report["total_flops"] / 1e12}


def vision_grid_side(model) -> int:
    """Side of the vision tower's patch-token grid, read from its open_clip config (no weights built)."""
    import open_clip

    config = model.vision.model_config or open_clip.get_model_config(model.vision.model_name)
    if config is None:
        raise ConfigError(f"model.vision.model_name {model.vision.model_name!r} is not an open_clip model")
    vision = config["vision_cfg"]
    return vision["image_size"] // vision["patch_size"]


def check_trial_model(cfg: RunConfig) -> None:
    """What only building the model would reveal: mean pooling needs each enabled level's k*k
    tokens to tile the tower's token grid (24x24 for ViT-L/14-336: 576/144/64/36/16/9)."""
    model = cfg.dragonfly_config()
    if model is not None and model.pooling == "mean":
        side = vision_grid_side(model)
        for level in model.zoom.levels:
            model.tokens.pool_stride(level, side)


def validate_sweep(sweep: SweepConfig, base_raw: dict[str, Any]) -> list[RunConfig]:
    """Resolve and validate every finite point of the space; ``ConfigError`` names each bad one."""
    resolved, problems = [], []
    for point in validation_points(sweep):
        try:
            cfg = resolve_trial_config(base_raw, sweep, point)
            if not cfg.data.val_manifest or not cfg.train.eval_batches:
                raise ConfigError("every trial validates: set data.val_manifest and train.eval_batches > 0")
            check_trial_model(cfg)
            image_budget(cfg)
        except ConfigError as err:
            problems.append(f"trial {point}:\n{err}")
            continue
        resolved.append(cfg)
    if problems:
        shown = problems[:5]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise ConfigError(
            f"sweep {sweep.name}: {len(problems)} of {len(problems) + len(resolved)} trial configs are invalid:\n"
            + "\n".join(shown)
            + more
        )
    return resolved


def load_base(sweep: SweepConfig) -> dict[str, Any]:
    try:
        with open(sweep.base) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"sweep {sweep.name}: base recipe {sweep.base} does not exist") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{sweep.base}: expected a mapping of sections")
    return raw


def searched_keys(sweep: SweepConfig) -> list[str]:
    return list(dict.fromkeys(key for space in sweep.search for key in space))


# -- resources --------------------------------------------------------------------------------


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """Logical resources one trial holds while it trains: its driver, its Train workers and, with
    ``data.preprocess_pool: actors``, its ranks' preprocessing pools (held for a whole epoch)."""
    from dragonfly_platform.data import actor_pool_cpus

    workers = cfg.run.num_workers * cfg.run.cpus_per_worker
    need = {"CPU": DRIVER_CPUS + workers + actor_pool_cpus(cfg.data, cfg.run.num_workers)}
    if cfg.run.use_gpu:
        need["GPU"] = float(cfg.run.num_workers)
    return need


def derive_max_concurrent_trials(cluster: dict[str, float], configs: list[RunConfig]) -> int:
    """How many trials fit side by side, sized by the hungriest trial, with room left for one data
    task. A trial that cannot fit at all is an error: Train would wait for its workers forever."""
    # One preprocessing task (tokenize + fetch + crop) must always be able to start, or every trial
    # waits for data forever, showing no error.
    reserve = max(cfg.data.preprocess_num_cpus for cfg in configs)
    free = {**cluster, "CPU": cluster.get("CPU", 0.0) - reserve}
    fits = []
    for cfg in configs:
        need = trial_resources(cfg)
        for resource, amount in need.items():
            if free.get(resource, 0.0) + 1e-9 < amount:
                raise ConfigError(
                    f"trial {cfg.run.name} needs {amount:g} {resource} ({cfg.run.num_workers} worker(s), "
                    f"their preprocessing actor pools if any, and its driver) besides {reserve:g} CPU "
                    f"for data tasks; the cluster has {cluster.get(resource, 0):g} now: lower run.num_workers / run.cpus_per_worker / "
                    "data.preprocess_num_cpus, or, on a cluster that autoscales, set max_concurrent_trials to "
                    "the number that fits its largest size"
                )
        fits.append(min(math.floor(free[r] / amount + 1e-9) for r, amount in need.items()))
    return max(1, min(fits))


__all__ = [
    "SearchDim",
    "SchedulerSection",
    "SweepConfig",
    "load_sweep_config",
    "grid_points",
    "build_param_space",
    "trial_overrides",
    "validation_points",
    "resolve_trial_config",
    "sweep_storage_dir",
    "image_budget",
    "validate_sweep",
    "load_base",
    "searched_keys",
    "trial_resources",
    "derive_max_concurrent_trials",
]
