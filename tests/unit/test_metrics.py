"""Metrics against their references: the official VQAv2 script's rules, SQuAD's F1, Pix2Struct's
relaxed accuracy, the METEOR paper's worked example, and pycocoevalcap (with its Java tokenizer and
METEOR 1.5 where `java` exists; their outputs are also pinned here for machines without Java)."""

import math
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from dragonfly import metrics
from dragonfly.metrics import (
    closed_accuracy,
    coco_tokenize,
    compute_metrics,
    exact_match,
    relaxed_accuracy,
    score_task,
    token_f1,
    vqa_accuracy,
    vqa_normalize_answer,
    vqa_process_punctuation,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="COCO's reference jars need java")

# ----------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("humans_agreeing", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_accuracy_averages_min_matches_over_3_across_leave_one_out_subsets(humans_agreeing, expected):
    # Of the 10 subsets of 9 annotators, k leave out a matching annotator (k-1 matches remain) and
    # 10-k do not (k remain): k=1 -> (9 * 1/3) / 10 = 0.3, k=2 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6,
    # k=3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["cat"] * humans_agreeing + ["dog"] * (10 - humans_agreeing)
    assert vqa_accuracy(["cat"], [answers]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two dogs.", "2 dogs"),  # number words -> digits, final period dropped, lowercase
        ("The red one", "red 1"),  # articles dropped
        ("t-shirt", "t shirt"),  # a mark with no space next to it becomes a space ...
        ("black - white", "black white"),  # ... and one next to a space is deleted
        ("1,000", "1000"),  # digit-comma-digit anywhere: every mark is deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("dont", "don't"),  # contractions restored
        ("Im", "im"),  # the script's upper-case keys never match its lowercased words
        ("man's hat", "man's hat"),  # the apostrophe is not in its punctuation list
        ("  yes\n", "yes"),
    ],
)
def test_vqa_prediction_normalisation_follows_the_official_script(raw, normalised):
    assert vqa_normalize_answer(raw) == normalised


def test_vqa_period_strip_stops_after_32_like_the_official_script():
    # vqaEval.py passes re.UNICODE (32) as `sub`'s count argument.
    assert vqa_process_punctuation("." * 40) == "." * 8


def test_vqa_human_answers_are_only_punctuation_processed_and_only_when_they_disagree():
    # All ten agree: the script leaves them untouched, while the prediction "two" becomes "2".
    assert vqa_accuracy(["two"], [["two"] * 10]) == 0.0
    assert vqa_accuracy(["two"], [["two"] * 10], normalize_references=True) == 1.0
    # They disagree: punctuation processing turns "t-shirt" into "t shirt", matching the prediction.
    assert vqa_accuracy(["T-shirt"], [["t-shirt"] * 3 + ["shirt"] * 7]) == pytest.approx(0.9)


def test_vqa_accuracy_per_sample_keeps_input_order_and_corpus_is_the_mean():
    predictions = ["2", "Yes.", "red"]
    references = [["2"] * 3 + ["3"] * 7, ["yes"] * 10, ["red"] + ["blue"] * 9]
    per_sample = vqa_accuracy(predictions, references, per_sample=True)
    assert per_sample == pytest.approx([0.9, 1.0, 0.3])
    assert vqa_accuracy(predictions, references) == pytest.approx(2.2 / 3)


# ------------------------------------------------------------------------- token F1 / exact / closed


def test_token_f1_is_squad_bag_of_tokens_f1():
    # Normalised: [cat, sat, on, mat] vs [cat, on, mat]: 3 shared, P = 3/4, R = 1, F1 = 6/7.
    assert token_f1(["The cat sat on the mat."], ["a cat on a mat"]) == pytest.approx(6 / 7)
    # Shared tokens are counted with multiplicity: 1 shared "yes", P = 1/3, R = 1.
    assert token_f1(["yes yes yes"], ["yes"]) == pytest.approx(0.5)
    assert token_f1(["blue"], ["red"]) == 0.0


def test_token_f1_takes_the_best_reference_and_scores_empty_answers_like_squad_v2():
    assert token_f1(["left lung"], [["right kidney", "left lung", "lung"]]) == 1.0
    assert token_f1(["the"], ["a"]) == 0.0  # article-only answers keep their articles (option letters)
    assert token_f1([""], ["lung"]) == 0.0


def test_exact_match_compares_squad_normalised_strings():
    assert exact_match(
        ["The Answer!", "an answer", "answers"], ["answer", "Answer", "answer"], per_sample=True
    ) == [
        1.0,
        1.0,
        0.0,
    ]


