"""Evaluation metrics of the paper (Tables 4-6), pure Python.

Every metric takes ``predictions`` (one generated string per sample) and ``references`` (per sample,
one reference string or a list of them) and returns the corpus score as a fraction in [0, 1] (CIDEr:
its own scale, 1.0 = "100" in papers' tables). ``per_sample=True`` returns one score per sample
instead, in input order, for the evaluation job's per-sample table. ``compute_metrics(task, ...)``
gives a task's whole metric set; ``score_task`` gives corpus and per-sample scores in one pass.

Which reference each metric follows (details and known differences in docs/metrics.md):

- ``vqa_accuracy``: the official VQAv2 evaluation script (``vqaEval.py``), normalisation included.
- ``token_f1`` / ``exact_match``: the SQuAD v2.0 evaluation script's normalisation and bag-of-tokens
  F1, as Med-PaLM M (Tu et al., 2024) and the paper's Table 6 use it.
- ``closed_accuracy``: yes/no (closed-ended) accuracy on the normalised answer's first word(s).
- ``relaxed_accuracy``: ChartQA's relaxed accuracy as implemented in Pix2Struct.
- ``bleu``, ``cider``, ``rouge_l``, ``meteor``: pycocoevalcap (the COCO caption evaluation). With
  ``backend="python"`` (default) captions are tokenised by a pure-Python equivalent of COCO's Java
  PTBTokenizer step and METEOR comes from nltk (exact + Porter-stem matching, no WordNet synonyms);
  ``backend="java"`` runs COCO's own Java tokenizer and METEOR 1.5, bit-for-bit COCOEvalCap.
"""

from __future__ import annotations

import re
import shutil
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

References = Sequence[str | Sequence[str]]
CaptionBackend = Literal["python", "java"]


def _reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    """Check the inputs line up and give each sample's references as a list of strings."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences (one entry per sample), not a str")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no samples to score")
    reference_lists = []
    for index, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(prediction, str):
            raise TypeError(f"sample {index}: prediction is {type(prediction).__name__}, expected str")
        answers = [reference] if isinstance(reference, str) else list(reference)
        if not answers or not all(isinstance(answer, str) for answer in answers):
            raise ValueError(
                f"sample {index}: references must be a str or a non-empty list of str, got {reference!r}"
            )
        reference_lists.append(answers)
    return reference_lists


def _mean(scores: Sequence[float]) -> float:
    return sum(scores) / len(scores)


def _corpus_or_samples(scores: list[float], per_sample: bool) -> float | list[float]:
    return scores if per_sample else _mean(scores)


# ---------------------------------------------------------------------------------------------------
# VQAv2 accuracy: the official evaluation script (GT-Vision-Lab/VQA, vqaEval.py, Python 3 master).
# The tables below are that script's data, kept verbatim (its quirks too) so scores match it exactly.
# ---------------------------------------------------------------------------------------------------

_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                    "`", ",", "?", "!")  # fmt: skip
# "(?!<=\d)" is a (mistyped) lookahead, not a lookbehind: the script drops every "." not followed by
# a digit. Kept as written.
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The script passes re.UNICODE (= 32) as `sub`'s third positional argument, which is `count`: at most
# 32 periods are removed. Kept for exact agreement.
_VQA_PERIOD_COUNT = int(re.UNICODE)


def vqa_process_punctuation(text: str) -> str:
    """The script's ``processPunctuation``: drop a mark next to a space (or anywhere if the text has a
    digit-comma-digit), else turn it into a space; then drop periods not followed by a digit."""
    out = text
    glue = _VQA_DIGIT_COMMA.search(text) is not None
    for mark in _VQA_PUNCTUATION:
        if glue or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """The script's ``processDigitArticle``: lowercase, number words to digits, drop articles,
    restore contractions."""
    words = [_VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words)


def vqa_normalize_answer(text: str) -> str:
    """How the script normalises a predicted answer before matching."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def _vqa_sample_accuracy(prediction: str, answers: list[str], normalize_references: bool) -> float:
    predicted = vqa_normalize_answer(prediction)
    if len(answers) == 1:
        # One reference (a LLaVA manifest's answer): a unanimous annotation, normalised like the
        # prediction since nobody normalised it at collection time. Leave-one-out over a single
        # answer would leave no annotator and score every prediction 0.
        return float(predicted == vqa_normalize_answer(answers[0]))
    if normalize_references:
        answers = [vqa_normalize_answer(answer) for answer in answers]
    elif len(set(answers)) > 1:
        # The script touches the human answers only when they disagree, and then only their
        # punctuation: VQAv2's answers were normalised when the dataset was built.
        answers = [vqa_process_punctuation(answer) for answer in answers]
    # min(#humans who gave this answer / 3, 1), averaged over the leave-one-annotator-out subsets.
    matches = sum(answer == predicted for answer in answers)
    leave_one_out = [min(1.0, (matches - (answer == predicted)) / 3) for answer in answers]
    return _mean(leave_one_out)


