"""The paper's data curation recipe (appendix B) as a Ray Data job.

1. Read every source's LLaVA manifest (JSON / JSONL / Parquet, local or ``s3://``).
2. Hash each image's bytes (sha256; concurrent reads in Ray tasks). Unreadable images, and records
   whose ``conversations`` is not a list of turns, are dropped, counted ("unreadable") and listed in
   ``<output>/_bad_records.jsonl`` (reasons ``missing_file``, ``unreadable_file``, ``bad_conversations``).
3. Deduplicate image-instruction pairs: key = image hash + normalised instruction (the user turns,
   lowercased, ``<image>`` removed, whitespace collapsed). The copy kept is the one from the source
   listed first, then the earliest manifest line, so duplicates across sources (SVIT and ShareGPT4V
   share images) are dropped from the later source.
4. Cap instructions per image per source (``max_per_image``; the paper keeps 8 for SVIT), chosen at
   random with the job's seed.
5. Weight sources: a source keeps ``weight * n`` (rounded half up) of its ``n`` records (weight < 1 subsamples,
   > 1 repeats records; repeats get ``#rep<k>`` id suffixes).
6. Mix in text-only sources (deduplicated the same way) so that they make up ``text_only_ratio`` of
   the output.
7. Write Parquet shards (``id``, ``image`` as a full path/URL, ``conversations`` as a list of
   ``{from, value}`` structs (chat-format turns keep their role as ``from``), ``source``) to a local folder or ``s3://`` prefix, readable by
   ``dragonfly_platform.manifest.read_manifest`` (with no ``image_root``), plus
   ``_curation_report.json`` with the per-source counts. Files starting with ``_`` are ignored by
   Parquet readers.

Every random choice derives from ``sha256(seed, ...)`` of the record, so the output does not depend
on block boundaries, task scheduling or the number of CPUs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dragonfly.processor import turn_fields
from dragonfly_platform.manifest import read_manifest
from dragonfly_platform.storage import (
    RECORD_READ_ERRORS,
    StorageConfig,
    join,
    parent,
    read_error_reason,
    strip_scheme,
)

TURNS = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
OUTPUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", pa.string()), ("conversations", TURNS), ("source", pa.string())]
)
USER_ROLES = {"human", "user"}
STAGES = ("read", "unreadable", "after_dedup", "after_cap", "output")


class CurationSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    manifest: str
    image_root: str | None = None  # None: the manifest's folder
    weight: float = Field(default=1.0, ge=0)
    max_per_image: int | None = Field(default=None, ge=1)


class TextOnlySource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    manifest: str


class CurationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[CurationSource]
    text_only: list[TextOnlySource] = Field(default_factory=list)
    # Share of text-only records in the output (0.1: one in ten).
    text_only_ratio: float = Field(default=0.0, ge=0, lt=1)
    output: str
    storage: StorageConfig = Field(default_factory=StorageConfig)
    seed: int = 0
    rows_per_shard: int = 50_000
    hash_threads: int = 16

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sources] + [s.name for s in self.text_only]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:  # each source is weighted and counted by its name
            raise ValueError(f"source names must be unique; repeated: {repeated}")
        return self


def normalize_instruction(conversations: Any) -> str:
    """The user turns of a conversation, each lowercased, ``<image>`` removed and whitespace
    collapsed, one per line (collapsing first keeps ["a b"] and ["a", "b"] apart)."""
    if not isinstance(conversations, list):
        return ""
    texts = [
        str(text or "")
        for speaker, text in map(turn_fields, conversations)
        if isinstance(speaker, str) and speaker in USER_ROLES
    ]
    return "\n".join(re.sub(r"\s+", " ", text.replace("<image>", " ").lower()).strip() for text in texts)


def unit_random(seed: int, *parts: Any) -> float:
    """A uniform number in [0, 1) fixed by ``seed`` and ``parts`` (no global RNG state)."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# ---------------------------------------------------------------------------------------------
# Ray stages


def hash_images(batch: pd.DataFrame, *, storage: StorageConfig, threads: int) -> pd.DataFrame:
    """Add ``image_sha256`` (None for text-only rows) and ``unreadable`` (the error, if any)."""
    urls = batch["image"].tolist()
    digests: list[str | None] = [None] * len(urls)
    errors: list[str | None] = [None] * len(urls)

    def digest(i: int) -> None:
        try:
            digests[i] = hashlib.sha256(storage.read_bytes(urls[i])).hexdigest()
        except RECORD_READ_ERRORS as err:
            errors[i] = f"{read_error_reason(err)}: {err}"

    wanted = [i for i, url in enumerate(urls) if url is not None]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(wanted)))) as pool:
        list(pool.map(digest, wanted))  # re-raises StorageUnavailableError
    batch = batch.copy()
    batch["image_sha256"] = digests
    batch["unreadable"] = errors
    return batch


