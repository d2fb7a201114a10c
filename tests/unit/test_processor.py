"""dragonfly.processor: chat rendering, image block, labels, truncation, collate; dragonfly.tiny's
tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dragonfly.budget import DRAGONFLY_PRESETS, image_token_layout
from dragonfly.config import TokenConfig, ZoomConfig
from dragonfly.processor import IGNORE_INDEX, IMAGE_TOKEN, DragonflyProcessor, RecordError, collate
from dragonfly.tiny import LLAMA3_STYLE_CHAT_TEMPLATE, build_tiny_tokenizer

EOT = "<|eot_id|>"
# A small layout keeps sequences short where the exact block size does not matter: 1 low crop of
# 4 tokens + CLS + separator = 6 positions.
SMALL_ZOOM = ZoomConfig(resolution=28, levels=("low",))
SMALL_TOKENS = TokenConfig(tokens=(("low", 4),))

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": "A red square left of a blue circle."},
    {"from": "human", "value": "How many objects are there?"},
    {"from": "gpt", "value": "There are two objects."},
    {"from": "human", "value": "Is the light on?"},
    {"from": "gpt", "value": "Yes, the light is on."},
]
ANSWERS = [m["value"] for m in CONVERSATION if m["from"] == "gpt"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def processor(tokenizer):
    return DragonflyProcessor(tokenizer, SMALL_ZOOM, SMALL_TOKENS, max_length=4096)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in a 1-D boolean mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def supervised_texts(processor: DragonflyProcessor, labels: np.ndarray) -> list[str]:
    return [processor.decode(labels[a:b]) for a, b in runs(labels != IGNORE_INDEX)]


def chat(conversation):
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": role[m["from"]], "content": m["value"]} for m in conversation]


def expanded_reference(processor: DragonflyProcessor, conversation) -> np.ndarray:
    """Tokenize the whole ``apply_chat_template`` string in one go and expand the image token."""
    text = processor.tokenizer.apply_chat_template(chat(conversation), tokenize=False)
    ids = np.asarray(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    is_image = ids == processor.image_token_id
    return np.repeat(ids, np.where(is_image, processor.layout.positions, 1))


# -- token counts and positions ---------------------------------------------------------------


LEVEL_SUBSETS = [
    ("low",),
    ("medium",),
    ("high",),
    ("low", "medium"),
    ("low", "high"),
    ("low", "medium", "high"),
]


@pytest.mark.parametrize("preset", sorted(DRAGONFLY_PRESETS))
@pytest.mark.parametrize("levels", LEVEL_SUBSETS, ids="+".join)
def test_image_block_has_the_calculators_positions(tokenizer, preset, levels):
    zoom, tokens = ZoomConfig(levels=levels), DRAGONFLY_PRESETS[preset]
    processor = DragonflyProcessor(tokenizer, zoom, tokens)
    sample = processor.encode(CONVERSATION[:2], has_image=True)
    ids = sample["input_ids"]
    positions = image_token_layout(zoom, tokens).positions
    # One contiguous run of exactly `positions` image tokens.
    ((start, stop),) = runs(ids == processor.image_token_id)
    assert stop - start == positions == (ids == processor.image_token_id).sum()
    # The rest of the sequence is the chat template's rendering, token for token.
    np.testing.assert_array_equal(ids, expanded_reference(processor, CONVERSATION[:2]))


def test_paper_presets_have_the_papers_block_sizes(tokenizer):
    full = DragonflyProcessor(tokenizer, ZoomConfig(), DRAGONFLY_PRESETS["dragonfly"])
    star = DragonflyProcessor(tokenizer, ZoomConfig(), DRAGONFLY_PRESETS["dragonfly_star"])
    # 576 + 4*36 + 36*36 pooled tokens, + 41 CLS, + 41 separators.
    assert (full.encode(CONVERSATION[:2], True)["input_ids"] == full.image_token_id).sum() == 2098
    # 64 + 4*36 + 36*16 pooled tokens, + 41 CLS, + 41 separators.
    assert (star.encode(CONVERSATION[:2], True)["input_ids"] == star.image_token_id).sum() == 866


def test_block_without_cls_or_separator(tokenizer):
    tokens = TokenConfig(tokens=(("low", 64), ("medium", 36), ("high", 16)), keep_cls=False, separator=False)
    processor = DragonflyProcessor(tokenizer, ZoomConfig(), tokens)
    ids = processor.encode(CONVERSATION[:2], True)["input_ids"]
    assert (ids == processor.image_token_id).sum() == 64 + 4 * 36 + 36 * 16


def test_multi_turn_sequence_is_the_templates_rendering(processor):
    sample = processor.encode(CONVERSATION, has_image=True)
    np.testing.assert_array_equal(sample["input_ids"], expanded_reference(processor, CONVERSATION))
    assert sample["input_ids"].dtype == np.int32 and sample["labels"].dtype == np.int32


# -- labels -----------------------------------------------------------------------------------


def test_every_answer_and_nothing_else_is_supervised(processor):
    sample = processor.encode(CONVERSATION, has_image=True)
    assert supervised_texts(processor, sample["labels"]) == [answer + EOT for answer in ANSWERS]
    supervised = sample["labels"] != IGNORE_INDEX
    np.testing.assert_array_equal(sample["labels"][supervised], sample["input_ids"][supervised])
    assert not supervised[sample["input_ids"] == processor.image_token_id].any()
    # User text tokens never carry a label.
    user_text = processor.tokenizer("How many objects are there?", add_special_tokens=False)["input_ids"]
    labels = sample["labels"].tolist()
    assert all(labels[i : i + len(user_text)] != user_text for i in range(len(labels)))


def test_answer_starts_where_the_generation_prompt_ends(processor):
    # Training and inference see the same tokens: the prompt is a prefix of the training sample and
    # supervision begins right after it.
    prompt = processor.encode_prompt(CONVERSATION[:1], has_image=True)
    sample = processor.encode(CONVERSATION[:2], has_image=True)
    np.testing.assert_array_equal(sample["input_ids"][: len(prompt)], prompt)
    assert (sample["labels"][: len(prompt)] == IGNORE_INDEX).all()
    assert (sample["labels"][len(prompt) :] != IGNORE_INDEX).all()
    assert processor.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_train_on_user_turns_never_supervises_image_positions(tokenizer):
    processor = DragonflyProcessor(tokenizer, SMALL_ZOOM, SMALL_TOKENS, train_on_user_turns=True)
    sample = processor.encode(CONVERSATION, has_image=True)
    ids, labels = sample["input_ids"], sample["labels"]
    is_image = ids == processor.image_token_id
    assert is_image.sum() == processor.layout.positions
    assert (labels[is_image] == IGNORE_INDEX).all()
    texts = supervised_texts(processor, labels)
    assert any("How many objects are there?" + EOT in t for t in texts)
    assert any("What is in the picture?" + EOT in t for t in texts)
    for answer in ANSWERS:
        assert any(answer + EOT in t for t in texts)
    # The system-free conversation's assistant headers stay unsupervised.
    assert not any("assistant" in t for t in texts)


def test_system_message_is_rendered_and_not_supervised(processor):
    conversation = [{"from": "system", "value": "Answer briefly."}, *CONVERSATION[:2]]
    sample = processor.encode(conversation, has_image=True)
    assert processor.decode(sample["input_ids"]).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
    )
    assert supervised_texts(processor, sample["labels"]) == [ANSWERS[0] + EOT]


def test_templates_with_a_default_preamble_still_give_exact_spans(tokenizer):
    # Like Llama-3.1's template, which always writes a system block (knowledge cut-off, date).
    preamble = (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: 26 Jul 2024<|eot_id|>' }}"
        "{%- endif %}"
    )
    template = LLAMA3_STYLE_CHAT_TEMPLATE.replace("{{- bos_token }}", "{{- bos_token }}" + preamble)
    tok = build_tiny_tokenizer()
    tok.chat_template = template
    processor = DragonflyProcessor(tok, SMALL_ZOOM, SMALL_TOKENS)
    sample = processor.encode(CONVERSATION, has_image=True)
    assert "Today Date: 26 Jul 2024" in processor.decode(sample["input_ids"])
    assert supervised_texts(processor, sample["labels"]) == [answer + EOT for answer in ANSWERS]
    np.testing.assert_array_equal(sample["input_ids"], expanded_reference(processor, CONVERSATION))
    # Training on user turns adds their words, never BOS, the template's preamble or the headers.
    with_users = DragonflyProcessor(tok, SMALL_ZOOM, SMALL_TOKENS, train_on_user_turns=True)
    sample = with_users.encode(CONVERSATION, has_image=True)
    texts = [m["value"].removeprefix("<image>\n") + EOT for m in CONVERSATION]
    assert supervised_texts(with_users, sample["labels"]) == texts
    np.testing.assert_array_equal(sample["input_ids"], expanded_reference(with_users, CONVERSATION))
    # The same with the released prompt, whose first user turn carries the system prompt.
    released = DragonflyProcessor(
        build_tiny_tokenizer(), SMALL_ZOOM, SMALL_TOKENS, train_on_user_turns=True, chat_template="released"
    )
    system = {"from": "system", "value": "Answer briefly."}
    assert supervised_texts(released, released.encode([system, *CONVERSATION], True)["labels"]) == texts


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    tok = build_tiny_tokenizer()
    # Renders messages newest first: a longer conversation changes the start of the text.
    tok.chat_template = (
        "{%- for m in messages | reverse %}{{ m['role'] + ':' + m['content'] + '|' }}{%- endfor %}"
    )
    with pytest.raises(ValueError, match="prefix-stable"):  # when the processor is built, not per record
        DragonflyProcessor(tok, SMALL_ZOOM, SMALL_TOKENS)


def test_turns_with_both_styles_of_keys_use_the_ones_that_are_set(processor):
    """A Parquet manifest mixing LLaVA and chat-style turns gives every turn all four keys, the
    unused ones null."""
    mixed = [
        {"from": None, "value": None, "role": "user", "content": CONVERSATION[0]["value"]},
        {"from": "gpt", "value": CONVERSATION[1]["value"], "role": None, "content": None},
    ]
    for key, value in processor.encode(CONVERSATION[:2], True).items():
        np.testing.assert_array_equal(processor.encode(mixed, True)[key], value)


def test_released_template_renders_the_released_prompt(tmp_path):
    """The released Dragonfly's layout: image block, BOS, Llama-3 turns without a system block, the
    system prompt in front of the question (processing_dragonfly.py, data.py, test_dragonfly.py)."""
    tok = build_tiny_tokenizer()
    processor = DragonflyProcessor(tok, SMALL_ZOOM, SMALL_TOKENS, chat_template="released")
    system = {"from": "system", "value": "Answer briefly."}
    sample = processor.encode([system, *CONVERSATION[:4]], has_image=True)
    head = "<|start_header_id|>user<|end_header_id|>\n\n"
    answer = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert processor.decode(sample["input_ids"]) == (
        f"<image><|begin_of_text|>{head}Answer briefly. What is in the picture?{EOT}"
        f"{answer}{ANSWERS[0]}{EOT}{head}How many objects are there?{EOT}{answer}{ANSWERS[1]}{EOT}"
    )
    ids = sample["input_ids"]
    assert (
        ids[: processor.layout.positions] == processor.image_token_id
    ).all()  # the block opens the sequence
    assert supervised_texts(processor, sample["labels"]) == [a + EOT for a in ANSWERS[:2]]
    blank_system = {"from": "system", "value": " "}  # adds nothing, not even a space
    assert processor.decode(
        processor.encode([blank_system, *CONVERSATION[:2]], True)["input_ids"]
    ).startswith(f"<image><|begin_of_text|>{head}What is in the picture?")
    prompt = processor.decode(processor.encode_prompt(chat(CONVERSATION[:1]), has_image=True))
    assert prompt == f"<image><|begin_of_text|>{head}What is in the picture?{EOT}{answer}"
    assert processor.decode(processor.encode(CONVERSATION[2:4], has_image=False)["input_ids"]).startswith(
        f"<|begin_of_text|>{head}How many"
    )
    # Saved with the processor: a later stage from the export renders the same prompt.
    processor.save_pretrained(tmp_path)
    loaded = DragonflyProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == "released"
    np.testing.assert_array_equal(
        loaded.encode(CONVERSATION[:2], True)["input_ids"],
        processor.encode(CONVERSATION[:2], True)["input_ids"],
    )


def test_released_template_refuses_an_image_after_the_first_exchange():
    processor = DragonflyProcessor(build_tiny_tokenizer(), SMALL_ZOOM, SMALL_TOKENS, chat_template="released")
    late_image = [*CONVERSATION[2:4], {"from": "human", "value": "<image>\nAnd here?"}, CONVERSATION[1]]
    with pytest.raises(RecordError, match="not prefix-stable") as err:
        processor.encode(late_image, has_image=True)
    assert err.value.reason == "template"


def test_a_conversation_the_template_refuses_is_a_bad_record():
    tok = build_tiny_tokenizer()
    # Like Gemma's template: no system role.
    refuse_system = "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
    tok.chat_template = refuse_system + LLAMA3_STYLE_CHAT_TEMPLATE
    processor = DragonflyProcessor(tok, SMALL_ZOOM, SMALL_TOKENS)
    assert supervised_texts(processor, processor.encode(CONVERSATION[:2], True)["labels"]) == [
        ANSWERS[0] + EOT
    ]
    with pytest.raises(
        RecordError, match="record r7: the chat template refused it: System role not supported"
    ) as err:
        processor.encode([{"from": "system", "value": "Be brief."}, *CONVERSATION[:2]], True, record_id="r7")
    assert err.value.reason == "template"
    tok.chat_template = "{{ raise_exception('no chat here') }}"
    with pytest.raises(ValueError, match="cannot render a plain conversation: .*no chat here"):
        DragonflyProcessor(tok, SMALL_ZOOM, SMALL_TOKENS)


# -- image marker placement -------------------------------------------------------------------


def image_context(processor: DragonflyProcessor, ids: np.ndarray) -> tuple[str, str]:
    """Decoded text right before and right after the (single) image block."""
    ((start, stop),) = runs(ids == processor.image_token_id)
    assert stop - start == processor.layout.positions
    return processor.decode(ids[:start]), processor.decode(ids[stop:])


def test_image_without_marker_goes_first_in_the_first_user_message(processor):
    conversation = [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A cat."}]
    before, after = image_context(processor, processor.encode(conversation, True)["input_ids"])
    assert before == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert after.startswith("\nDescribe it.<|eot_id|>")


def test_image_marker_stays_where_the_text_puts_it(processor):
    conversation = [{"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "A cat."}]
    before, after = image_context(processor, processor.encode(conversation, True)["input_ids"])
    assert before.endswith("user<|end_header_id|>\n\nDescribe it.\n")
    assert after.startswith("<|eot_id|><|start_header_id|>assistant")


def test_image_marker_in_a_later_user_turn(processor):
    conversation = [
        {"from": "human", "value": "Hello."},
        {"from": "gpt", "value": "Hi."},
        {"from": "human", "value": "<image>\nAnd this?"},
        {"from": "gpt", "value": "A dog."},
    ]
    sample = processor.encode(conversation, True)
    before, after = image_context(processor, sample["input_ids"])
    assert before.endswith("Hi.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    assert after.startswith("\nAnd this?")
    assert supervised_texts(processor, sample["labels"]) == ["Hi." + EOT, "A dog." + EOT]


def test_text_only_record(processor):
    conversation = [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."}]
    sample = processor.encode(conversation, has_image=False)
    assert not (sample["input_ids"] == processor.image_token_id).any()
    assert supervised_texts(processor, sample["labels"]) == ["Yes." + EOT]
    np.testing.assert_array_equal(sample["input_ids"], expanded_reference(processor, conversation))


def test_chat_format_messages_are_accepted(processor):
    messages = chat(CONVERSATION[:2])
    np.testing.assert_array_equal(
        processor.encode(messages, True)["input_ids"], processor.encode(CONVERSATION[:2], True)["input_ids"]
    )


# -- bad records ------------------------------------------------------------------------------

HUMAN, GPT = {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}
BAD_RECORDS = [
    ("no_conversations", [], True),
    ("no_conversations", None, True),
    ("bad_message", [{"from": "human"}, GPT], True),
    ("bad_message", ["hello", GPT], True),
    ("bad_message", [{"from": "human", "value": 3}, GPT], True),
    ("unknown_role", [{"from": "bot", "value": "x"}, GPT], True),
    ("turn_order", [GPT, HUMAN], True),
    ("turn_order", [HUMAN, HUMAN, GPT], True),
    ("turn_order", [HUMAN, GPT, HUMAN], True),
    ("turn_order", [HUMAN], True),
    ("turn_order", [{"from": "system", "value": "s"}], True),
    ("turn_order", [HUMAN, {"from": "system", "value": "s"}, GPT], True),
    ("empty_answer", [HUMAN, {"from": "gpt", "value": "  \n"}], True),
    ("image_marker", [{"from": "human", "value": "<image> and <image>"}, GPT], True),
    (
        "image_marker",
        [{"from": "human", "value": "<image>"}, GPT, {"from": "human", "value": "<image>"}, GPT],
        True,
    ),
    ("image_marker", [HUMAN, {"from": "gpt", "value": "<image>"}], True),
    ("image_marker", [{"from": "system", "value": "<image>"}, HUMAN, GPT], True),
    ("image_marker", [{"from": "human", "value": "<image>\nWhat?"}, GPT], False),
]


@pytest.mark.parametrize(("reason", "conversation", "has_image"), BAD_RECORDS)
def test_bad_records_raise_record_error_with_reason(processor, reason, conversation, has_image):
    with pytest.raises(RecordError) as info:
        processor.encode(conversation, has_image, record_id="rec-42")
    assert info.value.reason == reason
    assert info.value.record_id == "rec-42"
    assert "rec-42" in str(info.value) and reason in str(info.value)
    assert isinstance(info.value, ValueError)


def test_prompt_must_end_with_a_user_turn(processor):
    with pytest.raises(RecordError) as info:
        processor.encode_prompt(CONVERSATION[:2], has_image=True)
    assert info.value.reason == "turn_order"


# -- truncation -------------------------------------------------------------------------------


def test_truncation_drops_whole_later_turns(tokenizer):
    full = DragonflyProcessor(tokenizer, SMALL_ZOOM, SMALL_TOKENS)
    two_turns = full.encode(CONVERSATION[:4], True)
    everything = full.encode(CONVERSATION, True)
    # One token short of the whole conversation: the last exchange goes, whole.
    processor = DragonflyProcessor(
        tokenizer, SMALL_ZOOM, SMALL_TOKENS, max_length=len(everything["input_ids"]) - 1
    )
    sample = processor.encode(CONVERSATION, True)
    for key in ("input_ids", "labels"):
        np.testing.assert_array_equal(sample[key], two_turns[key])
    assert supervised_texts(processor, sample["labels"]) == [answer + EOT for answer in ANSWERS[:2]]


def test_truncation_keeps_the_image_block_and_first_answer(tokenizer):
    first = DragonflyProcessor(tokenizer, ZoomConfig(), DRAGONFLY_PRESETS["dragonfly"]).encode(
        CONVERSATION[:2], True
    )
    processor = DragonflyProcessor(
        tokenizer, ZoomConfig(), DRAGONFLY_PRESETS["dragonfly"], max_length=len(first["input_ids"])
    )
    sample = processor.encode(CONVERSATION, True)
    np.testing.assert_array_equal(sample["input_ids"], first["input_ids"])
    assert (sample["input_ids"] == processor.image_token_id).sum() == 2098
    assert supervised_texts(processor, sample["labels"]) == [ANSWERS[0] + EOT]


def test_too_long_when_the_first_exchange_cannot_fit(tokenizer):
    first = DragonflyProcessor(tokenizer, ZoomConfig(), DRAGONFLY_PRESETS["dragonfly"]).encode(
        CONVERSATION[:2], True
    )
    processor = DragonflyProcessor(
        tokenizer, ZoomConfig(), DRAGONFLY_PRESETS["dragonfly"], max_length=len(first["input_ids"]) - 1
    )
    with pytest.raises(RecordError, match="2098-position image block") as info:
        processor.encode(CONVERSATION, True, record_id="big")
    assert info.value.reason == "too_long"
    # The image block alone is larger than the context.
    with pytest.raises(RecordError) as info:
        DragonflyProcessor(tokenizer, ZoomConfig(), DRAGONFLY_PRESETS["dragonfly"], max_length=2000).encode(
            CONVERSATION[:2], True
        )
    assert info.value.reason == "too_long"


def test_truncation_never_drops_the_turn_with_the_image(tokenizer):
    conversation = [
        {"from": "human", "value": "Hello."},
        {"from": "gpt", "value": "Hi."},
        {"from": "human", "value": "<image>\nAnd this?"},
        {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes."},
    ]
    full = DragonflyProcessor(tokenizer, SMALL_ZOOM, SMALL_TOKENS)
    kept = full.encode(conversation[:4], True)
    processor = DragonflyProcessor(tokenizer, SMALL_ZOOM, SMALL_TOKENS, max_length=len(kept["input_ids"]))
    np.testing.assert_array_equal(processor.encode(conversation, True)["input_ids"], kept["input_ids"])
    # Room for the first exchange only is not enough: it would cut the image away.
    short = DragonflyProcessor(tokenizer, SMALL_ZOOM, SMALL_TOKENS, max_length=len(kept["input_ids"]) - 1)
    with pytest.raises(RecordError) as info:
        short.encode(conversation, True)
    assert info.value.reason == "too_long"


# -- collate ----------------------------------------------------------------------------------


def test_collate_pads_mixed_image_and_text_samples(processor):
    rng = np.random.default_rng(0)
    n_tiles, r = SMALL_ZOOM.n_tiles, SMALL_ZOOM.resolution
    pixels_a = rng.integers(0, 256, (n_tiles, 3, r, r), dtype=np.uint8)
    pixels_b = rng.integers(0, 256, (n_tiles, 3, r, r), dtype=np.uint8)
    text_only = [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."}]
    samples = [
        {**processor.encode(CONVERSATION[:2], True), "pixels": pixels_a},
        processor.encode(text_only, False),
        {**processor.encode(text_only, False), "pixels": None},
        {**processor.encode(CONVERSATION, True), "pixels": pixels_b},
    ]
    batch = collate(samples, processor.pad_token_id)
    lengths = [len(s["input_ids"]) for s in samples]
    assert (
        batch["input_ids"].shape
        == batch["labels"].shape
        == batch["attention_mask"].shape
        == (4, max(lengths))
    )
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for row, (sample, n) in enumerate(zip(samples, lengths, strict=True)):
        assert batch["input_ids"][row, :n].tolist() == sample["input_ids"].tolist()
        assert batch["labels"][row, :n].tolist() == sample["labels"].tolist()
        assert (batch["input_ids"][row, n:] == processor.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    assert batch["has_image"].tolist() == [True, False, False, True]
    assert batch["pixels"].dtype == torch.uint8
    assert batch["pixels"].shape == (2, n_tiles, 3, r, r)
    assert torch.equal(batch["pixels"][0], torch.from_numpy(pixels_a))
    assert torch.equal(batch["pixels"][1], torch.from_numpy(pixels_b))
    # One image block per image in the batch: what the model's masked scatter relies on.
    assert (batch["input_ids"] == processor.image_token_id).sum() == 2 * processor.layout.positions


def test_collate_text_only_batch_and_padding_multiple(processor):
    text_only = [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."}]
    batch = collate([processor.encode(text_only, False)], processor.pad_token_id, pad_to_multiple_of=64)
    assert "pixels" not in batch
    assert batch["input_ids"].shape[1] == 64
    assert batch["has_image"].tolist() == [False]


def test_collate_rejects_mismatched_pixels(processor):
    sample = processor.encode(CONVERSATION[:2], True)
    batch = [
        {**sample, "pixels": np.zeros((1, 3, 28, 28), np.uint8)},
        {**sample, "pixels": np.zeros((1, 3, 14, 14), np.uint8)},
    ]
    with pytest.raises(ValueError, match="one shape"):
        collate(batch, processor.pad_token_id)
    with pytest.raises(ValueError, match="uint8"):
        collate([{**sample, "pixels": np.zeros((1, 3, 28, 28), np.float32)}], processor.pad_token_id)


# -- persistence, tokenizer -------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, tokenizer):
    zoom = ZoomConfig(resolution=28, levels=("low", "high"), grid_rule="aspect")
    tokens = DRAGONFLY_PRESETS["dragonfly_star"]
    original = DragonflyProcessor(tokenizer, zoom, tokens, max_length=3000, train_on_user_turns=True)
    original.save_pretrained(tmp_path)
    loaded = DragonflyProcessor.from_pretrained(tmp_path)
    assert loaded.settings() == original.settings()
    assert (loaded.zoom, loaded.tokens, loaded.layout) == (zoom, tokens, original.layout)
    assert loaded.image_token_id == original.image_token_id
    assert loaded.pad_token_id == original.pad_token_id
    assert loaded.tokenizer.chat_template == tokenizer.chat_template
    for key, value in original.encode(CONVERSATION, True).items():
        np.testing.assert_array_equal(loaded.encode(CONVERSATION, True)[key], value)
    assert DragonflyProcessor.from_pretrained(tmp_path, max_length=128).max_length == 128


def test_processor_adds_the_image_token_when_missing():
    vocab = {"[UNK]": 0, "hi": 1, "<eos>": 2}
    base = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base, eos_token="<eos>", chat_template=LLAMA3_STYLE_CHAT_TEMPLATE, bos_token="<eos>"
    )
    processor = DragonflyProcessor(tok, SMALL_ZOOM, SMALL_TOKENS)
    assert processor.image_token_id == 3 and len(tok) == 4
    assert processor.pad_token_id == 2  # no pad token: falls back to end of sequence
    assert tok(f"hi{IMAGE_TOKEN}hi", add_special_tokens=False)["input_ids"] == [1, 3, 1]


def test_decode_shows_each_image_block_once(processor):
    ids = processor.encode(CONVERSATION[:2], True)["input_ids"]
    assert processor.decode(ids).count(IMAGE_TOKEN) == 1
    assert processor.decode(torch.as_tensor(ids)) == processor.decode(ids)


def test_tiny_tokenizer_is_deterministic_and_llama3_shaped():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert 512 <= len(a) <= 1024
    assert a.eos_token == EOT and a.pad_token_id is not None and a.bos_token == "<|begin_of_text|>"
    assert len(a(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]) == 1
    text = a.apply_chat_template(
        [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello."}],
        tokenize=False,
        add_generation_prompt=False,
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    )
    # Byte-level: any text round-trips, no unknown tokens.
    sample = "Zoom 42× into the naïve café ☕"
    assert a.decode(a(sample, add_special_tokens=False)["input_ids"]) == sample
    # Extra texts change the merges (a corpus for a domain demo).
    assert build_tiny_tokenizer(["dragonfly " * 50]).get_vocab() != a.get_vocab()
