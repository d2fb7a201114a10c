"""The curation job (paper appendix B) on a dataset with planted duplicates, on real Ray and S3."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dragonfly_platform.curation import (
    CurationConfig,
    CurationSource,
    TextOnlySource,
    _cap_per_image,
    format_counts,
    normalize_instruction,
    run_curation,
)
from dragonfly_platform.manifest import read_manifest
from dragonfly_platform.storage import StorageConfig


def _ask(question: str, answer: str = "An answer.", image: bool = True) -> list[dict]:
    return [
        {"from": "human", "value": f"<image>\n{question}" if image else question},
        {"from": "gpt", "value": answer},
    ]


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("curation")
    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"img{k}.png")
    # Same bytes under another name: the same image as far as dedup is concerned.
    (root / "img0_copy.png").write_bytes((root / "img0.png").read_bytes())

    svit = [
        {
            "id": f"svit-{k}",
            "image": "img0.png",
            "conversations": _ask(f"Question number {k} about this picture?"),
        }
        for k in range(12)
    ]
    svit += [
        # Duplicate of svit-3 once normalised (case, spacing, marker position), on the copied file.
        {
            "id": "svit-dup-copy",
            "image": "img0_copy.png",
            "conversations": [
                {"from": "human", "value": "question number 3   about this picture? <image>"},
                {"from": "gpt", "value": "Another answer."},
            ],
        },
        {"id": "svit-colour", "image": "img1.png", "conversations": _ask("What colour dominates?")},
        {"id": "svit-colour-dup", "image": "img1.png", "conversations": _ask("WHAT colour\tdominates?")},
        {"id": "svit-describe", "image": "img1.png", "conversations": _ask("Describe it.")},
        {"id": "svit-missing", "image": "nope.png", "conversations": _ask("Where is it?")},
        # Not a list of turns: listed as bad, not a crash of the shard write.
        {"id": "svit-malformed", "image": "img2.png", "conversations": None},
        # The chat format: its turns keep their text, the role becomes the speaker.
        {
            "id": "svit-chat",
            "image": "img2.png",
            "conversations": [
                {"role": "user", "content": "<image>\nName the object."},
                {"role": "assistant", "content": "A cube."},
            ],
        },
    ]
    share = [
        {
            "id": "share-colour",
            "image": "img1.png",
            "conversations": _ask("What colour dominates?"),
        },  # svit has it
        *[
            {"id": f"share-count-{k}", "image": f"img{k}.png", "conversations": _ask("Count the objects.")}
            for k in (2, 3, 4)
        ],
        {"id": "share-count-2-dup", "image": "img2.png", "conversations": _ask("Count the objects.")},
    ]
    text = [
        {"id": f"text-{k}", "conversations": _ask(f"What is {k} plus 1?", str(k + 1), image=False)}
        for k in range(8)
    ]
    text += [
        {"id": "text-dup-a", "conversations": _ask("what is 0   plus 1?", "1", image=False)},
        {"id": "text-dup-b", "conversations": _ask("WHAT IS 5 PLUS 1?", "6", image=False)},
    ]
    return {
        "root": str(root),
        "svit": _write(root / "svit.jsonl", svit),
        "share": _write(root / "share.jsonl", share),
        "text": _write(root / "text.jsonl", text),
    }


def _config(planted, output: str, storage: StorageConfig | None = None, seed: int = 0) -> CurationConfig:
    return CurationConfig(
        sources=[
            CurationSource(name="svit", manifest=planted["svit"], weight=1.0, max_per_image=8),
            CurationSource(name="share", manifest=planted["share"], weight=2.0),
        ],
        text_only=[TextOnlySource(name="text", manifest=planted["text"])],
        text_only_ratio=0.2,
        output=output,
        storage=storage or StorageConfig(),
        seed=seed,
        rows_per_shard=7,
    )


EXPECTED_COUNTS = {
    # read, unreadable, after_dedup, after_cap, output
    "svit": {"read": 19, "unreadable": 2, "after_dedup": 15, "after_cap": 11, "output": 11},
    "share": {"read": 5, "unreadable": 0, "after_dedup": 3, "after_cap": 3, "output": 6},  # weight 2
    # 20% of the output: 17 image records -> 4.25 text-only ones, 4.
    "text": {"read": 10, "unreadable": 0, "after_dedup": 8, "after_cap": 8, "output": 4},
}


def test_source_names_must_be_unique():
    """Weights and counts go by name: a repeated name doubled its records under duplicate ids."""
    with pytest.raises(ValueError, match=r"repeated: \['svit'\]"):
        CurationConfig(
            sources=[
                CurationSource(name="svit", manifest="a.jsonl"),
                CurationSource(name="svit", manifest="b.jsonl"),
            ],
            output="out",
        )


def test_instruction_normalisation():
    assert normalize_instruction(_ask("  What   IS\tthis? ")) == "what is this?"
    assert normalize_instruction([{"from": "gpt", "value": "x"}]) == ""
    assert normalize_instruction("not a list") == ""
    two_turns = _ask("What is") + _ask("this?", image=False)
    assert normalize_instruction(two_turns) != normalize_instruction(_ask("What is this?"))


def test_the_cap_choice_depends_on_the_seed_only():
    group = pd.DataFrame(
        {
            "source": "s",
            "image_sha256": "h",
            "line": range(12),
            "source_rank": 0,
            "id": [str(i) for i in range(12)],
        }
    )
    picks = {seed: tuple(sorted(_cap_per_image(group, {"s": 8}, seed)["line"])) for seed in (0, 1, 2)}
    assert all(len(p) == 8 for p in picks.values())
    assert len(set(picks.values())) > 1
    shuffled = group.sample(frac=1, random_state=3)
    assert tuple(sorted(_cap_per_image(shuffled, {"s": 8}, 0)["line"])) == picks[0]


def test_dedup_caps_weights_and_mix_on_planted_duplicates(ray_cluster, s3_server, planted, tmp_path):
    report = run_curation(_config(planted, str(tmp_path / "out")))
    assert report["counts"] == EXPECTED_COUNTS, format_counts(report)
    assert report["n_output"] == 21
    assert "svit" in format_counts(report) and "total" in format_counts(report)

    records = read_manifest(str(tmp_path / "out"))
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)) == 21
    # Dedup: the later duplicates are gone, the first-listed copy stays.
    assert "svit-3" in ids and "svit-dup-copy" not in ids
    assert "svit-colour" in ids and "svit-colour-dup" not in ids and "share-colour" not in ids
    assert {"text-dup-a", "text-dup-b"}.isdisjoint(ids)
    # Cap: 8 of the 12 instructions on img0; weights: share's 3 records twice each.
    assert sum(r.has_image and r.image.endswith("img0.png") for r in records) == 8
    assert Counter(i.split("#")[0] for i in ids if i.startswith("share")) == {
        f"share-count-{k}": 2 for k in (2, 3, 4)
    }
    assert sum(not r.has_image for r in records) == 4
    # Full image paths, LLaVA conversations.
    assert all(r.image is None or r.image.startswith(planted["root"]) for r in records)
    assert records[0].conversations[0]["from"] == "human"
    (chat,) = [r for r in records if r.id == "svit-chat"]
    assert chat.conversations == [
        {"from": "user", "value": "<image>\nName the object."},
        {"from": "assistant", "value": "A cube."},
    ]
    bad = [json.loads(line) for line in (tmp_path / "out" / "_bad_records.jsonl").read_text().splitlines()]
    assert sorted((b["id"], b["reason"]) for b in bad) == [
        ("svit-malformed", "bad_conversations"),
        ("svit-missing", "missing_file"),
    ]

    # The same recipe written to S3 gives the same records.
    storage = StorageConfig(
        endpoint_url=s3_server.endpoint_url, access_key=s3_server.access_key, secret_key=s3_server.secret_key
    )
    s3_report = run_curation(_config(planted, "s3://test-bucket/curated", storage=storage))
    assert s3_report["counts"] == EXPECTED_COUNTS
    from_s3 = read_manifest("s3://test-bucket/curated", storage)
    assert sorted((r.id, r.image) for r in from_s3) == sorted((r.id, r.image) for r in records)
