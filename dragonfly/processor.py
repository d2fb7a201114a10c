"""Conversations -> token ids and labels, with the image block expanded to its positions.

A record is a LLaVA conversation, ``[{"from": "human" | "gpt" | "system", "value": str}, ...]`` (the
chat format ``{"role", "content"}`` is accepted too), plus whether it comes with an image. The text
holds at most one ``<image>`` marker in a user turn; an image record without one gets it at the start
of its first user message (LLaVA's convention).

Rendering uses the tokenizer's own chat template, so the sequences a model is trained on are exactly
what ``apply_chat_template(..., add_generation_prompt=True)`` gives at inference. Spans come from
*prefix rendering*: the conversation is rendered up to each message, and up to each assistant header,
and the differences between consecutive renderings are the pieces of the sequence:

    [bos, system?] [user turn] [assistant header] [answer + end of turn] [user turn] ...
                   ^ train_on_user_turns           ^ always supervised

Each piece is tokenized on its own, which is what generation does too (prompt tokens, then generated
answer tokens), so no BPE merge ever straddles the prompt/answer boundary. Pieces work for any
template where a shorter conversation's rendering is a prefix of a longer one's (Llama-3/3.1, and most
others); a template that is not raises a ``ValueError`` naming the message.

The image block: ``<image>`` is one added special token; after tokenization its single id is
repeated ``layout.positions`` times (``dragonfly.budget.image_token_layout``), one contiguous run per
image. The model fills the whole run (CLS, pooled tokens and separators) with one masked scatter, so
the processor needs no more detail of the layout than its length. Image positions are never
supervised.

Labels are the input ids where supervised and ``-100`` elsewhere, unshifted (the causal LM shifts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerBase

from dragonfly.budget import ImageTokenLayout, image_token_layout
from dragonfly.config import TokenConfig, ZoomConfig
from dragonfly.zoom import stack_crops

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
PROCESSOR_CONFIG_NAME = "dragonfly_processor.json"

# LLaVA speaker names and chat roles -> chat-template roles.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """A record that cannot become a training sample; the data pipeline skips and counts it by
    ``reason`` (``no_conversations``, ``bad_message``, ``unknown_role``, ``turn_order``,
    ``empty_answer``, ``image_marker``, ``template``, ``too_long``)."""

    def __init__(self, reason: str, message: str, record_id: str = "<record>"):
        super().__init__(f"record {record_id}: {message} [{reason}]")
        self.reason = reason
        self.record_id = record_id


# The released Dragonfly's prompt (togethercomputer/Dragonfly: processing_dragonfly.py builds the
# image block in front of the tokenized text, pipeline/data_utils/data.py writes Llama-3 turns without
# a system block, test_dragonfly.py's format_text puts a system prompt in front of the question): the
# block first, then BOS and the turns, the marker taken out of the user's text. For checkpoints
# converted with dragonfly.convert: they then see the prompts they were trained on.
RELEASED_CHAT_TEMPLATE = (
    "{%- set dialogue = messages | rejectattr('role', 'equalto', 'system') | list %}"
    "{%- if dialogue %}"  # nothing before the first user turn: a system turn alone renders empty
    "{%- set image = namespace(seen=false) %}"
    "{%- for message in messages if '<image>' in message['content'] %}{%- set image.seen = true %}{%- endfor %}"
    "{%- if image.seen %}{{- '<image>' }}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in dialogue %}"
    "{%- set text = message['content'] | replace('<image>\\n', '') | replace('<image>', '') | trim %}"
    "{%- if loop.first and messages[0]['role'] == 'system' and messages[0]['content'] | trim %}"
    "{%- set text = (messages[0]['content'] | trim) + ' ' + text %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + text + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
CHAT_TEMPLATES = {"released": RELEASED_CHAT_TEMPLATE}

# What every usable chat template must render: an image exchange and a follow-up.
_PROBE = [
    {"from": "human", "value": "<image>\nWhat is this?"},
    {"from": "gpt", "value": "A probe."},
    {"from": "human", "value": "Sure?"},
    {"from": "gpt", "value": "Yes."},
]


@dataclass(frozen=True)
class _Piece:
    """A slice of the rendered conversation: the text one message (or assistant header) adds."""

    message: int  # index of the message it belongs to
    text: str
    supervised: bool


class DragonflyProcessor:
    """Turns LLaVA conversations into ``input_ids`` / ``labels`` for the Dragonfly model.

    ``tokenizer`` must have a chat template; ``<image>`` is added to it as a special token if it is
    missing (the model's embedding table must then cover ``len(processor.tokenizer)`` ids).
    ``max_length`` bounds training sequences: later turns are dropped whole to fit; a record whose
    first exchange (with the image block) does not fit raises ``RecordError("too_long")``.
    ``chat_template`` replaces the tokenizer's: ``"released"`` (the released Dragonfly's prompt, for
    converted checkpoints) or a Jinja template. ``train_on_user_turns`` also supervises the text of
    user turns (as the released code does, which supervises the headers too; here the template's
    headers and preamble stay unsupervised); image positions are never supervised.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        zoom: ZoomConfig,
        tokens: TokenConfig,
        max_length: int = 4096,
        train_on_user_turns: bool = False,
        chat_template: str | None = None,
    ):
        if chat_template is not None:  # a name of CHAT_TEMPLATES or a Jinja template of one's own
            tokenizer.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; Dragonfly renders conversations with it")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens(
                [AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True
            )
        image_ids = tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
        if len(image_ids) != 1:
            raise ValueError(f"{IMAGE_TOKEN!r} must be one token, the tokenizer gives {image_ids}")
        self.tokenizer = tokenizer
        self.zoom = zoom
        self.tokens = tokens
        self.max_length = max_length
        self.train_on_user_turns = train_on_user_turns
        self.chat_template = chat_template
        self.layout: ImageTokenLayout = image_token_layout(zoom, tokens)
        self.image_token_id: int = image_ids[0]
        # Llama-3.x has no pad token; padded positions are masked, so end-of-turn serves.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        self.pad_token_id: int = pad
        try:  # a template unfit for conversations fails here, where the run starts, not per record
            self._pieces(_normalize(_PROBE, True, "<probe>", for_generation=False), False, "<probe>")
        except RecordError as err:
            raise ValueError(
                f"the tokenizer's chat template cannot render a plain conversation: {err}"
            ) from None

    # -- encoding ----------------------------------------------------------------------------

    def encode(
        self, conversations: list[dict], has_image: bool, *, record_id: str = "<record>"
    ) -> dict[str, np.ndarray]:
        """One training sample: ``{"input_ids", "labels"}``, 1-D int32 arrays of equal length.

        Raises ``RecordError`` (with ``.reason``) for records that cannot be used.
        """
        messages = _normalize(conversations, has_image, record_id, for_generation=False)
        pieces = self._pieces(messages, add_generation_prompt=False, record_id=record_id)
        input_ids, labels, message_ends = self._tokenize(pieces, len(messages), has_image, record_id)
        keep = self._turns_that_fit(messages, message_ends, has_image, record_id)
        stop = message_ends[keep - 1]
        return {"input_ids": input_ids[:stop], "labels": labels[:stop]}

    def encode_prompt(
        self, messages: list[dict], has_image: bool, *, record_id: str = "<prompt>"
    ) -> np.ndarray:
        """Prompt ids for generation (int32, 1-D): the conversation so far, ending with a user turn,
        rendered with the assistant header appended. Same marker rules as ``encode``."""
        normalized = _normalize(messages, has_image, record_id, for_generation=True)
        pieces = self._pieces(normalized, add_generation_prompt=True, record_id=record_id)
        input_ids, _, _ = self._tokenize(pieces, len(normalized), has_image, record_id)
        if len(input_ids) > self.max_length:
            raise RecordError(
                "too_long",
                f"prompt needs {len(input_ids)} tokens, max_length is {self.max_length}",
                record_id,
            )
        return input_ids

    def decode(
        self, ids: Sequence[int] | np.ndarray | torch.Tensor, skip_special_tokens: bool = False
    ) -> str:
        """Text of ``ids``; each image block shows as one ``<image>``, ``-100`` labels are dropped."""
        ids = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        ids = ids[ids >= 0]
        is_image = ids == self.image_token_id
        run_start = is_image & ~np.concatenate([[False], is_image[:-1]])
        return self.tokenizer.decode(
            ids[~is_image | run_start].tolist(), skip_special_tokens=skip_special_tokens
        )

    # -- internals ---------------------------------------------------------------------------

    def _render(self, messages: list[dict], add_generation_prompt: bool, record_id: str) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as err:  # e.g. raise_exception("System role not supported")
            raise RecordError("template", f"the chat template refused it: {err}", record_id) from None

    def _pieces(self, messages: list[dict], add_generation_prompt: bool, record_id: str) -> list[_Piece]:
        """Split the rendered conversation into per-message pieces by prefix rendering."""
        pieces: list[_Piece] = []
        rendered = ""

        def render(n_messages: int, add_generation_prompt: bool) -> str:
            return self._render(messages[:n_messages], add_generation_prompt, record_id)

        def extend(message: int, longer: str, supervised: bool) -> None:
            nonlocal rendered
            if not longer.startswith(rendered):
                raise RecordError(
                    "template",
                    f"chat template is not prefix-stable at message {message}: rendering more messages "
                    "changed the text of earlier ones, so turn spans cannot be found",
                    record_id,
                )
            pieces.append(_Piece(message, longer[len(rendered) :], supervised))
            rendered = longer

        for i, message in enumerate(messages):
            role = message["role"]
            if role == "assistant":
                # The header that opens the assistant turn is prompt, not answer.
                extend(i, render(i, add_generation_prompt=True), supervised=False)
            supervised = role == "assistant" or (role == "user" and self.train_on_user_turns)
            longer = render(i + 1, add_generation_prompt=False)
            if role == "user" and supervised:
                # The user's words and end of turn only: what the template writes before them (BOS,
                # a default system block like Llama-3.1's, the header, the image) is prompt.
                content = message["content"]
                words = content.split(IMAGE_TOKEN)[-1].strip() or content.replace(IMAGE_TOKEN, "").strip()
                start = longer.rfind(words, len(rendered))
                if start < len(rendered):
                    raise RecordError(
                        "template",
                        f"the chat template does not show user turn {i}'s text as written",
                        record_id,
                    )
                extend(i, longer[:start], supervised=False)
            extend(i, longer, supervised)
        if add_generation_prompt:
            extend(len(messages) - 1, render(len(messages), add_generation_prompt=True), supervised=False)
        return pieces

    def _tokenize(
        self, pieces: list[_Piece], n_messages: int, has_image: bool, record_id: str
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Token ids and labels of the pieces with the image expanded, and where each message ends."""
        encoded = self.tokenizer([p.text for p in pieces], add_special_tokens=False)["input_ids"]
        ids_parts, label_parts = [], []
        message_ends = [0] * n_messages
        length = n_image_tokens = 0
        for piece, piece_ids in zip(pieces, encoded, strict=True):
            ids = np.asarray(piece_ids, dtype=np.int32)
            is_image = ids == self.image_token_id
            n_image_tokens += int(is_image.sum())
            # (n,) -> (n - k + k * positions,): each <image> becomes the whole block.
            ids = np.repeat(ids, np.where(is_image, self.layout.positions, 1))
            labels = np.where(ids == self.image_token_id, IGNORE_INDEX, ids) if piece.supervised else None
            ids_parts.append(ids)
            label_parts.append(labels if labels is not None else np.full_like(ids, IGNORE_INDEX))
            length += len(ids)
            message_ends[piece.message] = length
        if n_image_tokens != int(has_image):
            # The markers were counted in the text; a mismatch means the template dropped or repeated one.
            raise RecordError(
                "image_marker",
                f"rendered conversation holds {n_image_tokens} image tokens, expected {int(has_image)}",
                record_id,
            )
        return np.concatenate(ids_parts), np.concatenate(label_parts), message_ends

    def _turns_that_fit(
        self, messages: list[dict], message_ends: list[int], has_image: bool, record_id: str
    ) -> int:
        """How many leading messages to keep: all if they fit, else up to the last assistant answer
        that fits. The image's user turn and the answer that follows it are always kept whole."""
        if message_ends[-1] <= self.max_length:
            return len(messages)
        image_message = next((i for i, m in enumerate(messages) if IMAGE_TOKEN in m["content"]), 0)
        cuts = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant" and i > image_message]
        fitting = [k for k in cuts if message_ends[k - 1] <= self.max_length]
        if not fitting:
            need = message_ends[cuts[0] - 1]
            image = f" including the {self.layout.positions}-position image block" if has_image else ""
            raise RecordError(
                "too_long",
                f"first answerable exchange needs {need} tokens{image}, max_length is {self.max_length}",
                record_id,
            )
        return fitting[-1]

    # -- persistence -------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {
            "zoom": self.zoom.to_dict(),
            "tokens": self.tokens.to_dict(),
            "max_length": self.max_length,
            "train_on_user_turns": self.train_on_user_turns,
            "chat_template": self.chat_template,
        }

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the tokenizer and ``dragonfly_processor.json`` (zoom, tokens, max_length, ...)."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, PROCESSOR_CONFIG_NAME), "w") as f:
            json.dump(self.settings(), f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> DragonflyProcessor:
        """Load what ``save_pretrained`` wrote (a local directory); ``overrides`` replace settings,
        e.g. ``max_length=8192``."""
        with open(os.path.join(path, PROCESSOR_CONFIG_NAME)) as f:
            settings = json.load(f)
        settings.update(overrides)
        zoom, tokens = settings.pop("zoom"), settings.pop("tokens")
        return cls(
            AutoTokenizer.from_pretrained(path),
            zoom if isinstance(zoom, ZoomConfig) else ZoomConfig.from_dict(zoom),
            tokens if isinstance(tokens, TokenConfig) else TokenConfig.from_dict(tokens),
            **settings,
        )


def turn_fields(turn: Any) -> tuple[Any, Any]:
    """``(speaker, text)`` of a turn written LLaVA-style (``from``/``value``) or chat-style
    (``role``/``content``); a key holding null counts as absent, as in Parquet manifests that mix
    both styles (their turn struct has all four fields). ``(None, None)`` for a non-dict."""
    if not isinstance(turn, dict):
        return None, None
    speaker, text = turn.get("from"), turn.get("value")
    return (turn.get("role") if speaker is None else speaker), (turn.get("content") if text is None else text)


def _normalize(conversations: Any, has_image: bool, record_id: str, for_generation: bool) -> list[dict]:
    """Validate a conversation and return chat messages ``{"role", "content"}`` with the image
    marker placed. Training conversations end with an answer, generation prompts with a user turn."""
    if not isinstance(conversations, list) or not conversations:
        raise RecordError("no_conversations", "conversation is missing or empty", record_id)
    messages = []
    for i, turn in enumerate(conversations):
        speaker, text = turn_fields(turn)
        if not isinstance(speaker, str) or not isinstance(text, str):
            raise RecordError("bad_message", f"message {i} needs string 'from' and 'value'", record_id)
        if speaker not in ROLE_ALIASES:
            raise RecordError(
                "unknown_role", f"message {i} has role {speaker!r}; known: {sorted(ROLE_ALIASES)}", record_id
            )
        messages.append({"role": ROLE_ALIASES[speaker], "content": text})

    roles = [m["role"] for m in messages]
    dialogue = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(dialogue) // 2 + 1)
    last = "user" if for_generation else "assistant"
    if not dialogue or dialogue != expected[: len(dialogue)] or dialogue[-1] != last:
        raise RecordError(
            "turn_order",
            f"roles {roles} must be [system] then user/assistant alternating, ending with {last}",
            record_id,
        )
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordError("empty_answer", f"assistant message {i} is empty", record_id)

    markers = [i for i, m in enumerate(messages) for _ in range(m["content"].count(IMAGE_TOKEN))]
    if any(messages[i]["role"] != "user" for i in markers):
        raise RecordError("image_marker", f"{IMAGE_TOKEN} outside a user message", record_id)
    if len(markers) > 1:
        raise RecordError(
            "image_marker", f"{len(markers)} {IMAGE_TOKEN} markers; one image per record", record_id
        )
    if markers and not has_image:
        raise RecordError("image_marker", f"{IMAGE_TOKEN} marker in a record without an image", record_id)
    if has_image and not markers:
        first_user = roles.index("user")
        messages[first_user]["content"] = f"{IMAGE_TOKEN}\n{messages[first_user]['content']}"
    return messages


def collate(
    batch: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into a batch.

    Each sample has ``input_ids`` and ``labels`` (1-D) and, if it has an image, ``pixels`` (uint8
    ``(n_tiles, 3, R, R)``; absent or ``None`` otherwise). Returns ``input_ids`` (B, T) int64 padded
    with ``pad_token_id``, ``labels`` (B, T) int64 padded with -100, ``attention_mask`` (B, T) int64,
    ``has_image`` (B,) bool and, when any sample has an image, ``pixels`` (n_images, n_tiles, 3, R, R)
    uint8 in batch order of the samples that have one.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    lengths = [len(sample["input_ids"]) for sample in batch]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (sample, n) in enumerate(zip(batch, lengths, strict=True)):
        if len(sample["labels"]) != n:
            raise ValueError(f"sample {row}: {n} input_ids but {len(sample['labels'])} labels")
        input_ids[row, :n] = torch.as_tensor(np.asarray(sample["input_ids"]), dtype=torch.long)
        labels[row, :n] = torch.as_tensor(np.asarray(sample["labels"]), dtype=torch.long)
        attention_mask[row, :n] = 1

    pixels = [sample.get("pixels") for sample in batch]
    out = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "has_image": torch.tensor([p is not None for p in pixels], dtype=torch.bool),
    }
    images = [p for p in pixels if p is not None]
    if images:
        shapes = {tuple(img.shape) for img in images}
        dtypes = {str(img.dtype).removeprefix("torch.") for img in images}
        if len(shapes) != 1 or len(next(iter(shapes))) != 4 or dtypes != {"uint8"}:
            raise ValueError(
                f"pixels must be uint8 (n_tiles, 3, R, R) of one shape, got {sorted(shapes)} / {sorted(dtypes)}"
            )
        out["pixels"] = stack_crops(images)  # (n_images, n_tiles, 3, R, R), channels-last
    return out


__all__ = [
    "CHAT_TEMPLATES",
    "RELEASED_CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "IGNORE_INDEX",
    "RecordError",
    "DragonflyProcessor",
    "collate",
    "turn_fields",
]
