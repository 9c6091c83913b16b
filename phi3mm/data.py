"""Training and evaluation data: rows in the formats users have, their media, token masks and batches.

Rows are read unchanged from a JSON list, JSON Lines, a `datasets` dataset or a folder saved with
`save_to_disk`, in either format:
- LLaVA (LLaVA-Instruct-150K, LLaVA-Pretrain, LLaVA-1.5's mix665k): `{"id", "image"?, "audio"?,
  "conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}`, `<image>` / `<audio>`
  placeholders in the text; media are file names under the image / audio folder.
- Conversational (TRL and recent Hugging Face data sets): `{"messages": [{"role", "content"}],
  "images"?, "audios"?}`, content a string with placeholders or a list of `{"type": "image" |
  "audio" | "text"}` parts; media are file names, bytes, PIL images, arrays or `datasets` dicts.
Only assistant tokens are trained, each answer with its closing `<|end|>` (else generation never
stops); everything else is IGNORE_INDEX. A row whose media are missing or unreadable is skipped
and counted, never a crash; `strict=True` makes it an error.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from configuration_phi3_projector import HOP_LENGTH, audio_token_count
from modeling_phi3_projector import IGNORE_INDEX
from processing_multimodal import SAMPLING_RATE, load_audio, load_image

logger = logging.getLogger(__name__)

END_OF_TURN = "<|end|>"  # Phi-3's closing token of every turn: trained with each answer, or generation never stops
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_rows(data_path) -> list[dict]:
    """A JSON list, a JSON Lines file, a `datasets` dataset or a folder saved with `save_to_disk`."""
    if not isinstance(data_path, (str, os.PathLike)):  # a datasets.Dataset or any sequence of dicts
        return [dict(row) for row in _undecoded_audio(data_path)]
    path = Path(data_path)
    if path.is_dir():
        import datasets

        return [dict(row) for row in _undecoded_audio(datasets.load_from_disk(str(path)))]
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: neither a JSON list nor JSON Lines ({error})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: expected a list of objects (LLaVA format)")
    return rows


def _undecoded_audio(rows):
    """A `datasets` dataset's Audio columns read as {"bytes", "path"} (decoded later by the
    processor's own audio loader: `datasets` would need torchcodec); other rows as they are."""
    features = getattr(rows, "features", None)
    if features is None:
        return rows
    import datasets

    for name, feature in features.items():
        if isinstance(feature, datasets.Audio) and feature.decode:
            rows = rows.cast_column(name, datasets.Audio(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Audio) and feature.feature.decode:
            rows = rows.cast_column(name, datasets.List(datasets.Audio(decode=False)))
    return rows


def as_list(value) -> list:
    """A row's media entry (None, one name, or a list of names) as a list."""
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


MEDIA_KEYS = {"image": ("image", "images"), "audio": ("audio", "audios")}  # LLaVA's key, the conversational one


def row_media(row: dict, kind: str, folder: str | os.PathLike | None) -> list:
    """A row's images or audio clips (`kind`): file names become paths under `folder`; bytes, PIL
    images, arrays and `datasets` dicts ({"bytes", "path"} or {"array", "sampling_rate"}) stay as they are."""
    key = next((k for k in MEDIA_KEYS[kind] if row.get(k) not in (None, "", [])), MEDIA_KEYS[kind][0])
    items = []
    for item in as_list(row.get(key)):
        if isinstance(item, dict) and item.get("bytes") is None and isinstance(item.get("path"), str):
            item = item["path"]  # a datasets Image / Audio column stored by reference
        if isinstance(item, (str, os.PathLike)):
            item = Path(folder) / str(item) if folder else Path(item)
        items.append(item)
    return items


def media_paths(row: dict, kind: str, folder: str | os.PathLike | None) -> list[Path]:
    """The files among a row's media (the ones that can be missing before anything is decoded)."""
    return [item for item in row_media(row, kind, folder) if isinstance(item, Path)]


def row_messages(row: dict, image_token: str = "<image>", audio_token: str = "<audio>") -> list[dict]:
    """A row of either format -> chat messages with string content (placeholders in the text).

    Content parts are joined by newlines, as the chat template joins them. LLaVA rows with an image
    but no `<image>` in the text get it at the start of the first human turn, as LLaVA's own
    preprocessing does; an answer before any question (some ShareGPT rows) is dropped, as LLaVA does.
    """
    if isinstance(row.get("messages"), list):
        turns = [(turn.get("role"), turn.get("content")) if isinstance(turn, dict) else (None, None) for turn in row["messages"]]
    elif isinstance(row.get("conversations"), list):
        turns = [(turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None) for turn in row["conversations"]]
    else:
        raise ValueError("no conversations or messages")
    messages = []
    for role, content in turns:
        role = ROLES.get(str(role).lower())
        text = _content_text(content, image_token, audio_token)
        if role is None or text is None:
            raise ValueError(f"bad turn {(role, content)!r:.200}")
        if role == "assistant" and not any(m["role"] == "user" for m in messages):
            continue
        messages.append({"role": role, "content": text})
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None or not any(m["role"] == "assistant" for m in messages):
        raise ValueError("needs a user turn and an assistant turn")
    for token, kind in ((image_token, "image"), (audio_token, "audio")):
        n_media, n_slots = len(row_media(row, kind, None)), sum(m["content"].count(token) for m in messages)
        if n_slots == 0 and n_media:
            first_user["content"] = (token + "\n") * n_media + first_user["content"]
        elif n_slots != n_media:
            raise ValueError(f"{n_slots} {token} placeholders but {n_media} {kind} items")
    return messages


def _content_text(content, image_token: str, audio_token: str) -> str | None:
    """A message's content (a string, or a list of typed parts) as text with placeholders; None if malformed."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(image_token)
        elif kind == "audio":
            pieces.append(audio_token)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            return None
    return "\n".join(pieces)


DECODE_REASONS = ("unreadable image", "unreadable audio", "too long", "bad row")  # failures on access


class LlavaDataset(torch.utils.data.Dataset):
    """Rows checked up front; items decoded and tokenized on access.

    `skipped` counts dropped rows by reason (missing file, unreadable image, too long, ...),
    including those that failed inside DataLoader worker processes.
    """

    def __init__(
        self,
        rows: list[dict],
        processor,
        image_folder: str | os.PathLike | None = None,
        audio_folder: str | os.PathLike | None = None,
        max_length: int = 2048,
        strict: bool = False,
        vision_cache=None,
        audio_cache=None,
    ):
        self.processor = processor
        self.image_folder = Path(image_folder) if image_folder else None
        self.audio_folder = Path(audio_folder) if audio_folder else None
        self.max_length = max_length
        self.strict = strict
        self.vision_cache = vision_cache
        self.audio_cache = audio_cache
        self.checked: Counter = Counter()  # rows dropped up front, by reason
        self.rows = []
        for index, row in enumerate(rows):
            try:
                row_messages(row, processor.image_token, processor.audio_token)
                for kind in ("image", "audio"):
                    for path in self.media_paths(row, kind):
                        if not path.is_file():
                            raise _Skip(f"missing {kind}", path)
            except (ValueError, _Skip) as error:
                self.checked[self._reason(error, index, row)] += 1
                continue
            self.rows.append(row)
        # Rows that fail on access, as an index into DECODE_REASONS + 1 (0: not failed). Shared
        # memory, so failures met inside DataLoader worker processes are counted here too.
        self.failures = multiprocessing.RawArray("b", len(self.rows))
        if self.skipped:
            logger.warning("skipped %d of %d rows: %s", sum(self.skipped.values()), len(rows), dict(self.skipped))
        self.lengths = self._token_counts()

    def media(self, row: dict, kind: str) -> list:
        return row_media(row, kind, self.image_folder if kind == "image" else self.audio_folder)

    def media_paths(self, row: dict, kind: str) -> list[Path]:
        return [item for item in self.media(row, kind) if isinstance(item, Path)]

    @property
    def skipped(self) -> Counter:
        """Dropped rows by reason (missing file, unreadable image, too long, ...), each counted once."""
        failed = Counter(DECODE_REASONS[code - 1] for code in self.failures if code)
        return self.checked + failed

    def _reason(self, error: Exception, index: int, row: dict) -> str:
        if self.strict:
            raise ValueError(f"row {index} (id {row.get('id')!r}): {error}") from None
        return error.reason if isinstance(error, _Skip) else "bad row"

    def _token_counts(self) -> list[int]:
        """Tokens per row for length-grouped batching, without decoding any media.

        Text is rendered by the chat template and tokenized for real (a chars-per-token guess off by
        10% already drops grouped padding efficiency below 95%); each image counts image_seq_length
        tokens; each clip counts the processor's tokens for the duration in its file header.
        """
        texts = [render_chat(self.processor, row_messages(row, self.processor.image_token, self.processor.audio_token)) for row in self.rows]
        text_tokens = [len(ids) for ids in self.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        counts = []
        for row, n_text in zip(self.rows, text_tokens):
            n = n_text + len(self.media(row, "image")) * (self.processor.image_seq_length - 1)
            for clip in self.media(row, "audio"):
                n += audio_tokens_from_header(self.processor, clip) - 1
            counts.append(n)
        return counts

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        # A row that fails to decode (a truncated image, say) is counted once, remembered, and
        # replaced by the next one, so batches keep their size and the run goes on.
        for offset in range(len(self.rows)):
            position = (index + offset) % len(self.rows)
            if self.failures[position]:
                continue
            row = self.rows[position]
            try:
                return self.encode_row(row)
            except (ValueError, _Skip) as error:
                self.failures[position] = DECODE_REASONS.index(self._reason(error, position, row)) + 1
        raise ValueError("no usable row in the data set")

    def encode_row(self, row: dict) -> dict:
        messages = row_messages(row, self.processor.image_token, self.processor.audio_token)
        image_inputs, clips = self.load_media(row)
        return encode_conversation(
            self.processor, messages, image_inputs, clips, self.max_length, precomputed=self.vision_cache is not None
        )

    def load_media(self, row: dict) -> tuple[list, list]:
        """(images as RGB PIL images or cached features, clips as 16 kHz arrays or cached encoder
        output); `_Skip` when unreadable."""
        if self.vision_cache is not None:
            image_inputs = [self.vision_cache.load(str(name)) for name in row_media(row, "image", None)]
        else:
            try:
                image_inputs = [load_image(path, i) for i, path in enumerate(self.media(row, "image"))]
            except ValueError as error:
                raise _Skip("unreadable image", error) from None
        try:
            if self.audio_cache is not None:
                clips = [self._cached_clip(clip) for clip in row_media(row, "audio", None)]
            else:
                clips = [load_audio(clip, i) for i, clip in enumerate(self.media(row, "audio"))]
        except ValueError as error:
            raise _Skip("unreadable audio", error) from None
        return image_inputs, clips

    def _cached_clip(self, clip) -> CachedAudio:
        if not isinstance(clip, Path):
            raise ValueError("the audio feature cache holds clips given as files; this row's clip is in memory")
        return CachedAudio(**self.audio_cache.load(str(clip)))


def audio_tokens_from_header(processor, clip) -> int:
    """The audio tokens a clip will take: from the duration in a file's header (no decoding), or an
    in-memory clip's length; 5 s worth where neither can be read (decoding will tell later)."""
    try:
        if isinstance(clip, dict) and clip.get("array") is not None:
            n_samples = math.ceil(len(clip["array"]) * SAMPLING_RATE / clip.get("sampling_rate", SAMPLING_RATE))
        else:
            import soundfile

            source = io.BytesIO(clip["bytes"]) if isinstance(clip, dict) else clip
            info = soundfile.info(source if isinstance(source, io.BytesIO) else str(source))
            n_samples = math.ceil(info.frames * SAMPLING_RATE / info.samplerate)
    except Exception:  # no soundfile, an in-memory array without its rate, or a header it can't read
        n_samples = 5 * SAMPLING_RATE
    return processor.audio_token_count(n_samples)


def render_chat(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the model reads it: the processor's chat template, at training and at
    inference alike (a second, hand-written copy of the format would drift from it). Without a
    generation prompt, the eos the template closes a finished conversation with is left off:
    training sequences end with the last answer's <|end|>."""
    if not messages:
        return ""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return text if add_generation_prompt else text.removesuffix(processor.tokenizer.eos_token or "")


@dataclass
class CachedAudio:
    """One clip's precomputed Whisper encoder output (phi3mm.audio_cache): `states` (windows,
    frames, audio width) and `mel_lengths` (windows,)."""

    states: torch.Tensor
    mel_lengths: torch.Tensor


def cached_audio_inputs(processor, clips: list[CachedAudio]) -> tuple[list[torch.Tensor], np.ndarray, list[int]]:
    """As `processor.process_audio`, for cached clips: (states per window, input_features_mask
    (windows, mel frames of a window), tokens per clip), the tokens by the model's own formula."""
    window_frames = processor.window_samples // HOP_LENGTH
    states, masks, tokens = [], [], []
    for clip in clips:
        lengths = clip.mel_lengths.tolist()
        states += list(clip.states)
        masks += [np.arange(window_frames) < n for n in lengths]
        tokens.append(sum(audio_token_count(n, processor.audio_stack_factor, processor.audio_max_frames) for n in lengths))
    return states, np.stack(masks).astype(np.int64), tokens


class _Skip(Exception):
    def __init__(self, reason: str, detail=""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def encode_conversation(processor, messages, images, clips, max_length: int, precomputed: bool = False) -> dict:
    """Tokens, labels and media tensors of one conversation, truncated by whole turns.

    `images` are RGB PIL images, or precomputed vision features when `precomputed`; `clips` are
    16 kHz float arrays. A turn is a user message and the answer after it: turns that do not fit in
    `max_length` are dropped with their media, so an image or audio block is never cut; only the
    text of the last kept answer may be shortened. Raises `_Skip` when not even the first turn fits.
    """
    # The conversation is rendered by the chat template and tokenized once, exactly as inference
    # renders it; placeholders are expanded in the messages first. Where each turn and each answer
    # starts comes from rendering the messages before it (the template renders message by message,
    # so a prefix renders to a prefix); an answer's span runs to its closing <|end|>. Labels then
    # come from character spans, so a tokenizer that treats piece starts specially (SentencePiece's
    # leading "▁") cannot shift them.
    image_iter, clip_iter = iter(images), iter(clips)
    expanded: list[dict] = []
    units: list[dict] = []  # one per turn: where its text starts, its media
    answer_starts: list[tuple[int, str]] = []
    for message in messages:
        # A system message opens the first turn; each further user message opens a new one.
        if not units or (message["role"] == "user" and units[-1]["has_user"]):
            start = len(render_chat(processor, expanded))
            units.append({"start": start, "images": [], "clips": [], "has_user": False})
        unit = units[-1]
        unit["has_user"] |= message["role"] == "user"
        content = message["content"]
        if message["role"] == "assistant":
            answer_starts.append((len(render_chat(processor, expanded, add_generation_prompt=True)), content))
        else:
            unit["images"] += [next(image_iter) for _ in range(content.count(processor.image_token))]
            unit_clips = [next(clip_iter) for _ in range(content.count(processor.audio_token))]
            audio_tokens = []
            if unit_clips and isinstance(unit_clips[0], CachedAudio):
                states, mask, audio_tokens = cached_audio_inputs(processor, unit_clips)
                unit["clips"].append((states, mask))
            elif unit_clips:
                features, mask, audio_tokens = processor.process_audio(unit_clips, SAMPLING_RATE)
                unit["clips"].append((features, mask))
            content = processor.expand_placeholders(content, audio_tokens)
        expanded.append({"role": message["role"], "content": content})
    text = render_chat(processor, expanded)
    answer_spans = []
    for start, content in answer_starts:
        end = text.find(END_OF_TURN, start + len(content))
        if not text.startswith(content, start) or end < 0:
            raise ValueError("the chat template does not render an answer followed by its end-of-turn token")
        answer_spans.append((start, end + len(END_OF_TURN)))

    encoded = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    all_labels = [
        token if any(start <= begin < end for start, end in answer_spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, offsets)
    ]
    starts = [next((i for i, (begin, _) in enumerate(offsets) if begin >= unit["start"]), len(ids)) for unit in units]
    for unit, first, last in zip(units, starts, starts[1:] + [len(ids)]):
        unit["ids"], unit["labels"] = ids[first:last], all_labels[first:last]

    input_ids, labels, kept = [], [], []
    for unit in units:
        room = max_length - len(input_ids)
        if len(unit["ids"]) > room:
            prompt_length = next((i for i, label in enumerate(unit["labels"]) if label != IGNORE_INDEX), len(unit["ids"]))
            if kept or prompt_length >= room:
                break  # a later turn that does not fit is dropped whole
            unit = {**unit, "ids": unit["ids"][:room], "labels": unit["labels"][:room]}
        input_ids += unit["ids"]
        labels += unit["labels"]
        kept.append(unit)
    if not kept or all(label == IGNORE_INDEX for label in labels):
        raise _Skip("too long", f"the first turn needs more than max_length={max_length} tokens")

    item = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
    kept_images = [image for unit in kept for image in unit["images"]]
    if kept_images:
        if precomputed:
            item["vision_features"] = torch.stack([torch.as_tensor(f) for f in kept_images])
        else:
            item["pixel_values"] = torch.as_tensor(processor.image_processor(kept_images, return_tensors="np")["pixel_values"])
    kept_clips = [clip for unit in kept for clip in unit["clips"]]
    if kept_clips and isinstance(kept_clips[0][0], list):  # cached encoder output, windows of their own lengths
        item["audio_encoder_states"] = pad_frames([window for states, _ in kept_clips for window in states])
        item["input_features_mask"] = torch.as_tensor(np.concatenate([m for _, m in kept_clips]))
    elif kept_clips:
        item["input_features"] = torch.as_tensor(np.concatenate([f for f, _ in kept_clips]))
        item["input_features_mask"] = torch.as_tensor(np.concatenate([m for _, m in kept_clips]))
    return item


def pad_frames(windows: list[torch.Tensor]) -> torch.Tensor:
    """(frames, width) windows of encoder output -> (windows, longest, width), zero-padded. The
    padding only ever feeds audio tokens past a window's count, which the model trims."""
    longest = max(window.shape[0] for window in windows)
    return torch.stack([torch.nn.functional.pad(window, (0, 0, 0, longest - window.shape[0])) for window in windows])


class MultimodalCollator:
    """Pads a list of `encode_conversation` items into one batch (right padding for training).

    Media of all rows are concatenated in row order, which is the order their placeholder tokens
    appear in the flattened batch, so the model's masked_scatter puts each where it belongs.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(items), longest), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(items), longest), dtype=torch.long),
        }
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            span = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            batch["input_ids"][row, span] = item["input_ids"]
            batch["labels"][row, span] = item["labels"]
            batch["attention_mask"][row, span] = 1
        for key in ("pixel_values", "vision_features", "input_features", "input_features_mask"):
            parts = [item[key] for item in items if key in item]
            if parts:
                batch[key] = torch.cat(parts)
        states = [window for item in items for window in item.get("audio_encoder_states", [])]
        if states:
            batch["audio_encoder_states"] = pad_frames(states)
        return batch


__all__ = [
    "IGNORE_INDEX", "CachedAudio", "LlavaDataset", "MultimodalCollator", "as_list", "audio_tokens_from_header", "encode_conversation",
    "media_paths", "read_rows", "render_chat", "row_media", "row_messages",
]  # fmt: skip