def vqa_accuracy(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    per_sample: bool = False,
    normalize_references: bool = False,
) -> float | list[float]:
    """VQAv2 soft accuracy; ``references[i]`` holds the human answers (10 in VQAv2).

    Matches the official script (its per-question and overall numbers are these x 100, rounded to
    2 decimals). ``normalize_references=True`` also runs the human answers through the prediction's
    normalisation, for datasets whose answers were not normalised at collection time.
    """
    answer_lists = _reference_lists(predictions, references)
    scores = [
        _vqa_sample_accuracy(prediction, answers, normalize_references)
        for prediction, answers in zip(predictions, answer_lists, strict=True)
    ]
    return _corpus_or_samples(scores, per_sample)


# ---------------------------------------------------------------------------------------------------
# SQuAD-style answer metrics: token F1 and exact match (SQuAD v2.0 evaluate script), closed accuracy.
# ---------------------------------------------------------------------------------------------------

_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_SQUAD_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's ``normalize_answer``: lowercase, delete punctuation, drop articles, squash spaces.

    One departure: an answer made of articles only keeps them. SQuAD would turn the option letter
    "A" into "", which every empty or article-only prediction then matches (and a closed-ended
    reference "A" would be empty)."""
    text = _lower_without_punctuation(text)
    return " ".join(_SQUAD_ARTICLES.sub(" ", text).split()) or " ".join(text.split())


def _lower_without_punctuation(text: str) -> str:
    return "".join(char for char in text.lower() if char not in _SQUAD_PUNCTUATION)


def _token_f1_single(prediction: str, reference: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not gold:
        # SQuAD v2.0: an empty answer scores 1 against an empty reference and 0 otherwise.
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _exact_match_single(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _closed_single(prediction: str, reference: str) -> float:
    # The answer counts when the prediction *starts* with it ("Yes, there is ..." is a yes): generative
    # models rarely answer with the bare word. For yes/no references this is first-word matching.
    gold = normalize_answer(reference).split()
    if not gold:
        raise ValueError(f"closed-ended reference {reference!r} is empty after normalisation")
    if _SQUAD_ARTICLES.fullmatch(" ".join(gold)):
        # An option letter ("A"): the prediction's first word counts as given ("A) the lung").
        return float(_lower_without_punctuation(prediction).split()[: len(gold)] == gold)
    return float(normalize_answer(prediction).split()[: len(gold)] == gold)


def _best_over_references(
    single: Callable[[str, str], float], predictions: Sequence[str], references: References
) -> list[float]:
    reference_lists = _reference_lists(predictions, references)
    return [
        max(single(prediction, reference) for reference in reference_list)
        for prediction, reference_list in zip(predictions, reference_lists, strict=True)
    ]


def token_f1(
    predictions: Sequence[str], references: References, *, per_sample: bool = False
) -> float | list[float]:
    """Bag-of-tokens F1 after SQuAD normalisation; best over a sample's references."""
    return _corpus_or_samples(_best_over_references(_token_f1_single, predictions, references), per_sample)


def exact_match(
    predictions: Sequence[str], references: References, *, per_sample: bool = False
) -> float | list[float]:
    """1 when the SQuAD-normalised prediction equals a normalised reference."""
    scores = _best_over_references(_exact_match_single, predictions, references)
    return _corpus_or_samples(scores, per_sample)