def test_closed_accuracy_matches_the_leading_words_of_the_normalised_prediction():
    predictions = ["Yes, there is a fracture.", "No.", "Not sure", "yes", "CT scan of the head"]
    references = ["yes", "No", "no", "no", "CT"]
    assert closed_accuracy(predictions, references, per_sample=True) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_option_letters_survive_normalisation():
    """SQuAD drops the article "a", so the option "A" became "" and every empty or article-only
    prediction matched it (and a closed-ended "A" reference raised)."""
    predictions = ["", "The", ".", "B", "A.", "(A)", "a cat"]
    assert exact_match(predictions, ["A"] * 6 + ["cat"], per_sample=True) == [0, 0, 0, 0, 1, 1, 1]
    assert token_f1([""], ["A"]) == 0.0
    assert closed_accuracy(["A", "A) the lung", "B"], ["A", "a", "A"], per_sample=True) == [1.0, 1.0, 0.0]


def test_vqa_accuracy_with_one_reference_is_a_normalised_match():
    """A LLaVA manifest carries one answer: with leave-one-out over it every prediction scored 0."""
    assert vqa_accuracy(["Nike", "two", "no"], [["Nike"], ["2"], ["Yes"]], per_sample=True) == [1.0, 1.0, 0.0]


def test_closed_accuracy_rejects_a_reference_that_normalises_to_nothing():
    with pytest.raises(ValueError, match="empty after normalisation"):
        closed_accuracy(["yes"], ["?"])


# --------------------------------------------------------------------------------------------- ChartQA


@pytest.mark.parametrize(
    ("prediction", "target", "correct"),
    [
        ("12.4", "12", 1.0),  # 3.3% off
        ("12.7", "12", 0.0),  # 5.8% off
        ("105", "100", 1.0),  # exactly 5% counts
        ("50%", "0.52", 1.0),  # percentages read as fractions
        ("0", "0.0", 0.0),  # a zero target has no tolerance: string match, as in Pix2Struct
        ("Apple\n", "apple", 1.0),  # non-numbers: case-insensitive string match
        ("1,200", "1200", 0.0),  # Pix2Struct does not read thousands separators
    ],
)
def test_relaxed_accuracy_follows_pix2struct(prediction, target, correct):
    assert relaxed_accuracy([prediction], [target]) == correct


def test_relaxed_accuracy_can_read_thousands_separators_and_takes_the_best_target():
    assert relaxed_accuracy(["1,200"], ["1200"], strip_commas=True) == 1.0
    assert relaxed_accuracy(["7"], [["seven", "7.1"]]) == 1.0


# ------------------------------------------------------------------------------------------ captions

# Stanford PTBTokenizer 3.4.1 (-lowerCase) + COCO's punctuation filter, recorded from pycocoevalcap.
JAVA_TOKENIZED = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    (
        "Heart size is normal. There is no pleural effusion or pneumothorax.",
        "heart size is normal there is no pleural effusion or pneumothorax",
    ),
    (
        "The patient's x-ray shows a 3.5 cm nodule (left lobe); no acute change!",
        "the patient 's x-ray shows a 3.5 cm nodule -lrb- left lobe -rrb- no acute change",
    ),
    (
        "Compared to 01/02/2020, the lungs are clear -- no focal consolidation.",
        "compared to 01/02/2020 the lungs are clear no focal consolidation",
    ),
    (
        "Don't worry, it can't be U.S. based, e.g. Dr. Smith's 5% \"quoted\" [bracket] {brace}...",
        "do n't worry it ca n't be u.s. based e.g. dr. smith 's 5 % quoted -lsb- bracket -rsb- -lcb- brace -rcb-",
    ),
    (
        "T2-weighted MRI: 10mm lesion at L4-L5, ~2x3 cm; ?possible mass & calcification",
        "t2-weighted mri 10mm lesion at l4-l5 ~ 2x3 cm possible mass & calcification",
    ),
    (
        "It's 5:30 p.m. and $3,000.50 cost; cannot, won't, I'm, they'll, we've, gonna",
        "it 's 5:30 p.m. and $ 3,000.50 cost can not wo n't i 'm they 'll we 've gon na",
    ),
    (
        "Right-sided PICC line terminates in the SVC...No pneumothorax.",
        "right-sided picc line terminates in the svc no pneumothorax",
    ),
    (
        "Status post CABG. Sternotomy wires intact.Clips noted.",
        "status post cabg sternotomy wires intact.clips noted",
    ),
    (
        "See Fig. 2 and Table 3, etc. for details vs. baseline.",
        "see fig. 2 and table 3 etc. for details vs. baseline",
    ),
    ("Values 1,2 and -5 and +/- 3 and 3-4 and 2. done", "values 1,2 and -5 and + / 3 and 3-4 and 2 done"),
    ("Pt. is 65 y/o male w/ hx of CHF. BP 120/80.", "pt is 65 y/o male w / hx of chf bp 120/80"),
    (
        "There are bibasilar opacities,likely atelectasis.Moderate cardiomegaly",
        "there are bibasilar opacities likely atelectasis.moderate cardiomegaly",
    ),
    (
        "Left- and right-sided effusions; ca. 3 cm; i.e. small",
        "left and right-sided effusions ca. 3 cm i.e. small",
    ),
    (
        "the patients' rooms; 5'10\" tall; 'single quotes' and `backticked' text",
        "the patients rooms 5 10 tall single quotes and backticked text",
    ),
    (
        "Trailing comma, and ; semicolon ;; and -- dash --- triple wait!! and ??",
        "trailing comma and semicolon and dash triple wait !! and ??",
    ),
    ("café naïve résumé — en–dash ‘single’ “double”", "café naïve résumé en dash single double"),
]


