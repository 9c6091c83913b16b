"""Evaluation metrics for phi3mm (pure Python, no model code).

Owns: VQAv2 answer normalisation and soft accuracy (faithful to the official
VQA evaluation script), light exact match, corpus BLEU (via sacrebleu), corpus
word error rate, and aggregation of per-example scores into summaries and
Markdown tables for the evaluation command.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

__all__ = [
    "normalize_vqa_answer",
    "vqa_soft_score",
    "exact_match",
    "corpus_bleu",
    "word_error_rate",
    "summarize",
    "markdown_table",
]

# --- Official VQA evaluation tables (vqaEval.py), copied verbatim, quirks included
# (e.g. capitalised keys that never match after lowercasing, "somebody'd" -> "somebodyd"),
# so our numbers are comparable with published VQAv2 accuracies.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# "(?!<=\d)" is the official (malformed) lookbehind: it is really a lookahead that never
# blocks, so any period not followed by a digit is removed ("3.5" survives, "dog." does not).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!"]


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # Official rule: delete the mark if it touches a space or the text has a digit comma
        # ("1,000" -> "1000"); otherwise it separates words ("black/white" -> "black white").
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official script passes re.UNICODE (== 32) positionally as `count`; keep that cap.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(s: str) -> str:
    """Official VQAv2 answer normalisation (punctuation, numbers, articles, contractions)."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(s))


def vqa_soft_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy: mean over leave-one-out annotator subsets of min(1, matches/3).

    Ground-truth answers are normalised like the prediction (as common VQA harnesses do),
    so "Two" and "2" match regardless of which side wrote which.
    """
    if not answers:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(a) == pred for a in answers]
    if len(hits) == 1:
        # Leave-one-out would leave nobody to agree with; a lone reference means exact match.
        return float(hits[0])
    total_matches = sum(hits)
    # Dropping annotator i leaves total_matches - hits[i] matching answers among the others.
    return sum(min(1.0, (total_matches - h) / 3.0) for h in hits) / len(hits)


# Trailing sentence punctuation / wrapping quotes only; articles and inner text are kept.
_LEAD_JUNK = re.compile(r"^[\s\"'`]+")
_TRAIL_JUNK = re.compile(r"[\s.!?,;:\"'`]+$")


def _light_normalize(s: str) -> str:
    s = " ".join(s.lower().split())
    return _TRAIL_JUNK.sub("", _LEAD_JUNK.sub("", s))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if equal after lowercasing and stripping whitespace / trailing punctuation."""
    return float(_light_normalize(prediction) == _light_normalize(reference))


def corpus_bleu(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) via sacrebleu.

    `references` is either one reference per prediction (list[str]) or a list of
    references per prediction (list[list[str]], counts may differ per example).
    """
    import sacrebleu  # local import: keeps the rest of the module dependency-free

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    if not predictions:
        return 0.0
    per_example = [[r] if isinstance(r, str) else list(r) for r in references]
    # sacrebleu wants reference *streams* (one list per reference slot); pad ragged slots
    # with None, which sacrebleu skips.
    n_slots = max(len(r) for r in per_example)
    streams = [[r[k] if k < len(r) else None for r in per_example] for k in range(n_slots)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


_NON_WORD = re.compile(r"[^\w\s]")


def _wer_words(s: str) -> list[str]:
    return _NON_WORD.sub("", s.lower()).split()


def _edit_distance(hyp: list[str], ref: list[str]) -> int:
    # Single-row Levenshtein DP: substitutions, insertions and deletions all cost 1.
    row = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, 1):
        prev_diag, row[0] = row[0], i
        for j, r in enumerate(ref, 1):
            cur = min(row[j] + 1, row[j - 1] + 1, prev_diag + (h != r))
            prev_diag, row[j] = row[j], cur
    return row[-1]


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER: total word edits / total reference words (lowercased, punctuation removed)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    edits = n_ref = 0
    for p, r in zip(predictions, references):
        ref = _wer_words(r)
        edits += _edit_distance(_wer_words(p), ref)
        n_ref += len(ref)
    # Guard against empty references: report raw edit count rather than dividing by zero.
    return edits / max(n_ref, 1)


def summarize(records: Sequence, group_score=None) -> dict:
    """Score and count overall and per `question_type`, the one summary every report uses.

    `records` are dicts or objects with `question_type` and `score`; a record without a type counts
    as "unknown", and a set with no types at all has no per-type groups. `group_score(members)` scores
    a group (a corpus metric such as BLEU is not a mean of row scores); default: the mean score.
    """

    def get(record, key):
        return record.get(key) if isinstance(record, dict) else getattr(record, key, None)

    def stat(members: list) -> dict:
        if not members:
            return {"score": 0.0, "n": 0}
        score = group_score(members) if group_score else sum(float(get(r, "score")) for r in members) / len(members)
        return {"score": score, "n": len(members)}

    groups: dict[str, list] = defaultdict(list)
    if any(get(record, "question_type") for record in records):
        for record in records:
            groups[str(get(record, "question_type") or "unknown")].append(record)
    return {"overall": stat(list(records)), "by_type": {t: stat(groups[t]) for t in sorted(groups)}}


def markdown_table(summary: dict, title: str) -> str:
    """Render a `summarize` result as a Markdown table; scores (0-1) shown as percentages."""
    lines = [f"### {title}", "", "| type | n | score |", "|---|---:|---:|"]
    for qtype, stat in summary.get("by_type", {}).items():
        lines.append(f"| {qtype} | {stat['n']} | {100 * stat['score']:.1f}% |")
    overall = summary["overall"]
    lines.append(f"| **overall** | {overall['n']} | {100 * overall['score']:.1f}% |")
    return "\n".join(lines) + "\n"