def closed_accuracy(
    predictions: Sequence[str], references: References, *, per_sample: bool = False
) -> float | list[float]:
    """Closed-ended (yes/no) accuracy: the normalised prediction's first word(s) equal the answer."""
    scores = _best_over_references(_closed_single, predictions, references)
    return _corpus_or_samples(scores, per_sample)


# ---------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy (Masry et al., 2022), as Pix2Struct's `relaxed_correctness` computes it.
# ---------------------------------------------------------------------------------------------------


def _chartqa_float(text: str, strip_commas: bool) -> float | None:
    if strip_commas:
        text = text.replace(",", "")
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _relaxed_single(prediction: str, target: str, max_relative_change: float, strip_commas: bool) -> float:
    # Generated text often ends in a newline; the reference receives clean decoded strings.
    prediction, target = prediction.strip(), target.strip()
    predicted_value = _chartqa_float(prediction, strip_commas)
    target_value = _chartqa_float(target, strip_commas)
    # A target of 0 has no relative tolerance: the reference falls back to string match then.
    if predicted_value is not None and target_value:
        return float(abs(predicted_value - target_value) / abs(target_value) <= max_relative_change)
    return float(prediction.lower() == target.lower())


def relaxed_accuracy(
    predictions: Sequence[str],
    references: References,
    *,
    per_sample: bool = False,
    max_relative_change: float = 0.05,
    strip_commas: bool = False,
) -> float | list[float]:
    """ChartQA relaxed accuracy: numbers within 5% relative error ("12%" reads as 0.12), other
    answers by case-insensitive string match; best over a sample's references.

    ``strip_commas=True`` also reads "1,200" as 1200. Pix2Struct does not (it compares "1,200" as a
    string), so the default keeps scores comparable with published ChartQA numbers.
    """
    reference_lists = _reference_lists(predictions, references)
    scores = [
        max(_relaxed_single(prediction, target, max_relative_change, strip_commas) for target in targets)
        for prediction, targets in zip(predictions, reference_lists, strict=True)
    ]
    return _corpus_or_samples(scores, per_sample)


# ---------------------------------------------------------------------------------------------------
# Captioning (Table 5): COCO caption evaluation (pycocoevalcap) on PTB-tokenised, lowercased text.
# ---------------------------------------------------------------------------------------------------

# COCO drops these tokens after Stanford's PTBTokenizer. Its list also names -LRB- etc., but COCO
# lowercases first, so brackets survive as "-lrb-" ... in the reference: we keep them the same way.
_COCO_DROPPED_TOKENS = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_UNICODE = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "–": " -- ", "—": " -- ", "…": "..."})
# Words the PTB convention splits in two (Stanford's tokenizer does the same).
_PTB_SPLIT_WORDS = {
    "cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
    "wanna": ["wan", "na"], "lemme": ["lem", "me"], "gimme": ["gim", "me"],
}  # fmt: skip
_PTB_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")
# Abbreviations Stanford's tokenizer keeps whole with their period (a subset of its list).
_PTB_ABBREVIATIONS = "mr|mrs|ms|dr|prof|st|jr|sr|vs|etc|fig|ca|inc|ltd|corp|co"
_PTB_TOKEN = re.compile(
    rf"""
    (?<![\w.])(?:[^\W\d_]\.){{2,}}              # initialisms: u.s. e.g. p.m.
  | (?<![\w.])(?:{_PTB_ABBREVIATIONS})\.(?!\w)  # titles and common abbreviations: dr. fig. etc.
  | (?:(?<![\w-])-(?=\d))?\w+                   # words and numbers (a leading minus on numbers) ...
    (?:(?:[-./]|(?<=\d)[,:](?=\d)|(?<=[^\W\d_])'(?=[^\W\d_]))\w+)*  # ... x-ray 3.5 1,000 5:30 o'clock a/p
  | \.{{2,}} | -{{2,}} | [!?]+                   # ellipses, dashes, runs of ! and ?
  | \S                                          # any other mark on its own
    """,
    re.VERBOSE,
)


def _ptb_word(token: str) -> list[str]:
    if token in _PTB_SPLIT_WORDS:
        return _PTB_SPLIT_WORDS[token]
    clitic = _PTB_CLITIC.match(token)
    return [clitic.group(1), clitic.group(2)] if clitic else [token]