@pytest.mark.parametrize(("text", "java_tokens"), JAVA_TOKENIZED)
def test_coco_tokenize_matches_recorded_java_ptb_tokenizer(text, java_tokens):
    assert coco_tokenize(text) == java_tokens


@needs_java
def test_coco_tokenize_matches_the_live_java_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [text for text, _ in JAVA_TOKENIZED]
    java = PTBTokenizer().tokenize({i: [{"caption": text}] for i, text in enumerate(texts)})
    assert [coco_tokenize(text) for text in texts] == [java[i][0] for i in range(len(texts))]


PREDICTIONS = [
    "a man riding a wave on a surfboard.",
    "two dogs playing in the snow",
    "a plate of food",
    "No acute cardiopulmonary process.",
    "The heart is enlarged. Small left effusion.",
]
REFERENCES = [
    ["A man surfing a big wave.", "a surfer riding a wave on top of a surfboard"],
    ["Two dogs play in the snow.", "dogs running through snow"],
    ["a plate with broccoli and rice", "food on a white plate"],
    "No acute cardiopulmonary abnormality.",
    ["Cardiomegaly with a small left pleural effusion."],
]
# pycocoevalcap's METEOR 1.5 jar on these captions (COCOEvalCap's numbers), recorded with java 17.
JAVA_METEOR_PER_SAMPLE = [0.3307142854235021, 0.8666666666666667, 0.26540284360189575, 0.36284854406070305,
                          0.23650689870580416]  # fmt: skip
JAVA_METEOR_CORPUS = 0.3352764003728106


def _coco_inputs():
    gts = {
        i: [coco_tokenize(r) for r in ([refs] if isinstance(refs, str) else refs)]
        for i, refs in enumerate(REFERENCES)
    }
    res = {i: [coco_tokenize(p)] for i, p in enumerate(PREDICTIONS)}
    return gts, res


def test_caption_scores_equal_pycocoevalcap_on_the_same_tokens():
    gts, res = _coco_inputs()
    scores = score_task("caption", PREDICTIONS, REFERENCES)
    bleu_corpus, bleu_samples = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        assert scores.corpus[f"bleu_{n + 1}"] == bleu_corpus[n]
        assert scores.per_sample[f"bleu_{n + 1}"] == bleu_samples[n]
    cider_corpus, cider_samples = Cider().compute_score(gts, res)
    assert scores.corpus["cider"] == cider_corpus
    assert scores.per_sample["cider"] == list(cider_samples)
    rouge_corpus, rouge_samples = Rouge().compute_score(gts, res)
    assert scores.corpus["rouge_l"] == rouge_corpus
    assert scores.per_sample["rouge_l"] == list(rouge_samples)
    assert set(scores.corpus) == set(metrics.CAPTION_METRICS)
    assert all(len(values) == len(PREDICTIONS) for values in scores.per_sample.values())


def test_bleu_1_is_clipped_unigram_precision_with_brevity_penalty():
    # "the cat the cat" vs "the cat sat": each of "the"/"cat" counts once -> 2/4; longer than the
    # reference, so no brevity penalty.
    assert metrics.bleu(["the cat the cat"], ["the cat sat"])["bleu_1"] == pytest.approx(0.5)
    # A 2-token hypothesis against a 3-token reference: BP = exp(1 - 3/2).
    assert metrics.bleu(["the cat"], ["the cat sat"])["bleu_1"] == pytest.approx(math.exp(-0.5))


def test_rouge_l_is_lcs_f_measure_with_beta_1_2():
    # LCS("a b c d", "a c e d f") = 3: P = 3/4, R = 3/5, F = (1 + 1.2^2) P R / (R + 1.2^2 P).
    p, r = 3 / 4, 3 / 5
    expected = (1 + 1.44) * p * r / (r + 1.44 * p)
    assert metrics.rouge_l(["a b c d"], ["a c e d f"]) == pytest.approx(expected)


