"""Padding efficiency of length-grouped batches against random ones, on a real `LlavaDataset`'s lengths.

The rows are written as LLaVA-1.5's instruction mix is shaped (short-answer VQA rows with many
turns, single-turn reasoning and descriptions with long answers, multi-turn conversations, a share
of text-only chats), with real image files, and read back by `phi3mm.data.LlavaDataset`, whose
`lengths` (the chat template tokenized for real, 576 tokens an image) are what `MultimodalTrainer`
groups by. The tokenizer is Phi-3.5-mini's (`phi3mm.real_parts`), or the tiny one where it cannot
be had; the text is English words of the tiny tokenizer's corpus.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.trainer_pt_utils import LengthGroupedSampler

from phi3mm.build import TOKENIZER_CORPUS, build_tiny_model
from phi3mm.data import LlavaDataset
from phi3mm.real_parts import FetchError, phi35_tokenizer_path

BATCH_SIZE = 16
# kind: (share of rows, fewest and most question/answer pairs, median words of a question and of an
# answer, with an image). Word counts are lognormal around the median (sigma 0.5).
KINDS = {
    "short-answer VQA (VQAv2, GQA, OCR-VQA-like)": (0.35, 2, 12, 8, 2, True),
    "complex reasoning": (0.25, 1, 1, 20, 110, True),
    "detailed description": (0.10, 1, 1, 10, 100, True),
    "conversation": (0.20, 2, 8, 12, 50, True),
    "text-only chat (ShareGPT-like)": (0.10, 1, 4, 30, 150, False),
}


def write_instruct_like(out_dir: Path, n_rows: int, seed: int = 0, n_images: int = 32) -> Path:
    """`n_rows` LLaVA-format rows of the `KINDS` mix in `out_dir/data.json`, and the images they name."""
    rng = np.random.default_rng(seed)
    words = TOKENIZER_CORPUS.split()
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):  # rows share images, as LLaVA's rows share COCO images
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        Image.new("RGB", (336, 336), color).save(out_dir / "images" / f"{i}.png")

    def text(median_words: int) -> str:
        return " ".join(rng.choice(words, max(1, round(rng.lognormal(np.log(median_words), 0.5)))))

    names, kinds = list(KINDS), list(KINDS.values())
    rows = []
    for i, k in enumerate(rng.choice(len(kinds), n_rows, p=[kind[0] for kind in kinds])):
        _, fewest, most, question, answer, has_image = kinds[k]
        turns = []
        for _ in range(int(rng.integers(fewest, most + 1))):
            turns += [{"from": "human", "value": text(question)}, {"from": "gpt", "value": text(answer)}]
        row = {"id": f"{names[k]} {i}", "conversations": turns}
        if has_image:
            row["image"] = f"images/{rng.integers(n_images)}.png"
        rows.append(row)
    (out_dir / "data.json").write_text(json.dumps(rows))
    return out_dir / "data.json"


def batch_indices(lengths, batch_size: int, grouped: bool, seed: int = 0) -> list[list[int]]:
    """Batches of row indices: `LengthGroupedSampler`'s order (what `MultimodalTrainer` uses) or a
    random permutation, cut into consecutive batches."""
    generator = torch.Generator().manual_seed(seed)
    if grouped:
        order = list(LengthGroupedSampler(batch_size, lengths=[int(x) for x in lengths], generator=generator))
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_efficiency(lengths, batches: list[list[int]]) -> float:
    """Real tokens / padded tokens, each batch padded to its longest row. In (0, 1]."""
    lengths = np.asarray(lengths)
    return sum(int(lengths[b].sum()) for b in batches) / sum(len(b) * int(lengths[b].max()) for b in batches)


def padding_benchmark(n_rows: int = 4000, batch_size: int = BATCH_SIZE, seed: int = 0) -> dict:
    """Grouped and random batches of a written `LlavaDataset` (a processor of 576-token images)."""
    try:
        tokenizer, tokenizer_name = phi35_tokenizer_path(), "Phi-3.5-mini-instruct's"
    except (FetchError, OSError):  # offline and not fetched before
        tokenizer, tokenizer_name = None, "the tiny byte-level one (Phi-3.5's could not be fetched)"
    with tempfile.TemporaryDirectory(prefix="phi3mm-padding-") as tmp:
        _, processor = build_tiny_model(Path(tmp) / "components", with_audio=False, image_size=336, patch_size=14,
                                        tokenizer=tokenizer)  # fmt: skip
        data = write_instruct_like(Path(tmp), n_rows, seed)
        dataset = LlavaDataset(json.loads(data.read_text()), processor, image_folder=tmp)
        lengths = np.asarray(dataset.lengths)
        kinds = [row["id"].rsplit(" ", 1)[0] for row in dataset.rows]
        words = TOKENIZER_CORPUS.split()
        tokens_per_word = len(processor.tokenizer(" ".join(words))["input_ids"]) / len(words)
    return {
        "rows": len(lengths),
        "batch_size": batch_size,
        "image_tokens": processor.image_seq_length,
        "kinds": {name: {"share": KINDS[name][0], "median_length": float(np.median(lengths[np.array(kinds) == name]))}
                  for name in KINDS},
        "mean_length": float(lengths.mean()),
        "median_length": float(np.median(lengths)),
        "p99_length": float(np.percentile(lengths, 99)),
        "max_length": int(lengths.max()),
        "tokenizer": tokenizer_name,
        "tokens_per_word": tokens_per_word,
        "random": padding_efficiency(lengths, batch_indices(lengths, batch_size, grouped=False, seed=seed)),
        "grouped": padding_efficiency(lengths, batch_indices(lengths, batch_size, grouped=True, seed=seed)),
    }