def to_output(batch: pd.DataFrame) -> pa.Table:
    rows = [
        {"id": i, "image": img, "conversations": json.loads(c), "source": s}
        for i, img, c, s in zip(
            batch["id"], batch["image"], batch["conversations_json"], batch["source"], strict=False
        )
    ]
    for row in rows:
        # The two LLaVA fields per turn, so every shard has one schema; chat-format turns
        # ({"role", "content"}) keep their role as the speaker, which the processor accepts.
        row["conversations"] = [
            dict(zip(("from", "value"), turn_fields(t), strict=True)) for t in row["conversations"]
        ]
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


# ---------------------------------------------------------------------------------------------
# The job


def _records(config: CurationConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(image rows, text-only rows, malformed rows): a record whose ``conversations`` is not a list of
    turns is kept out of the output (where it would fail the shard write) and listed as bad."""
    image_rows, text_rows, malformed = [], [], []
    for rank, source in enumerate(config.sources):
        root = source.image_root if source.image_root is not None else parent(source.manifest)
        for record in read_manifest(source.manifest, config.storage):
            row = _row(record, source.name, rank)
            if record.has_image:
                row["image"] = join(root, record.image)
            if problem := _bad_conversations(record.conversations):
                malformed.append({**row, "unreadable": problem})
            elif record.has_image:
                image_rows.append(row)
            else:
                text_rows.append(row)  # text-only records inside image sources join the text pool
    for rank, source in enumerate(config.text_only, start=len(config.sources)):
        for record in read_manifest(source.manifest, config.storage):
            if record.has_image:
                raise ValueError(f"text-only source {source.name}: record {record.id} has an image")
            row = _row(record, source.name, rank)
            if problem := _bad_conversations(record.conversations):
                malformed.append({**row, "unreadable": problem})
            else:
                text_rows.append(row)
    return image_rows, text_rows, malformed


def _bad_conversations(conversations: Any) -> str | None:
    """``"bad_conversations: ..."`` unless ``conversations`` is a list of turns (dicts)."""
    if isinstance(conversations, list) and all(isinstance(turn, dict) for turn in conversations):
        return None
    return f"bad_conversations: expected a list of turns, got {json.dumps(conversations)[:80]}"


ROW_COLUMNS = ["id", "image", "conversations_json", "source", "source_rank", "line", "instruction"]


def _row(record, source: str, rank: int) -> dict:
    return {
        "id": record.id,
        "image": None,
        "conversations_json": json.dumps(record.conversations),
        "source": source,
        "source_rank": rank,
        "line": record.line,
        "instruction": normalize_instruction(record.conversations),
    }


def _dedup(df: pd.DataFrame) -> pd.DataFrame:
    """One record per (image hash, normalised instruction): the first-listed source's, then the
    earliest line's."""
    return df.sort_values(["source_rank", "line"], kind="stable").drop_duplicates(
        ["image_sha256", "instruction"]
    )


def _cap_per_image(df: pd.DataFrame, caps: dict[str, int], seed: int) -> pd.DataFrame:
    """At most ``caps[source]`` records per image of each source, chosen at random with ``seed``."""
    if not caps or df.empty:
        return df
    order = [unit_random(seed, "cap", s, line) for s, line in zip(df["source"], df["line"], strict=True)]
    ranked = df.assign(_order=order).sort_values("_order", kind="stable")
    rank_in_image = ranked.groupby(["source", "image_sha256"]).cumcount()
    limit = ranked["source"].map(caps).fillna(np.inf)
    return ranked[rank_in_image < limit].drop(columns="_order").sort_values(["source_rank", "line"])


def _resample(df: pd.DataFrame, target: int, seed: int, purpose: str) -> pd.DataFrame:
    """Exactly ``target`` rows: whole repeats of ``df``, then a seeded random subset of the rest.
    Repeats get ``#rep<k>`` id suffixes so ids stay unique."""
    if df.empty or target <= 0:
        return df.iloc[:0]
    full, rest = divmod(target, len(df))
    order = np.argsort(
        [unit_random(seed, purpose, s, line) for s, line in zip(df["source"], df["line"], strict=True)],
        kind="stable",
    )
    parts = [df] + [df.assign(id=df["id"] + f"#rep{k}") for k in range(1, full)]
    if rest:
        extra = df.iloc[np.sort(order[:rest])]
        parts.append(extra if full == 0 else extra.assign(id=extra["id"] + f"#rep{full}"))
    return pd.concat(parts[1:] if full == 0 else parts, ignore_index=True)


def _round_half_up(x: float) -> int:
    # Python's round() goes to even on halves: weight 0.5 on one record would keep none.
    return math.floor(x + 0.5)


def run_curation(config: CurationConfig) -> dict[str, Any]:
    """Run the recipe; returns ``{"counts": {source: {stage: n}}, "output": path, "n_output": n}``.

    Image bytes are read and hashed by Ray tasks; the decisions (dedup, caps, weights, mix) are made
    on the records' metadata (ids, hashes, instructions: a few hundred bytes per record, so ~1 GB per
    few million records) in this process, which keeps them exact and seed-deterministic; the shards
    are written by Ray.
    """
    import ray.data

    image_rows, text_rows, malformed = _records(config)
    names = [s.name for s in config.sources] + [s.name for s in config.text_only]
    stages: dict[str, pd.Series] = {}

    images = pd.DataFrame(image_rows, columns=[*ROW_COLUMNS, "image_sha256", "unreadable"])
    if image_rows:
        hashed = ray.data.from_items(image_rows).map_batches(
            hash_images,
            fn_kwargs={"storage": config.storage, "threads": config.hash_threads},
            batch_format="pandas",
            batch_size=64,
        )
        images = hashed.to_pandas()
    bad = pd.concat(
        [images[images["unreadable"].notna()], pd.DataFrame(malformed, columns=images.columns)],
        ignore_index=True,
    )
    images = images[images["unreadable"].isna()].drop(columns="unreadable")
    text = pd.DataFrame(text_rows, columns=ROW_COLUMNS).assign(image_sha256="")

    stages["read"] = pd.concat([images["source"], bad["source"], text["source"]]).value_counts()
    stages["unreadable"] = bad["source"].value_counts()
    images, text = _dedup(images), _dedup(text)
    stages["after_dedup"] = pd.concat([images["source"], text["source"]]).value_counts()
    images = _cap_per_image(
        images, {s.name: s.max_per_image for s in config.sources if s.max_per_image}, config.seed
    )
    stages["after_cap"] = pd.concat([images["source"], text["source"]]).value_counts()

    weighted = [
        _resample(part, _round_half_up(source.weight * len(part)), config.seed, f"weight:{source.name}")
        for source in config.sources
        for part in [images[images["source"] == source.name]]
    ]
    images = pd.concat(weighted, ignore_index=True) if weighted else images.iloc[:0]
    # text / (images + text) = ratio  ->  text = ratio / (1 - ratio) * images
    n_text = _round_half_up(config.text_only_ratio / (1 - config.text_only_ratio) * len(images))
    text = _resample(text, n_text, config.seed, "text_only")
    output = pd.concat([images, text], ignore_index=True)
    if output.empty:
        raise ValueError("curation produced no records; check the sources' weights and text_only_ratio")
    stages["output"] = output["source"].value_counts()

    ray.data.from_pandas(output[["id", "image", "conversations_json", "source"]]).map_batches(
        to_output, batch_format="pandas", batch_size=config.rows_per_shard
    ).write_parquet(
        strip_scheme(config.output),
        filesystem=config.storage.pyarrow_filesystem(config.output),
        min_rows_per_file=config.rows_per_shard,
        max_rows_per_file=config.rows_per_shard,
        mode=ray.data.SaveMode.OVERWRITE,
    )
    counts = {name: {stage: int(stages[stage].get(name, 0)) for stage in STAGES} for name in names}
    report = {"output": config.output, "n_output": len(output), "seed": config.seed, "counts": counts}
    # After the Parquet write: its overwrite mode clears the folder first.
    _write_bad_records(config, bad.to_dict("records"))
    _write_json(config, "_curation_report.json", report)
    return report


def format_counts(report: dict[str, Any]) -> str:
    """The per-source before/after table."""
    header = f"{'source':<24}" + "".join(f"{s:>13}" for s in STAGES)
    lines = [header, "-" * len(header)]
    totals = dict.fromkeys(STAGES, 0)
    for name, counts in report["counts"].items():
        lines.append(f"{name:<24}" + "".join(f"{counts[s]:>13}" for s in STAGES))
        for s in STAGES:
            totals[s] += counts[s]
    lines.append(f"{'total':<24}" + "".join(f"{totals[s]:>13}" for s in STAGES))
    return "\n".join(lines)


def _write_bad_records(config: CurationConfig, bad: list[dict]) -> None:
    lines = "".join(
        json.dumps(
            {
                "id": b["id"],
                "source": b["image"],
                "reason": b["unreadable"].partition(": ")[0],
                "dataset": b["source"],
                "message": b["unreadable"].partition(": ")[2],
            }
        )
        + "\n"
        for b in bad
    )
    _write_text(config, "_bad_records.jsonl", lines)


def _write_json(config: CurationConfig, name: str, data: dict) -> None:
    _write_text(config, name, json.dumps(data, indent=2) + "\n")


def _write_text(config: CurationConfig, name: str, text: str) -> None:
    with config.storage.open(join(config.output, name), "wb") as f:
        f.write(text.encode())


__all__ = [
    "CurationSource",
    "TextOnlySource",
    "CurationConfig",
    "normalize_instruction",
    "run_curation",
    "format_counts",
]
