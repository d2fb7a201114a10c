"""Ray Tune sweeps: a search space over run-config keys, one Ray Train run per trial.

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

Each trial is a small driver function (the Train V2 pattern: ``Tuner(trainer)`` is gone) that
builds a ``TorchTrainer`` for its resolved run config and forwards the trainer's validation reports
to Tune, where ASHA can stop it. The sweep driver owns the MLflow parent run; each trial's training
run is its child. At the end the parent run gets the results table (CSV + JSON) and a plot of the
metric against image tokens and against TFLOPs per image with the Pareto front marked (the paper's
Tables 7/8 as a picture).

Everything that can be checked before launching is: every finite combination of the space is
resolved into a run config and validated, so a bad value fails the sweep upfront, naming the trial.
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
from dragonfly.config import LEVELS, ConfigError
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
EXACT_MATCH = "val_exact_match"
# Numbers a trial's validation reports: ASHA's clock.
VALIDATION_ROUND = "validation_round"
# Set by a trial's last report, after its training finished (ASHA-stopped trials never send it).
COMPLETE = "trial_complete"
# MLflow tags: the parent run is found again by the sweep folder when a sweep resumes.
SWEEP_DIR_TAG = "dragonfly.sweep_dir"
ROLE_TAG = "dragonfly.sweep_role"


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
    train.checkpoint_every``); rungs lie at or below it, and trials that pass them all finish."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: Annotated[int, Field(gt=0)] = 1
    max_t: Annotated[int, Field(gt=0)] = 100
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0

    @model_validator(mode="after")
    def _grace_within_budget(self):
        if self.grace_period > self.max_t:
            raise ValueError(f"grace_period={self.grace_period} exceeds max_t={self.max_t}")
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


# -- resources --------------------------------------------------------------------------------


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """Logical resources one trial holds while it trains: its driver and its Train workers."""
    need = {"CPU": DRIVER_CPUS + cfg.run.num_workers * cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        need["GPU"] = float(cfg.run.num_workers)
    return need


def data_task_cpus(cfg: RunConfig) -> float:
    """CPUs the largest Ray Data task of a trial's pipeline asks for (tokenize, or fetch + crop). One
    such task must always be able to start, or every trial waits for data forever, showing no error."""
    return max(cfg.data.tokenize_num_cpus, cfg.data.preprocess_num_cpus)


def derive_max_concurrent_trials(cluster: dict[str, float], configs: list[RunConfig]) -> int:
    """How many trials fit side by side, sized by the hungriest trial, with room left for one data
    task. A trial that cannot fit at all is an error: Train would wait for its workers forever."""
    reserve = max(data_task_cpus(cfg) for cfg in configs)
    free = {**cluster, "CPU": cluster.get("CPU", 0.0) - reserve}
    fits = []
    for cfg in configs:
        need = trial_resources(cfg)
        for resource, amount in need.items():
            if free.get(resource, 0.0) + 1e-9 < amount:
                raise ConfigError(
                    f"trial {cfg.run.name} needs {amount:g} {resource} ({cfg.run.num_workers} worker(s) "
                    f"and its driver) besides {reserve:g} CPU for data tasks; the cluster "
                    f"has {cluster.get(resource, 0):g}: lower run.num_workers / run.cpus_per_worker / "
                    "data.*_num_cpus"
                )
        fits.append(min(math.floor(free[r] / amount + 1e-9) for r, amount in need.items()))
    return max(1, min(fits))


# -- results: table, Pareto front, plot -------------------------------------------------------


def pareto_front(costs: list[float], values: list[float], mode: str) -> list[bool]:
    """Which points no other point beats: lower-or-equal cost and better-or-equal value, strictly
    better in one. Points without a value (NaN: a trial that never validated) are never on it."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [(c, sign * v) for c, v in zip(costs, values, strict=True)]
    front = []
    for i, (cost, score) in enumerate(scored):
        if math.isnan(score):
            front.append(False)
            continue
        dominated = any(
            j != i and not math.isnan(s) and c <= cost and s >= score and (c < cost or s > score)
            for j, (c, s) in enumerate(scored)
        )
        front.append(not dominated)
    return front


