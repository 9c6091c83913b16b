"""python -m phi3mm.evaluate --model outputs/demo/model --data_path outputs/demo/data/eval.json \
    --image_folder outputs/demo/data --audio_folder outputs/demo/data [--blank_media] [--output_json out.json]

Batched greedy evaluation of a checkpoint on LLaVA-format conversations or VQAv2 / GQA / TextVQA
question files; `evaluate()` is the same code for training loops (the demo's eval.json too).

Rows, format detected per row:
- LLaVA: `{"id", "image"?, "audio"?, "conversations": [...], "question_type"?}`. The final gpt turn
  is the reference, everything before it the prompt (earlier answers included, as in a chat).
- Question files: `{"question_id", "image", "question" | "text", "answers": [str | {"answer": str}]
  (VQAv2, TextVQA) | "answer": str (GQA), "question_type"?}`; the question is asked as written
  (LLaVA's files already end with "Answer the question using a single word or phrase.").
A row may declare its own `"metric"`. With `metric="auto"`, an answers list is scored with the VQA
soft score and a single reference with exact match; `bleu` (captions) and `wer` (transcripts) are
corpus-level, overall and per question type, reported as fractions (BLEU / 100, WER 0.12 = 12%).
Rows whose media are missing or unreadable are skipped and counted. `--blank_media` swaps every
image for a white one of the same size and every clip for silence of the same length: a model that
uses its inputs should then fall to about chance.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from phi3mm.data import audio_tokens_from_header, read_rows, row_media, row_messages
from phi3mm.metrics import corpus_bleu, exact_match, markdown_table, summarize, vqa_soft_score, word_error_rate
from processing_multimodal import SAMPLING_RATE, load_audio, load_image

logger = logging.getLogger(__name__)

METRICS = ("exact_match", "vqa", "bleu", "wer")
CORPUS_METRICS = ("bleu", "wer")  # scored over a whole group, not averaged per row
N_SHOWN = 50  # predictions kept in the result for reading


@dataclass
class Item:
    """One question ready to ask: the prompt, its media paths in placeholder order, the references."""

    index: int
    id: object
    prompt: str
    images: list  # paths, or in-memory media from a data set
    audio: list
    references: list[str]
    metric: str
    question_type: str | None
    length: int = 0  # estimated prompt tokens, for sorting into batches
    prediction: str = ""
    score: float = 0.0
    media: dict = field(default_factory=dict)


def prepare_row(
    row: dict,
    index: int,
    processor,
    image_folder: str | os.PathLike | None = None,
    audio_folder: str | os.PathLike | None = None,
    metric: str = "auto",
) -> Item:
    """A row of either format -> an `Item`; ValueError when the row cannot be asked."""
    image_token, audio_token = processor.image_token, processor.audio_token
    answers = row.get("answers")
    references = [a["answer"] if isinstance(a, dict) else a for a in answers] if isinstance(answers, list) else None
    if "conversations" in row or "messages" in row:
        messages = row_messages(row, image_token, audio_token)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages, references = messages[:last], references or [messages[last]["content"]]
    else:
        question = row.get("question") or row.get("text")
        if not isinstance(question, str):
            raise ValueError("no question (a 'question' or 'text' key) and no conversations")
        if "answer" in row and references is None:
            references = [row["answer"]]
        kinds = ((image_token, "image"), (audio_token, "audio"))
        tags = [token for token, kind in kinds for _ in row_media(row, kind, None)]
        if image_token not in question and audio_token not in question:
            question = "\n".join(tags + [question])
        messages = [{"role": "user", "content": question}]
    if not references or not all(isinstance(r, str) for r in references):
        raise ValueError("no reference answer")
    row_metric = row.get("metric") or ("vqa" if isinstance(answers, list) else "exact_match")
    row_metric = row_metric if metric == "auto" else metric
    if row_metric not in METRICS:
        raise ValueError(f"unknown metric {row_metric!r}; choose from {METRICS}")

    # Media whose placeholder sits in a turn after the reference are not sent (the prompt lacks it).
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = row_media(row, "image", image_folder)[: prompt.count(image_token)]
    audio = row_media(row, "audio", audio_folder)[: prompt.count(audio_token)]
    for path in images + audio:
        if isinstance(path, Path) and not path.is_file():
            raise FileNotFoundError(f"missing media file {path}")
    return Item(
        index=index,
        id=row.get("id", row.get("question_id", index)),
        prompt=prompt,
        images=images,
        audio=audio,
        references=references,
        metric=row_metric,
        question_type=row.get("question_type"),
    )


def _estimate_length(item: Item, processor) -> int:
    """Prompt tokens with media expanded; audio from the file header (no decoding)."""
    n = len(processor.tokenizer(item.prompt, add_special_tokens=False)["input_ids"])
    n += len(item.images) * (processor.image_seq_length - 1)
    n += sum(audio_tokens_from_header(processor, path) - 1 for path in item.audio)
    return n


BLANKS = {False: (), True: ("image", "audio"), "image": ("image",), "audio": ("audio",)}


def _load_media(item: Item, blank_media: bool | str) -> dict:
    images = [load_image(path, i) for i, path in enumerate(item.images)]
    clips = [load_audio(path, i) for i, path in enumerate(item.audio)]
    if "image" in BLANKS[blank_media]:
        images = [Image.new("RGB", image.size, (255, 255, 255)) for image in images]
    if "audio" in BLANKS[blank_media]:
        clips = [np.zeros_like(clip) for clip in clips]
    return {"images": images, "audio": clips}


def _encode(processor, items: list[Item]):
    return processor(
        text=[item.prompt for item in items],
        images=[item.media["images"] for item in items],
        audio=[item.media["audio"] for item in items],
        sampling_rate=SAMPLING_RATE,
        return_tensors="pt",
        padding_side="left",  # generation appends on the right, so prompts must end together
    )


def _score(metric: str, predictions: list[str], references: list[list[str]]) -> float:
    """One number for a group of rows sharing a metric (a single row included)."""
    if metric == "bleu":
        return corpus_bleu(predictions, references) / 100
    if metric == "wer":
        return word_error_rate(predictions, [refs[0] for refs in references])
    if metric == "vqa":
        return sum(vqa_soft_score(p, refs) for p, refs in zip(predictions, references)) / len(predictions)
    return sum(max(exact_match(p, r) for r in refs) for p, refs in zip(predictions, references)) / len(predictions)


def _group_score(members: list[Item]) -> float:
    """Corpus metrics over the whole group; exact match and VQA rows are both accuracies, so they average."""
    if members[0].metric in CORPUS_METRICS:
        return _score(members[0].metric, [m.prediction for m in members], [m.references for m in members])
    return sum(m.score for m in members) / len(members)


@torch.inference_mode()
def evaluate(
    model,
    processor,
    rows: list[dict],
    image_folder: str | os.PathLike | None = None,
    audio_folder: str | os.PathLike | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    blank_media: bool | str = False,
    metric: str = "auto",
    progress: bool = True,
) -> dict:
    """Answer every row greedily in length-sorted, left-padded batches and score the answers.

    Returns {"n", "skipped", "skip_reasons", "metric", "overall": {"score", "n"}, "by_type":
    {type: {"score", "n"}}, "predictions": the first 50 rows as {id, question_type, prediction,
    reference, score}}. Scores are fractions; `n` counts the rows answered. The model is put in
    eval mode and back in train mode afterwards if it was training. `blank_media`: True swaps
    every image for a white one and every clip for silence (the question-only floor); "image" or
    "audio" blanks only that kind (a spoken question with its clip silenced, say).
    """
    if blank_media not in BLANKS:
        raise ValueError(f"blank_media must be one of {list(BLANKS)}, got {blank_media!r}")
    if metric != "auto" and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from auto, {', '.join(METRICS)}")
    skipped: Counter = Counter()

    def skip(reason: str, item_id, error: Exception) -> None:
        skipped[reason] += 1
        if sum(skipped.values()) <= 5:
            logger.warning("skipping row %r (%s): %s", item_id, reason, error)

    items = []
    for index, row in enumerate(rows):
        try:
            items.append(prepare_row(row, index, processor, image_folder, audio_folder, metric))
        except FileNotFoundError as error:
            skip("missing media", row.get("id", row.get("question_id", index)), error)
        except (ValueError, KeyError, TypeError) as error:
            skip("bad row", row.get("id", row.get("question_id", index)), error)
    metrics = sorted({item.metric for item in items})
    if len(metrics) > 1 and set(metrics) & set(CORPUS_METRICS):
        raise ValueError(f"rows mix the metrics {metrics}: {'/'.join(CORPUS_METRICS)} cannot be averaged with others")
    for item in items:
        item.length = _estimate_length(item, processor)
    order = sorted(items, key=lambda item: -item.length)  # longest first: memory trouble shows at once

    was_training = getattr(model, "training", False)
    model.eval()
    device = getattr(model, "device", "cpu")
    answered: list[Item] = []
    with tqdm(total=len(order), desc="evaluate", unit="row", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = []
            for item in order[start : start + batch_size]:
                try:
                    item.media = _load_media(item, blank_media)
                    batch.append(item)
                except ValueError as error:
                    skip("unreadable media", item.id, error)
            try:
                inputs = _encode(processor, batch) if batch else None
            except ValueError:  # find the row at fault (a prompt over the context, say); keep the rest
                for item in list(batch):
                    try:
                        _encode(processor, [item])
                    except ValueError as error:
                        skip("unusable input", item.id, error)
                        batch.remove(item)
                inputs = _encode(processor, batch) if batch else None
            if inputs is not None:
                inputs = inputs.to(device)
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for item, text in zip(batch, texts):
                    item.prediction, item.media = text.strip(), {}
                    item.score = _score(item.metric, [item.prediction], [item.references])
                    answered.append(item)
            bar.update(len(order[start : start + batch_size]))
    if was_training:
        model.train()

    answered.sort(key=lambda item: item.index)
    return {
        "n": len(answered),
        "skipped": sum(skipped.values()),
        "skip_reasons": dict(skipped),
        "metric": "+".join(metrics) or (metric if metric != "auto" else "exact_match"),
        **summarize(answered, _group_score),
        "predictions": [
            {
                "id": item.id,
                "question_type": item.question_type,
                "prediction": item.prediction,
                "reference": item.references[0] if len(item.references) == 1 else item.references,
                "score": item.score,
            }
            for item in answered[:N_SHOWN]
        ],
    }


def results_markdown(result: dict, title: str) -> str:
    """The per-type table, with the metric and the skipped rows named under it."""
    note = f"\nmetric: {result['metric']}; {result['n']} rows answered, {result['skipped']} skipped"
    if result["skipped"]:
        note += " (" + ", ".join(f"{reason}: {n}" for reason, n in result["skip_reasons"].items()) + ")"
    return markdown_table(result, title) + note + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on LLaVA-format or VQAv2 / GQA / TextVQA rows.")
    parser.add_argument("--model", required=True, help="checkpoint folder (AutoModelForCausalLM + AutoProcessor)")
    parser.add_argument("--data_path", required=True, help="JSON list or JSON Lines, LLaVA or VQA-style rows")
    parser.add_argument("--image_folder", default=None)
    parser.add_argument("--audio_folder", default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--output_md", default=None)
    parser.add_argument("--blank_media", nargs="?", const=True, default=False, choices=[True, "image", "audio"],
                        help="white images and silent audio (chance check); `--blank_media audio` silences only the clips")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--metric", default="auto", choices=("auto",) + METRICS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: bfloat16 on a GPU that has it, else float32")  # fmt: skip
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoProcessor

    dtype = args.dtype
    if dtype == "auto":
        bf16 = args.device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=getattr(torch, dtype))
    model.to(args.device)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    rows = read_rows(args.data_path)[: args.limit]

    result = evaluate(
        model,
        processor,
        rows,
        image_folder=args.image_folder,
        audio_folder=args.audio_folder,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        blank_media=args.blank_media,
        metric=args.metric,
    )
    blank = {True: " (blank media)", "image": " (blank images)", "audio": " (silenced audio)"}.get(args.blank_media, "")
    table = results_markdown(result, f"{Path(args.model).name} on {Path(args.data_path).name}{blank}")
    print(table)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=1, default=str))
    if args.output_md:
        Path(args.output_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_md).write_text(table)
    return result


__all__ = ["evaluate", "main", "prepare_row", "results_markdown"]

if __name__ == "__main__":
    main()
