"""A sweep's results: the table (CSV + JSON) and the plot of the metric against image tokens and
against TFLOPs per image, with the Pareto front marked (the paper's Tables 7/8 as a picture)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from dragonfly.config import LEVELS
from dragonfly_platform.sweep_config import IMAGE_TOKENS, TFLOPS


def pareto_front(costs: list[float], values: list[float], mode: str) -> list[bool]:
    """Which points no other point beats: lower-or-equal cost and better-or-equal value, strictly
    better in one. Points without a value (NaN: a trial that never validated) or a cost (NaN: a
    config that could not be built) are never on it."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [(c, sign * v) for c, v in zip(costs, values, strict=True)]
    front = []
    for i, (cost, score) in enumerate(scored):
        if math.isnan(score) or math.isnan(cost):
            front.append(False)
            continue
        dominated = any(
            j != i and not math.isnan(s + c) and c <= cost and s >= score and (c < cost or s > score)
            for j, (c, s) in enumerate(scored)
        )
        front.append(not dominated)
    return front


def mark_pareto(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Add ``pareto_tokens`` / ``pareto_tflops`` (front against each cost) to each row."""
    values = [number_or_nan(row.get(metric)) for row in rows]
    for cost, column in ((IMAGE_TOKENS, "pareto_tokens"), (TFLOPS, "pareto_tflops")):
        front = pareto_front([number_or_nan(row.get(cost)) for row in rows], values, mode)
        for row, on_front in zip(rows, front, strict=True):
            row[column] = on_front
    return rows


def number_or_nan(value) -> float:
    """``value`` as a float; NaN for a missing or non-numeric one (a trial that never validated)."""
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
            (number_or_nan(r.get(cost)), number_or_nan(r.get(metric)), r)
            for r in rows
            if not math.isnan(number_or_nan(r.get(metric)) + number_or_nan(r.get(cost)))
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


__all__ = ["pareto_front", "mark_pareto", "number_or_nan", "trial_label", "write_results", "plot_pareto"]