def mark_pareto(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Add ``pareto_tokens`` / ``pareto_tflops`` (front against each cost) to each row."""
    values = [_number(row.get(metric)) for row in rows]
    for cost, column in ((IMAGE_TOKENS, "pareto_tokens"), (TFLOPS, "pareto_tflops")):
        front = pareto_front([float(row[cost]) for row in rows], values, mode)
        for row, on_front in zip(rows, front, strict=True):
            row[column] = on_front
    return rows


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def trial_label(row: dict[str, Any], keys: list[str]) -> str:
    """``levels=L+M medium=36`` from the searched keys' last segments (keys a trial lacks skipped)."""
    parts = []
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, list | tuple):
            text = "+".join(v[0].upper() if v in LEVELS else str(v) for v in value)
        else:
            text = _short(value)
        parts.append(f"{key.rsplit('.', 1)[-1]}={text}")
    return " ".join(parts)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_results(
    rows: list[dict[str, Any]], searched_keys: list[str], metric: str, mode: str, out_dir: str | os.PathLike
) -> dict[str, Path]:
    """``results.csv``, ``results.json`` and ``pareto.png`` in ``out_dir``; rows get Pareto flags."""
    import csv
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = mark_pareto(rows, metric, mode)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    paths = {"csv": out / "results.csv", "json": out / "results.json", "png": out / "pareto.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, list | tuple | dict) else v for k, v in row.items()}
            )
    paths["json"].write_text(
        json.dumps({"metric": metric, "mode": mode, "trials": rows}, indent=2, default=str)
    )
    plot_pareto(rows, searched_keys, metric, mode, paths["png"])
    return paths


