"""Manifest reading (JSON, JSONL, Parquet) and storage config hygiene. No Ray, no servers."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dragonfly_platform.manifest import ManifestFormatError, read_manifest, write_jsonl
from dragonfly_platform.storage import StorageConfig, join

RECORDS = [
    {
        "id": "a",
        "image": "img/a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}],
    },
    {"id": 7, "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    # A record the pipeline must skip (no conversations) is still a manifest record, not a format error.
    {"id": "c", "image": "img/c.png", "conversations": []},
]


def _expect_records(records):
    assert [r.id for r in records] == ["a", "7", "c"]
    assert [r.image for r in records] == ["img/a.png", None, "img/c.png"]
    assert [r.has_image for r in records] == [True, False, True]
    assert records[0].conversations == RECORDS[0]["conversations"]
    assert records[2].conversations == []


def test_jsonl_round_trip(tmp_path):
    path = str(tmp_path / "m.jsonl")
    write_jsonl(RECORDS, path)
    records = read_manifest(path)
    _expect_records(records)
    assert [r.line for r in records] == [1, 2, 3]


def test_json_array(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    _expect_records(read_manifest(str(path)))


def test_parquet_file_and_folder_of_shards(tmp_path):
    turns = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    schema = pa.schema([("id", pa.string()), ("image", pa.string()), ("conversations", turns)])
    rows = [{**r, "id": str(r["id"]), "image": r.get("image")} for r in RECORDS]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "m.parquet")
    _expect_records(read_manifest(str(tmp_path / "m.parquet")))

    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2], schema=schema), shards / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:], schema=schema), shards / "part-1.parquet")
    _expect_records(read_manifest(str(shards)))


def test_parquet_with_conversations_as_json_text(tmp_path):
    rows = [{"id": "x", "image": "i.png", "conversations": json.dumps(RECORDS[0]["conversations"])}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    (record,) = read_manifest(str(tmp_path / "m.parquet"))
    assert record.conversations == RECORDS[0]["conversations"]


def test_missing_id_falls_back_to_the_manifest_position(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"image": "x.png", "conversations": []}) + "\n")
    assert read_manifest(str(path))[0].id == "m.jsonl:1"


def test_a_csv_is_not_a_manifest_and_the_error_names_the_first_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("id,image,question\n1,a.png,what\n2,b.png,why\n")
    with pytest.raises(ManifestFormatError) as err:
        read_manifest(str(path))
    assert [line for line, _ in err.value.problems] == [1, 2, 3]
    assert "line 1: not JSON" in str(err.value)


def test_format_errors_are_collected_with_their_line_numbers(tmp_path):
    lines = [json.dumps(r) for r in RECORDS]
    lines.insert(1, "{broken json")
    lines.insert(3, json.dumps(["a", "list"]))
    lines.append(json.dumps({"question": "no llava fields"}))
    lines.append(json.dumps({"id": "multi", "image": ["a.png", "b.png"], "conversations": []}))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestFormatError) as err:
        read_manifest(str(path))
    assert [line for line, _ in err.value.problems] == [2, 4, 6, 7]
    message = str(err.value)
    assert "line 2: not JSON" in message and "line 4: expected a record object, got list" in message
    assert (
        "line 6: no conversations or image field" in message and "line 7: 'image' must be one path" in message
    )


def test_json_that_is_not_an_array(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"data": RECORDS}))
    with pytest.raises(ManifestFormatError, match="expected a JSON array"):
        read_manifest(str(path))


def test_parquet_without_llava_columns(tmp_path):
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestFormatError, match="no conversations or image column"):
        read_manifest(str(tmp_path / "m.parquet"))


def test_an_empty_manifest_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n")
    with pytest.raises(ManifestFormatError, match="no records"):
        read_manifest(str(path))


def test_missing_manifest_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_manifest(str(tmp_path / "nope.jsonl"))


def test_storage_config_never_shows_secrets(monkeypatch):
    config = StorageConfig(
        endpoint_url="http://127.0.0.1:9", access_key="AKIA-visible?", secret_key="s3cr3t-value"
    )
    for text in (
        repr(config),
        str(config),
        json.dumps(config.model_dump(mode="json")),
        str(config.model_dump()),
    ):
        assert "s3cr3t-value" not in text and "AKIA-visible?" not in text
    assert config._credentials()[:2] == ("AKIA-visible?", "s3cr3t-value")
    # Unset fields come from the environment of the process that opens the file system.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.1:8333")
    assert StorageConfig()._credentials()[0] == "from-env"
    assert StorageConfig().resolved_endpoint() == "http://10.0.0.1:8333"
    with pytest.raises(ValueError, match="extra"):
        StorageConfig(endpoint="typo")


def test_join_keeps_absolute_paths_and_urls():
    assert join("s3://bucket/images/", "a/b.png") == "s3://bucket/images/a/b.png"
    assert join("/data", "a.png") == "/data/a.png"
    assert join("/data", "/abs/a.png") == "/abs/a.png"
    assert join("/data", "s3://other/a.png") == "s3://other/a.png"
