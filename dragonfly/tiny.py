"""Tiny, download-free stand-ins for tests and the CPU demo.

``build_tiny_tokenizer`` trains a small byte-level BPE in milliseconds and dresses it like
Llama-3.1-Instruct's tokenizer: the same special tokens, a Llama-3-style chat template, ``<|eot_id|>``
as end of turn and ``<image>`` as an added special token. Code under test therefore runs the same
path (chat template, special tokens, prefix rendering) as with the real tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dragonfly.processor import IMAGE_TOKEN

# ---------------------------------------------------------------------------------------------
# Tokenizer

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"
HEADER_START = "<|start_header_id|>"
HEADER_END = "<|end_header_id|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, HEADER_START, HEADER_END, EOT_TOKEN, PAD_TOKEN, IMAGE_TOKEN)
TINY_VOCAB_SIZE = 768

# Llama-3-Instruct's layout: BOS once, then per message
# "<|start_header_id|>{role}<|end_header_id|>\n\n{content | trim}<|eot_id|>", and the assistant header
# as the generation prompt. (Llama-3.1's template adds a default system block; the processor is
# agnostic to that because it derives every span from prefix renderings.)
LLAMA3_STYLE_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# A small English corpus written for this file: enough pairs for a few hundred merges, with the
# words that image-chat tests and the demo use (colours, shapes, positions, questions, answers).
TINY_CORPUS = """
The quick brown fox jumps over the lazy dog. A red square sits to the left of a blue circle.
What is in the image? The image shows a small green triangle above a large yellow square.
Describe the picture in detail. There is a cat on the table and a dog under the chair.
How many objects are there? There are three objects: two circles and one square.
What colour is the car? The car is red. Where is the tree? The tree is on the right side.
Read the text in the image. The sign says open from nine to five, Monday to Friday.
Is the light on or off? The light is on. Is the door open? No, the door is closed.
A dragonfly zooms into the image to see the fine details of a chart, a document or a photo.
The chart shows sales rising from ten to forty over four months, with a dip in the third month.
The patient scan shows no sign of a fracture; the lungs are clear and the heart is normal in size.
Please answer the question with a single word. Yes. No. Maybe. Left. Right. Top. Bottom. Centre.
The model reads the question, looks at the picture, and writes a short and helpful answer.
Zero one two three four five six seven eight nine ten eleven twelve hundred thousand.
She walked along the river in the morning, counting the boats and the birds on the water.
Numbers such as 3.14, 2024, 42 and 1000 appear in tables, receipts and street signs.
"""


def build_tiny_tokenizer(extra_texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (at most 768 ids; 672 from the built-in corpus) with Llama-3.1-Instruct's special tokens and chat layout.

    Trained on ``TINY_CORPUS`` plus ``extra_texts`` in milliseconds, with no downloads. Deterministic:
    the same inputs give the same vocabulary and merges on every call. Byte-level, so any text
    (including unseen Unicode) tokenizes without unknown tokens.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*TINY_CORPUS.strip().splitlines(), *extra_texts], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,  # like Llama-3.1-Instruct: generation stops at the end of the turn
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=LLAMA3_STYLE_CHAT_TEMPLATE,
        model_max_length=131072,
    )


__all__ = ["build_tiny_tokenizer", "LLAMA3_STYLE_CHAT_TEMPLATE", "TINY_CORPUS", "SPECIAL_TOKENS"]