def plot_pareto(
    rows: list[dict[str, Any]], searched_keys: list[str], metric: str, mode: str, path: str | os.PathLike
) -> None:
    """Two panels, metric against image tokens and against TFLOPs per image; the front is a line
    through the starred points, every point labelled with its searched values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, cost, column, xlabel in (
        (axes[0], IMAGE_TOKENS, "pareto_tokens", "image tokens per image"),
        (axes[1], TFLOPS, "pareto_tflops", "TFLOPs per image (appendix F)"),
    ):
        points = [
            (float(r[cost]), _number(r.get(metric)), r)
            for r in rows
            if not math.isnan(_number(r.get(metric)))
        ]
        ax.scatter([x for x, _, _ in points], [y for _, y, _ in points], color="tab:blue", label="trial")
        front = sorted((x, y) for x, y, r in points if r[column])
        if front:
            ax.plot(
                *zip(*front, strict=True), color="tab:red", marker="*", markersize=14, label="Pareto front"
            )
        for x, y, row in points:
            ax.annotate(
                trial_label(row, searched_keys), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(f"{metric} against image cost, {len(rows)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- exact match on the validation split ------------------------------------------------------


def exact_match_on_val(cfg: RunConfig, max_samples: int) -> dict[str, float]:
    """Greedy answers of the trial's export on the first ``max_samples`` validation records, scored
    by exact match (the evaluation job's Ray Data batch inference, one replica on the CPUs the
    trial's workers just released)."""
    from dragonfly_platform.evaluate import EvalConfig, evaluate_model

    eval_cfg = EvalConfig(
        data=cfg.data.val_manifest,
        image_root=cfg.data.image_root,
        storage=cfg.data.storage,
        task="exact",
        limit=max_samples,
        replicas=1,
        num_cpus=cfg.run.num_workers * cfg.run.cpus_per_worker,
        num_gpus=1 if cfg.run.use_gpu else 0,
    )
    metrics = evaluate_model(
        cfg.export_dir(), eval_cfg, tracking_uri=cfg.tracking_uri(), log_to="none"
    ).metrics
    return {
        EXACT_MATCH: metrics["exact_match"],
        "val_exact_match_samples": metrics["n_samples"] - metrics["n_errors"],
    }


# -- one trial --------------------------------------------------------------------------------


def _report_callback(metric: str, extra: dict[str, float]):
    """Ray Train -> Tune: forward rank 0's validation reports (with ``metric``) numbered by
    ``VALIDATION_ROUND``, plus ``extra``. Reports without the metric would fail Tune's strict metric
    check (and mean nothing to ASHA)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReportCallback(TuneReportCallback):
        rounds = 0

        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                self.rounds += 1
                first = {**metrics[0], **extra, VALIDATION_ROUND: self.rounds}
                super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ValidationReportCallback()


def run_trial(
    config: dict[str, Any],
    *,
    sweep: SweepConfig,
    base_raw: dict[str, Any],
    sweep_dir: str,
    parent_run_id: str,
) -> None:
    """Tune's function trainable: the driver of one trial's Ray Train run.

    The trial's training run folder is ``<sweep_dir>/trials/<trial_id>``: a retried or resumed trial
    finds its Train checkpoint and its MLflow child run there (both keyed by that folder)."""
    from ray import tune

    from dragonfly_platform.train import build_trainer, prepare_run

    context = tune.get_context()
    overrides = trial_overrides(config)
    cfg = resolve_trial_config(
        base_raw, sweep, overrides, trial_name=context.get_trial_id(), sweep_dir=sweep_dir
    )
    budget = image_budget(cfg)
    prepared = prepare_run(cfg)  # finds or creates the trial's MLflow run
    _adopt_child_run(cfg, prepared.mlflow_run_id, parent_run_id, context.get_trial_name(), overrides, budget)
    trainer = build_trainer(cfg, callbacks=[_report_callback(sweep.metric, budget)], prepared=prepared)
    result = trainer.fit()
    final = {
        **budget,
        sweep.metric: result.metrics.get(sweep.metric),
        "mlflow_run_id": prepared.mlflow_run_id,
        COMPLETE: 1,
    }
    if sweep.exact_match_samples:
        scores = exact_match_on_val(cfg, sweep.exact_match_samples)
        _client(cfg).log_batch(
            prepared.mlflow_run_id, metrics=_metric_entities(scores, result.metrics.get("step", 0))
        )
        final.update(scores)
    tune.report(final)


def _client(cfg: RunConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri())


def _metric_entities(metrics: dict[str, float], step: int) -> list:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]


def _adopt_child_run(cfg, run_id, parent_run_id, trial_name, overrides, budget) -> None:
    """Make the trial's training run a child of the sweep's run, with the trial's point as params."""
    from mlflow.entities import Param, RunTag

    client = _client(cfg)
    logged = client.get_run(run_id).data.params
    params = {f"sweep.{key}": _param_text(value) for key, value in overrides.items()}
    params.update({IMAGE_TOKENS: str(budget[IMAGE_TOKENS]), TFLOPS: f"{budget[TFLOPS]:.4f}"})
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in params.items() if k not in logged],
        tags=[
            RunTag("mlflow.parentRunId", parent_run_id),
            RunTag("mlflow.runName", trial_name),
            RunTag(ROLE_TAG, "trial"),
        ],
        metrics=_metric_entities(budget, 0),
    )


def _param_text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


# -- the sweep --------------------------------------------------------------------------------


