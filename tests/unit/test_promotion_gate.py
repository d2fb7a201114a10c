"""The promotion gate and the pyfunc input decoding (no servers)."""

import base64
import math

import pandas as pd
import pytest
from pydantic import ValidationError

from dragonfly_platform.registry import (
    GateConfig,
    LockHolder,
    PromotionError,
    decode_image_cell,
    decode_messages_cell,
    gate,
)

GATE = GateConfig(thresholds={"exact_match": 0.5}, max_regression={"exact_match": 0.02, "token_f1": 0.05})


def test_first_model_is_judged_on_thresholds_only():
    decision = gate({"exact_match": 0.5, "token_f1": 0.1}, None, GATE)
    assert decision.passed
    assert decision.reasons == [
        "exact_match 0.5000 >= threshold 0.5000",
        "no champion yet: no regression check",
    ]


def test_threshold_failure_refuses_and_names_the_metric():
    decision = gate({"exact_match": 0.49, "token_f1": 0.9}, None, GATE)
    assert not decision.passed
    assert decision.reasons[0] == "exact_match 0.4900 < threshold 0.5000"


def test_regression_within_tolerance_passes_and_beyond_it_refuses():
    champion = {"exact_match": 0.80, "token_f1": 0.70}
    within = gate({"exact_match": 0.78, "token_f1": 0.65}, champion, GATE)  # both exactly at the edge
    assert within.passed, within.summary
    beyond = gate({"exact_match": 0.90, "token_f1": 0.6499}, champion, GATE)
    assert not beyond.passed
    assert beyond.reasons[0] == "token_f1 0.7000 -> 0.6499 (regressed beyond tolerance 0.0500)"
    # Passing checks are kept after the failed ones, so the tag tells the whole story.
    assert "exact_match 0.8000 -> 0.9000 (within tolerance 0.0200)" in beyond.reasons[1:]


def test_better_on_every_metric_passes():
    assert gate({"exact_match": 0.9, "token_f1": 0.9}, {"exact_match": 0.6, "token_f1": 0.6}, GATE).passed


def test_nan_score_fails_both_checks():
    decision = gate({"exact_match": math.nan, "token_f1": 0.7}, {"exact_match": 0.6, "token_f1": 0.6}, GATE)
    assert not decision.passed
    assert [r.split()[0] for r in decision.reasons[:2]] == ["exact_match", "exact_match"]


def test_a_champion_without_a_score_does_not_block_every_challenger():
    decision = gate({"exact_match": 0.6, "token_f1": 0.2}, {"exact_match": 0.6, "token_f1": math.nan}, GATE)
    assert decision.passed, decision.summary
    assert "token_f1: the champion has no score (nan): no regression check" in decision.reasons


def test_metric_missing_from_the_evaluation_is_an_error():
    with pytest.raises(PromotionError, match=r"\['token_f1'\].*champion's evaluation"):
        gate({"exact_match": 0.9, "token_f1": 0.9}, {"exact_match": 0.6}, GATE)
    with pytest.raises(PromotionError, match=r"\['exact_match'\].*challenger's"):
        gate({"vqa_accuracy": 0.9}, None, GATE)


def test_gate_config_rejects_empty_and_negative_tolerances():
    with pytest.raises(ValidationError, match="at least one metric"):
        GateConfig()
    with pytest.raises(ValidationError, match=r"negative for \['bleu_4'\]"):
        GateConfig(max_regression={"bleu_4": -0.1})
    # Counts are not scores: "n_errors >= 5" would pass the worst challenger.
    with pytest.raises(ValidationError, match=r"\['n_errors'\] count samples"):
        GateConfig(thresholds={"n_errors": 5})


def test_image_cells_decode_bytes_base64_and_missing():
    png = b"\x89PNG\r\n\x1a\n-not-really"
    assert decode_image_cell(png, 0) == png
    assert decode_image_cell(base64.b64encode(png).decode(), 0) == png
    assert decode_image_cell(None, 0) is None
    assert decode_image_cell("", 0) is None and decode_image_cell(b"", 0) is None  # text-only in JSON
    assert decode_image_cell(pd.Series([None, 1.0])[0], 0) is None  # pandas turns a missing cell into NaN
    with pytest.raises(ValueError, match="row 3: 'image' is text but not base64"):
        decode_image_cell("not base64!", 3)
    with pytest.raises(ValueError, match="row 1: 'image' must be bytes"):
        decode_image_cell(42, 1)


def test_message_cells_accept_lists_and_json_text():
    messages = [{"role": "user", "content": "What number is written?"}]
    assert decode_messages_cell(messages, 0) == messages
    assert decode_messages_cell('[{"from": "human", "value": "Hi"}]', 0) == [{"from": "human", "value": "Hi"}]
    with pytest.raises(ValueError, match="row 2: 'messages' is text but not JSON"):
        decode_messages_cell("What number is written?", 2)
    with pytest.raises(ValueError, match="row 0: 'messages' must be a list of message objects"):
        decode_messages_cell('{"role": "user"}', 0)


def test_unreadable_lock_tag_counts_as_stale():
    assert LockHolder.from_json(None) is None
    held = LockHolder(owner="host:1:abc", since=123.5, action="rollback")
    assert LockHolder.from_json(held.to_json()) == held
    assert LockHolder.from_json("garbage").since == 0.0