def coco_tokenize(text: str) -> str:
    """Pure-Python stand-in for COCO's tokenisation step (Stanford PTBTokenizer 3.4.1 with
    ``-lowerCase``, then COCO's punctuation filter); returns space-joined tokens.

    Agrees with the Java tokenizer on ordinary caption and report text (tests pin a corpus of such
    sentences); rarer Stanford rules (its full abbreviation list, "1.5x" -> "1.5 x") are not copied.
    """
    text = text.replace("\n", " ").translate(_PTB_UNICODE).lower()
    tokens: list[str] = []
    for match in _PTB_TOKEN.finditer(text):
        token = match.group()
        # PTB rewrites '"' as `` or '', and runs of periods or hyphens as "..." or "--": all dropped.
        if token in _COCO_DROPPED_TOKENS or token == '"' or token.startswith(("..", "--")):
            continue
        tokens.extend(_ptb_word(token) if token[0].isalnum() else [_PTB_BRACKETS.get(token, token)])
    return " ".join(tokens)


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "backend='java' runs COCO's Java PTBTokenizer and METEOR 1.5 jars (shipped in pycocoevalcap) "
            "and needs `java` on PATH; install a JRE (e.g. apt-get install default-jre-headless) or use "
            "backend='python'"
        )


def _tokenize_all(texts: dict[int, list[str]], backend: CaptionBackend) -> dict[int, list[str]]:
    if backend == "python":
        return {key: [coco_tokenize(text) for text in values] for key, values in texts.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({key: [{"caption": t} for t in values] for key, values in texts.items()})


class _NoSynonyms:
    """Stands in for nltk's WordNet reader: WordNet's data is a separate download we cannot make."""

    @staticmethod
    def synsets(word: str) -> list:
        return []


def _python_meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    # nltk costs seconds to import and only captioning needs it.
    from nltk.translate.meteor_score import meteor_score

    scores = [
        meteor_score([ref.split() for ref in gts[key]], res[key][0].split(), wordnet=_NoSynonyms())
        for key in res
    ]
    return _mean(scores), scores


def _java_meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    score, scores = Meteor().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def caption_scores(
    predictions: Sequence[str],
    references: References,
    *,
    metrics: Sequence[str] = CAPTION_METRICS,
    backend: CaptionBackend = "python",
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """COCO caption metrics: ``(corpus, per_sample)`` dicts keyed by metric name.

    BLEU's corpus score is corpus-level BLEU (COCO's "closest" reference length), not the mean of
    its per-sample scores; CIDEr's document frequencies come from this corpus's references, so a
    sample's CIDEr depends on the rest of the corpus (and a one-sample corpus scores 0).
    """
    unknown = sorted(set(metrics) - set(CAPTION_METRICS))
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; known: {list(CAPTION_METRICS)}")
    if backend not in ("python", "java"):
        raise ValueError(f"backend must be 'python' or 'java', got {backend!r}")
    reference_lists = _reference_lists(predictions, references)
    if backend == "java":
        _require_java()
    gts = _tokenize_all(dict(enumerate(reference_lists)), backend)
    res = _tokenize_all({key: [prediction] for key, prediction in enumerate(predictions)}, backend)

    corpus: dict[str, float] = {}
    per_sample: dict[str, list[float]] = {}
    bleu_names = [name for name in metrics if name.startswith("bleu_")]
    if bleu_names:
        bleu_corpus, bleu_samples = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            name = f"bleu_{n + 1}"
            if name in bleu_names:
                corpus[name], per_sample[name] = float(bleu_corpus[n]), [float(s) for s in bleu_samples[n]]
    scorers = {
        "meteor": _java_meteor if backend == "java" else _python_meteor,
        "rouge_l": Rouge().compute_score,
        "cider": Cider().compute_score,
    }
    for name, scorer in scorers.items():
        if name in metrics:
            score, scores = scorer(gts, res)
            corpus[name], per_sample[name] = float(score), [float(s) for s in scores]
    return corpus, per_sample


def _one_caption_metric(
    name: str, predictions: Sequence[str], references: References, per_sample: bool, backend: CaptionBackend
) -> float | list[float]:
    corpus, samples = caption_scores(predictions, references, metrics=[name], backend=backend)
    return samples[name] if per_sample else corpus[name]


def bleu(
    predictions: Sequence[str],
    references: References,
    *,
    per_sample: bool = False,
    backend: CaptionBackend = "python",
) -> dict[str, float] | dict[str, list[float]]:
    """BLEU-1..4 (pycocoevalcap) as ``{"bleu_1": ..., ..., "bleu_4": ...}``."""
    names = CAPTION_METRICS[:4]
    corpus, samples = caption_scores(predictions, references, metrics=names, backend=backend)
    return samples if per_sample else corpus


def cider(
    predictions: Sequence[str],
    references: References,
    *,
    per_sample: bool = False,
    backend: CaptionBackend = "python",
) -> float | list[float]:
    """CIDEr-D as COCO computes it (pycocoevalcap's ``Cider``)."""
    return _one_caption_metric("cider", predictions, references, per_sample, backend)


def rouge_l(
    predictions: Sequence[str],
    references: References,
    *,
    per_sample: bool = False,
    backend: CaptionBackend = "python",
) -> float | list[float]:
    """ROUGE-L as COCO computes it: LCS F-measure with beta = 1.2, best precision and best recall
    over the references, averaged over samples (pycocoevalcap's ``Rouge``)."""
    return _one_caption_metric("rouge_l", predictions, references, per_sample, backend)


def meteor(
    predictions: Sequence[str],
    references: References,
    *,
    per_sample: bool = False,
    backend: CaptionBackend = "python",
) -> float | list[float]:
    """METEOR: nltk's ``meteor_score`` without synonyms (python), or COCO's METEOR 1.5 jar (java)."""
    return _one_caption_metric("meteor", predictions, references, per_sample, backend)


# ---------------------------------------------------------------------------------------------------
# Task dispatch: one metric set per evaluation task.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskScores:
    """Corpus scores and per-sample scores (in input order) of one task's metrics."""

    corpus: dict[str, float]
    per_sample: dict[str, list[float]]


_SAMPLE_MEAN_METRICS: dict[str, Callable[..., list[float]]] = {
    "vqa_accuracy": lambda p, r: vqa_accuracy(p, r, per_sample=True),
    "closed_accuracy": lambda p, r: closed_accuracy(p, r, per_sample=True),
    "token_f1": lambda p, r: token_f1(p, r, per_sample=True),
    "exact_match": lambda p, r: exact_match(p, r, per_sample=True),
    "relaxed_accuracy": lambda p, r: relaxed_accuracy(p, r, per_sample=True),
}
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "vqa": ("vqa_accuracy",),
    "closed": ("closed_accuracy",),
    "open": ("token_f1", "exact_match"),
    "chartqa": ("relaxed_accuracy",),
    "exact": ("exact_match",),
    "caption": CAPTION_METRICS,
}


def score_task(
    task: str,
    predictions: Sequence[str],
    references: References,
    *,
    caption_backend: CaptionBackend = "python",
) -> TaskScores:
    """All of a task's metrics, corpus and per sample, computed once."""
    if task not in TASK_METRICS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_METRICS)}")
    if task == "caption":
        corpus, per_sample = caption_scores(predictions, references, backend=caption_backend)
        return TaskScores(corpus, per_sample)
    per_sample = {name: _SAMPLE_MEAN_METRICS[name](predictions, references) for name in TASK_METRICS[task]}
    return TaskScores({name: _mean(scores) for name, scores in per_sample.items()}, per_sample)


def compute_metrics(
    task: str,
    predictions: Sequence[str],
    references: References,
    *,
    per_sample: bool = False,
    caption_backend: CaptionBackend = "python",
) -> dict[str, float] | dict[str, list[float]]:
    """A task's metrics: ``vqa``, ``closed``, ``open`` (token F1 + exact match), ``chartqa``,
    ``exact`` or ``caption`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr). Corpus scores, or per-sample
    lists with ``per_sample=True``; ``score_task`` gives both in one pass."""
    scores = score_task(task, predictions, references, caption_backend=caption_backend)
    return scores.per_sample if per_sample else scores.corpus