def _find_or_create_parent(sweep: SweepConfig, probe: RunConfig, sweep_dir: str) -> str:
    """The sweep's MLflow parent run, keyed by the sweep folder so a resumed sweep reuses it."""
    from dragonfly_platform.tracking import resolve_mlflow_run

    client = _client(probe)
    experiment = client.get_experiment_by_name(probe.mlflow.experiment)
    if experiment is not None:
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{SWEEP_DIR_TAG}` = '{sweep_dir}' and tags.`{ROLE_TAG}` = 'sweep'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
    # The training helper's resolver creates the experiment with the right artifact root; the
    # parent is keyed by the sweep folder, which no training run uses.
    run_id = resolve_mlflow_run(
        _with(probe, "run", name=sweep.name, storage_path=sweep_dir.rsplit("/", 1)[0])
    )
    tags = {
        SWEEP_DIR_TAG: sweep_dir,
        ROLE_TAG: "sweep",
        "mlflow.runName": sweep.name,
        "mlflow.source.name": "jobs/sweep.py",
    }
    client.log_batch(run_id, tags=_tags(tags))
    client.log_batch(run_id, params=_params(sweep_params(sweep)))
    return run_id


def _with(cfg: RunConfig, section: str, **fields) -> RunConfig:
    """``cfg`` with some fields of one section replaced (configs are frozen)."""
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=fields)})


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def _params(params: dict[str, str]) -> list:
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in params.items()]


def sweep_params(sweep: SweepConfig) -> dict[str, str]:
    """The parent run's params: how the sweep searches (the space as one JSON param)."""
    import json

    space = [{key: dim.model_dump(exclude_none=True) for key, dim in s.items()} for s in sweep.search]
    params = {
        "sweep.base": Path(sweep.base).name,
        "sweep.algorithm": sweep.algorithm,
        "sweep.num_samples": str(sweep.num_samples),
        "sweep.metric": sweep.metric,
        "sweep.mode": sweep.mode,
        "sweep.search": json.dumps(space),
        "sweep.overrides": json.dumps(sweep.overrides, default=str),
    }
    if sweep.scheduler:
        params["sweep.scheduler"] = json.dumps(sweep.scheduler.model_dump())
    return params


def _search_alg(sweep: SweepConfig):
    if sweep.algorithm != "bayesian":
        return None  # Tune's default: grid points x samples, sampled axes drawn at random
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=sweep.seed)


def _scheduler(sweep: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler is None or sweep.scheduler.type == "fifo":
        return FIFOScheduler()
    s = sweep.scheduler
    return ASHAScheduler(
        # Rounds count validation reports only: the trial's last report (exact match, after
        # training) has none, so ASHA never cuts a trial between its training and that report.
        # One past max_t: a trial with max_t reports finishes instead of being capped at its last.
        time_attr=VALIDATION_ROUND,
        grace_period=s.grace_period,
        max_t=s.max_t + 1,
        reduction_factor=s.reduction_factor,
    )


def run_sweep(sweep: SweepConfig, cluster_resources: dict[str, float] | None = None):
    """Validate every trial config, then run (or resume) the sweep and publish its results.

    Returns ``(rows, paths)``: one row per trial and the local result files. Needs ``ray.init``."""
    import ray
    from ray import tune

    base_raw = load_base(sweep)
    sweep_dir = sweep_storage_dir(sweep, base_raw)
    configs = validate_sweep(sweep, base_raw)
    # One tracking store for the whole sweep, where jobs/train.py logs the same recipe: the embedded
    # sqlite default would otherwise follow each trial's run folder.
    tracking_uri = _with(
        configs[0], "run", storage_path=sweep_dir.removesuffix(f"/sweeps/{sweep.name}")
    ).tracking_uri()
    probe = _with(configs[0], "mlflow", tracking_uri=tracking_uri)
    sweep = sweep.model_copy(update={"overrides": {**sweep.overrides, "mlflow.tracking_uri": tracking_uri}})
    cluster = cluster_resources or ray.cluster_resources()
    concurrent = (
        derive_max_concurrent_trials(cluster, configs)
        if sweep.max_concurrent_trials == "auto"
        else sweep.max_concurrent_trials
    )
    parent_run_id = _find_or_create_parent(sweep, probe, sweep_dir)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, sweep=sweep, base_raw=base_raw, sweep_dir=sweep_dir, parent_run_id=parent_run_id
        ),
        {"CPU": DRIVER_CPUS},
    )
    storage_root, name = sweep_dir.rsplit("/", 1)
    if tune.Tuner.can_restore(sweep_dir):
        print(f"[sweep {sweep.name}] resuming from {sweep_dir}", flush=True)
        tuner = tune.Tuner.restore(
            sweep_dir, trainable=trainable, resume_errored=True, param_space=build_param_space(sweep)
        )
    else:
        print(
            f"[sweep {sweep.name}] {len(configs)} trial configs valid; up to {concurrent} at once", flush=True
        )
        tuner = tune.Tuner(
            trainable,
            param_space=build_param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                num_samples=sweep.num_samples,
                search_alg=_search_alg(sweep),
                scheduler=_scheduler(sweep),
                max_concurrent_trials=concurrent,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_root,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            ),
        )
    grid = tuner.fit()
    rows = result_rows(grid, sweep)
    paths = publish_results(sweep, probe, parent_run_id, rows, sweep_dir)
    return rows, paths


def result_rows(grid, sweep: SweepConfig) -> list[dict[str, Any]]:
    """One row per trial: its searched values, image cost, last metrics and how it ended."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        row = {
            "trial_id": metrics.get("trial_id") or Path(result.path).name,
            "status": "error" if result.error else ("complete" if metrics.get(COMPLETE) else "stopped_early"),
            "reports": _validation_rounds(result),
            **trial_overrides(result.config),
            IMAGE_TOKENS: metrics.get(IMAGE_TOKENS),
            TFLOPS: metrics.get(TFLOPS),
            sweep.metric: metrics.get(sweep.metric),
            EXACT_MATCH: metrics.get(EXACT_MATCH),
            "mlflow_run_id": metrics.get("mlflow_run_id"),
        }
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def _validation_rounds(result) -> int:
    history = result.metrics_dataframe
    if history is None or VALIDATION_ROUND not in history:
        return 0
    return int(history[VALIDATION_ROUND].max())


def publish_results(
    sweep: SweepConfig, probe: RunConfig, parent_run_id: str, rows, sweep_dir: str
) -> dict[str, Path]:
    """Results table + plot into ``<sweep_dir>/results`` (or a temp folder for s3) and onto the parent
    run; trials ASHA stopped are closed as KILLED (their actors died mid-run)."""
    import tempfile

    client = _client(probe)
    for row in rows:
        if row["mlflow_run_id"] and row["status"] != "complete":
            client.set_tag(row["mlflow_run_id"], "sweep.status", row["status"])
            client.set_terminated(
                row["mlflow_run_id"], status="KILLED" if row["status"] == "stopped_early" else "FAILED"
            )
    scored = [row for row in rows if row[IMAGE_TOKENS] is not None]
    out_dir = (
        f"{sweep_dir}/results" if "://" not in sweep_dir else tempfile.mkdtemp(prefix="dragonfly-sweep-")
    )
    keys = searched_keys(sweep)
    paths = write_results(scored, keys, sweep.table_metric, sweep.table_mode, out_dir)
    client.log_artifacts(parent_run_id, out_dir, "results")
    values = [_number(r.get(sweep.table_metric)) for r in scored]
    finite = [v for v in values if not math.isnan(v)]
    summary = {"trials": len(rows), "trials_complete": sum(r["status"] == "complete" for r in rows)}
    if finite:
        summary[f"best_{sweep.table_metric}"] = max(finite) if sweep.table_mode == "max" else min(finite)
    client.log_batch(parent_run_id, metrics=_metric_entities(summary, 0))
    client.set_terminated(parent_run_id, status="FINISHED")
    return paths


def searched_keys(sweep: SweepConfig) -> list[str]:
    return list(dict.fromkeys(key for space in sweep.search for key in space))


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
    "trial_resources",
    "derive_max_concurrent_trials",
    "data_task_cpus",
    "pareto_front",
    "mark_pareto",
    "write_results",
    "plot_pareto",
    "exact_match_on_val",
    "run_trial",
    "run_sweep",
    "result_rows",
    "publish_results",
    "searched_keys",
    "sweep_params",
]
