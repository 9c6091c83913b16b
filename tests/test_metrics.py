"""Tests for phi3mm.metrics: VQA normalisation/soft score, exact match, BLEU, WER, summaries."""

import pytest

from phi3mm.metrics import (
    corpus_bleu,
    exact_match,
    markdown_table,
    normalize_vqa_answer,
    summarize,
    vqa_soft_score,
    word_error_rate,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("ten", "10"),
        ("none", "0"),
        ("the dog.", "dog"),
        ("A Dog", "dog"),
        ("an apple", "apple"),
        ("1,000", "1000"),
        ("3.5", "3.5"),  # a period before a digit is kept
        ("dont", "don't"),
        ("whats up", "what's up"),
        ("its", "its"),  # "its" is NOT in the official contractions map
        ("it's", "it's"),
        ("black/white", "black white"),  # punctuation not touching spaces splits words
        ("yes !", "yes"),  # punctuation next to a space is deleted
        ("  Red\tcar\n", "red car"),
        ("somebody'd", "somebodyd"),  # official map quirk, kept for comparability
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_soft_score_two_of_ten():
    # 8 subsets keep both "yes" (2/3), 2 subsets keep one (1/3) -> (8*2/3 + 2*1/3)/10 = 0.6.
    answers = ["yes", "yes"] + ["no"] * 8
    assert vqa_soft_score("yes", answers) == pytest.approx(0.6)


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_score_counts(k, expected):
    # With exactly 3 matches, the 3 subsets dropping a match give 2/3 -> (7 + 3*2/3)/10 = 0.9;
    # 4+ matches always leave >= 3 matches -> 1.0.
    answers = ["yes"] * k + ["no"] * (10 - k)
    assert vqa_soft_score("yes", answers) == pytest.approx(expected)


def test_vqa_soft_score_normalises_both_sides():
    assert vqa_soft_score("Two.", ["2"] * 10) == pytest.approx(1.0)
    assert vqa_soft_score("2", ["two"] * 10) == pytest.approx(1.0)
    assert vqa_soft_score("The dog", ["dog"] * 5) == pytest.approx(1.0)


def test_vqa_soft_score_few_answers():
    assert vqa_soft_score("Red.", ["red"]) == 1.0
    assert vqa_soft_score("blue", ["red"]) == 0.0
    assert vqa_soft_score("red", []) == 0.0
    # Two answers, both matching: each leave-one-out subset has 1 match -> 1/3.
    assert vqa_soft_score("red", ["red", "red"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("Red", "red.", 1.0),
        ("red!", "Red", 1.0),
        ("  red  ", "red", 1.0),
        ('"red."', "red", 1.0),
        ("the red car", "red car", 0.0),  # articles are not removed
        ("blue", "red", 0.0),
        ("3.5", "3.5", 1.0),
    ],
)
def test_exact_match(pred, ref, expected):
    assert exact_match(pred, ref) == expected


def test_corpus_bleu():
    sents = ["the quick brown fox jumps over the lazy dog", "a small cat sleeps on the warm mat"]
    assert corpus_bleu(sents, sents) == pytest.approx(100.0)
    assert corpus_bleu(sents, [[s] for s in sents]) == pytest.approx(100.0)
    # Ragged multi-reference lists: a matching alternative still gives a perfect score.
    assert corpus_bleu(sents, [[sents[0], "other text"], [sents[1]]]) == pytest.approx(100.0)
    unrelated = corpus_bleu(["my cat eats fish every single morning"], ["the red car is very fast today"])
    assert unrelated < 1.0
    assert corpus_bleu([], []) == 0.0
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])


def test_word_error_rate():
    # Reference 5 words; "brown" -> "red" (substitution) and "jumps" deleted -> 2/5.
    assert word_error_rate(["The quick red fox."], ["the quick brown fox jumps"]) == pytest.approx(0.4)
    assert word_error_rate(["Hello, world!"], ["hello world"]) == 0.0
    # Corpus level: (1 insertion + 0) / (2 + 3) words.
    assert word_error_rate(["a b c", "x y z"], ["a b", "x y z"]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        word_error_rate(["a"], [])


def test_summarize_and_markdown():
    records = [
        {"question_type": "color", "metric": "exact_match", "score": 1.0},
        {"question_type": "color", "metric": "exact_match", "score": 0.0},
        {"question_type": "count", "metric": "vqa", "score": 0.6},
    ]
    s = summarize(records)
    assert s["overall"]["n"] == 3
    assert s["overall"]["score"] == pytest.approx(1.6 / 3)
    assert s["by_type"]["color"] == {"score": 0.5, "n": 2}
    assert s["by_type"]["count"]["score"] == pytest.approx(0.6)
    assert summarize([]) == {"overall": {"score": 0.0, "n": 0}, "by_type": {}}

    md = markdown_table(s, "Demo eval")
    assert "Demo eval" in md
    assert "| type | n | score |" in md
    assert "| color | 2 | 50.0% |" in md
    assert "| count | 1 | 60.0% |" in md
    assert "| **overall** | 3 | 53.3% |" in md