def test_cider_weighs_ngrams_by_corpus_idf_and_is_zero_on_a_one_sample_corpus():
    assert metrics.cider(["a dog on grass"], ["a dog on grass"]) == 0.0  # every n-gram's idf is log(1)
    per_sample = metrics.cider(
        ["a dog on grass", "a red car", "a cat"],
        [["a dog on the grass", "dog on grass"], ["a red car parked"], ["a bowl of soup"]],
        per_sample=True,
    )
    # "a" is in every sample's references (idf 0), so "a cat" earns nothing; the others share rarer words.
    assert per_sample[0] > 0 and per_sample[1] > 0 and per_sample[2] == 0.0


def test_meteor_python_backend_reproduces_the_meteor_paper_worked_example():
    # Banerjee & Lavie (2005): 6 of 6 hypothesis words match the 7-word reference in 2 chunks.
    # Fmean = 10PR / (R + 9P) with P = 1, R = 6/7; penalty = 0.5 (2/6)^3.
    recall = 6 / 7
    expected = 10 * recall / (recall + 9) * (1 - 0.5 * (2 / 6) ** 3)
    score = metrics.meteor(
        ["the president spoke to the audience"], ["the president then spoke to the audience"]
    )
    assert score == pytest.approx(expected)


def test_meteor_python_backend_matches_stems_but_not_synonyms():
    # "playing"/"play" match through the Porter stemmer: all 6 words, one chunk.
    assert metrics.meteor(["two dogs playing in the snow"], ["Two dogs play in the snow."]) == pytest.approx(
        1 - 0.5 * (1 / 6) ** 3
    )
    # "big"/"large" would need WordNet, which this backend does not use.
    assert metrics.meteor(["big"], ["large"]) == 0.0


@needs_java
@pytest.mark.slow
def test_java_backend_is_cocoevalcap_meteor_1_5():
    scores = score_task("caption", PREDICTIONS, REFERENCES, caption_backend="java")
    assert scores.per_sample["meteor"] == pytest.approx(JAVA_METEOR_PER_SAMPLE, abs=1e-9)
    assert scores.corpus["meteor"] == pytest.approx(JAVA_METEOR_CORPUS, abs=1e-9)
    # The Java tokenizer agrees with ours on these captions, so the other metrics do not move.
    python = score_task("caption", PREDICTIONS, REFERENCES)
    for name in ("bleu_4", "rouge_l", "cider"):
        assert scores.corpus[name] == python.corpus[name]


def test_java_backend_without_java_names_the_cause(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs `java` on PATH"):
        metrics.meteor(["a cat"], ["a cat"], backend="java")


# ------------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    ("task", "names"),
    [
        ("vqa", {"vqa_accuracy"}),
        ("closed", {"closed_accuracy"}),
        ("open", {"token_f1", "exact_match"}),
        ("chartqa", {"relaxed_accuracy"}),
        ("exact", {"exact_match"}),
    ],
)
def test_compute_metrics_gives_each_tasks_metric_set(task, names):
    predictions, references = ["yes", "2"], [["yes"] * 10, ["2"] * 10]
    corpus = compute_metrics(task, predictions, references)
    per_sample = compute_metrics(task, predictions, references, per_sample=True)
    assert set(corpus) == names == set(per_sample)
    for name in names:
        assert per_sample[name] == [1.0, 1.0]
        assert corpus[name] == 1.0


def test_open_task_reports_token_f1_and_exact_match():
    assert compute_metrics("open", ["The cat sat", "no"], [["a cat sat down"], "No."]) == {
        "token_f1": pytest.approx((0.8 + 1.0) / 2),
        "exact_match": 0.5,
    }


@pytest.mark.parametrize(
    ("predictions", "references", "error", "message"),
    [
        (["a", "b"], ["a"], ValueError, "2 predictions but 1 references"),
        ([], [], ValueError, "no samples"),
        ("yes", ["yes"], TypeError, "not a str"),
        ([None], ["yes"], TypeError, "sample 0: prediction is NoneType"),
        (["a", "b"], ["a", []], ValueError, "sample 1: references must be"),
    ],
)
def test_bad_inputs_raise_naming_the_sample(predictions, references, error, message):
    with pytest.raises(error, match=message):
        compute_metrics("exact", predictions, references)


def test_unknown_task_and_caption_metric_are_rejected():
    with pytest.raises(ValueError, match="unknown task 'bleu'"):
        compute_metrics("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="unknown caption metrics"):
        metrics.caption_scores(["a"], ["a"], metrics=["spice"])
