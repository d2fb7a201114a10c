"""LLaVA manifests: JSON, JSONL and Parquet, local or ``s3://``.

A record is ``{"id", "image"?, "conversations": [{"from", "value"}, ...]}``; text-only records have
no ``image`` (or ``null``). Parquet manifests have the same columns (``conversations`` as a list of
structs or a JSON string) and may be one file or a folder / prefix of shards, which is what
``jobs/prepare_data.py`` writes.

Manifests are text and small next to their images, so ``read_manifest`` reads one whole on the
caller. It separates two kinds of trouble:

- a file that is not a manifest at all (not JSON, not objects, no LLaVA fields) raises
  ``ManifestFormatError`` naming the first offending lines, before any image is touched;
- a record that is a manifest record but cannot become a sample (no conversations, unknown role,
  empty answer, ...) is left for the pipeline, which skips it, counts it and writes it to the
  bad-records file. The conversation rules live in one place, ``dragonfly.processor``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from dragonfly_platform.storage import StorageConfig, is_s3, strip_scheme

# Fields a row must have at least one of to look like a LLaVA record.
LLAVA_FIELDS = ("conversations", "image")
MAX_PROBLEMS_SHOWN = 5


class ManifestFormatError(ValueError):
    """The manifest is not LLaVA JSON/JSONL/Parquet; ``problems`` lists ``(line, what)`` pairs."""

    def __init__(self, path: str, problems: list[tuple[int, str]], total: int | None = None):
        self.path = path
        self.problems = problems
        total = total if total is not None else len(problems)
        shown = "\n".join(f"  line {line}: {what}" for line, what in problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {total - MAX_PROBLEMS_SHOWN} more" if total > MAX_PROBLEMS_SHOWN else ""
        super().__init__(
            f"{path} is not a LLaVA manifest (JSON array, JSONL or Parquet of records with "
            f"'id', 'image', 'conversations'); first offending lines:\n{shown}{more}"
        )


@dataclass(frozen=True)
class ManifestRecord:
    """One manifest row. ``line`` is the 1-based line (JSONL), element (JSON) or row (Parquet)."""

    id: str
    image: str | None
    conversations: Any  # validated by the processor in the pipeline, not here
    line: int

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def to_row(self) -> dict[str, Any]:
        """Arrow-friendly form for Ray Data (conversations as JSON text: nested, ragged structs
        make brittle Arrow schemas)."""
        return {
            "id": self.id,
            "image": self.image,
            "conversations_json": json.dumps(self.conversations),
            "line": self.line,
        }


def read_manifest(path: str, storage: StorageConfig | None = None) -> list[ManifestRecord]:
    """All records of a manifest; raises ``ManifestFormatError`` if it is not one."""
    storage = storage or StorageConfig()
    kind = _manifest_kind(path, storage)
    if kind == "parquet":
        rows = enumerate(_parquet_rows(path, storage), start=1)
    else:
        with storage.open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        rows = _json_rows(path, text) if kind == "json" else _jsonl_rows(path, text)

    records, problems = [], []
    stem = os.path.basename(path.rstrip("/"))
    for line, row in rows:
        problem = _row_problem(row)
        if problem:
            problems.append((line, problem))
            continue
        records.append(_record(row, line, stem))
    if problems:
        raise ManifestFormatError(path, problems)
    if not records:
        raise ManifestFormatError(path, [(0, "no records")])
    return records


def _manifest_kind(path: str, storage: StorageConfig) -> str:
    lower = path.lower().rstrip("/")
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".jsonl"):
        return "jsonl"
    if lower.endswith(".json"):
        return "json"
    fs = storage.filesystem(path)
    if fs.isdir(strip_scheme(path) if is_s3(path) else path):
        return "parquet"  # a folder / prefix of shards
    with storage.open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    return "json" if head.lstrip().startswith(b"[") else "jsonl"


@dataclass(frozen=True)
class _Unparsable:
    problem: str


def _jsonl_rows(path: str, text: str) -> Iterator[tuple[int, Any]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as err:
            yield line_no, _Unparsable(f"not JSON ({err.msg}): {_preview(line)}")


def _json_rows(path: str, text: str) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestFormatError(path, [(err.lineno, f"not JSON ({err.msg})")]) from None
    if not isinstance(data, list):
        raise ManifestFormatError(path, [(1, f"expected a JSON array of records, got {type(data).__name__}")])
    yield from enumerate(data, start=1)


def _parquet_rows(path: str, storage: StorageConfig) -> Iterator[dict]:
    try:
        table = pq.read_table(strip_scheme(path), filesystem=storage.pyarrow_filesystem(path))
    except FileNotFoundError:
        raise
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        raise ManifestFormatError(path, [(0, f"not Parquet ({err})")]) from None
    missing = [f for f in LLAVA_FIELDS if f not in table.column_names]
    if len(missing) == len(LLAVA_FIELDS):
        raise ManifestFormatError(path, [(0, f"no {' or '.join(LLAVA_FIELDS)} column: {table.column_names}")])
    yield from table.to_pylist()


def _row_problem(row: Any) -> str | None:
    if isinstance(row, _Unparsable):
        return row.problem
    if not isinstance(row, dict):
        return f"expected a record object, got {type(row).__name__}: {_preview(json.dumps(row, default=str))}"
    if not any(f in row for f in LLAVA_FIELDS):
        return f"no {' or '.join(LLAVA_FIELDS)} field; keys: {sorted(row)[:8]}"
    image = row.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if image is not None and not (isinstance(image, str) and image):
        return f"'image' must be one path (string), got {_preview(json.dumps(image, default=str))}"
    return None


def _record(row: dict, line: int, stem: str) -> ManifestRecord:
    image = row.get("image")
    if isinstance(image, list):
        image = image[0]
    conversations = row.get("conversations")
    if isinstance(conversations, str):
        # Parquet writers that flatten nested columns store the turns as JSON text.
        # Undecodable text stays as is: the processor reports it as a bad record.
        with contextlib.suppress(json.JSONDecodeError):
            conversations = json.loads(conversations)
    record_id = row.get("id")
    # Ids are optional in some LLaVA sets; the manifest position identifies the record then.
    record_id = str(record_id) if record_id not in (None, "") else f"{stem}:{line}"
    return ManifestRecord(id=record_id, image=image, conversations=conversations, line=line)


def write_jsonl(records: list[dict], path: str, storage: StorageConfig | None = None) -> None:
    """Write LLaVA records as JSONL (local or ``s3://``)."""
    storage = storage or StorageConfig()
    buffer = io.StringIO()
    for record in records:
        buffer.write(json.dumps(record) + "\n")
    if not is_s3(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with storage.open(path, "wb") as f:
        f.write(buffer.getvalue().encode("utf-8"))


def _preview(text: str, width: int = 80) -> str:
    text = text.strip()
    return text if len(text) <= width else text[: width - 3] + "..."


__all__ = ["ManifestFormatError", "ManifestRecord", "read_manifest", "write_jsonl"]
