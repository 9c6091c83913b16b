"""Audio alignment by distillation from the text path: the `--stage audio_align` of train_trainer.py.

As Ultravox and DiVA align speech: the same model reading the transcript is the teacher, reading
the audio it is the student, and the loss is the KL divergence between their next-token
distributions over the response tokens (teacher without gradient, optional temperature). Only the
audio projector trains (and, as an option, LoRA on the Whisper encoder); the language model stays
frozen, so the teacher is the language model the user already has.

Rows, read unchanged:
- spoken-question rows (LLaVA or conversational, e.g. what `python -m phi3mm.tts` writes): `<audio>`
  placeholders in the user turns, the clips under `audio`, and what each clip says under
  `transcripts` (a list, or one string). The teacher reads the same conversation with each
  `<audio>` replaced by its transcript, images included; the response is the row's answers.
- ASR rows (LibriSpeech, Common Voice, People's Speech as `datasets` folders, or JSON): an audio
  column and a transcript column (`--audio_column`, `--text_column`), and optionally a
  `continuation` the text model wrote for the transcript (Ultravox's). Without one, the teacher's
  own greedy continuation is generated once before training and cached in OUTPUT_DIR.
`--align_loss ce` trains with plain cross-entropy instead: ASR rows as "Transcribe the audio."
with the transcript as the answer, spoken-question rows on their answers.
Rows without a transcript are skipped and counted.

Rehearsal rows (`--rehearsal_data_path`): rows the model already answers through the same audio
projector, e.g. the sound questions of its fine-tuning data, trained with cross-entropy on their
answers beside the alignment rows, so that aligning for speech does not cost the sounds (in the
demo, beeps fell from 95% to 85% without them). They need no transcript. The loss of a batch is
the sum of the KL over the response tokens of its alignment rows and the cross-entropy over
those of its rehearsal rows, divided by their number.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from modeling_phi3_projector import IGNORE_INDEX
from phi3mm.data import LlavaDataset, MultimodalCollator, _Skip, as_list, encode_conversation, row_messages

logger = logging.getLogger(__name__)

ALIGN_LOSSES = ("kl", "ce")
TRANSCRIBE_PROMPT = "Transcribe the audio."
TEACHER = "teacher_"  # prefix of the teacher's inputs in an item and a batch
REHEARSAL = "rehearsal"  # marks rehearsal rows, and in a mixed batch the items without a teacher


def alignment_row(row: dict, audio_column: str, text_column: str, loss: str, audio_token: str = "<audio>") -> dict | None:
    """A row as the alignment data set reads it: a conversation with `<audio>` placeholders, its
    clips and `transcripts`, and (for KL) a `continuation` to fill when absent. None: no transcript."""
    if "conversations" in row or "messages" in row:
        transcripts = row.get("transcripts", row.get("transcript"))
        transcripts = [transcripts] if isinstance(transcripts, str) else transcripts
        if not transcripts or not all(isinstance(t, str) and t.strip() for t in transcripts):
            return None
        return {**row, "transcripts": list(transcripts)}
    transcript = row.get(text_column)
    if not isinstance(transcript, str) or not transcript.strip():
        return None
    clip = row.get(audio_column)
    if loss == "ce":
        messages = [{"role": "user", "content": f"{audio_token}\n{TRANSCRIBE_PROMPT}"},
                    {"role": "assistant", "content": transcript.strip()}]  # fmt: skip
    else:
        continuation = row.get("continuation")
        messages = [{"role": "user", "content": audio_token},
                    {"role": "assistant", "content": continuation if isinstance(continuation, str) else None}]  # fmt: skip
    return {"messages": messages, "audio": [clip], "transcripts": [transcript.strip()], "id": row.get("id")}


def teacher_messages(messages: list[dict], transcripts: list[str], audio_token: str) -> list[dict]:
    """The conversation as the teacher reads it: the i-th `<audio>` replaced by the i-th transcript."""
    spoken = iter(transcripts)
    out = []
    for message in messages:
        pieces = message["content"].split(audio_token)
        text = pieces[0] + "".join(next(spoken) + piece for piece in pieces[1:])
        out.append({**message, "content": text})
    return out


class AlignmentDataset(LlavaDataset):
    """Items with the student's inputs (audio) and the teacher's (`teacher_*`: transcripts as text),
    whose supervised tokens are the same response; skips counted as in `LlavaDataset`."""

    def __init__(self, rows, processor, *args, audio_column: str = "audio", text_column: str = "text",
                 loss: str = "kl", rehearsal_rows=(), **kwargs):  # fmt: skip
        if loss not in ALIGN_LOSSES:
            raise ValueError(f"--align_loss must be one of {ALIGN_LOSSES}, got {loss!r}")
        self.loss = loss
        aligned = [alignment_row(row, audio_column, text_column, loss, processor.audio_token) for row in rows]
        no_transcript = sum(row is None for row in aligned)
        # Rows awaiting their continuation pass the up-front checks with a stand-in answer.
        for row in aligned:
            if row is not None and "messages" in row and row["messages"][-1]["content"] is None:
                row["messages"][-1]["content"], row["continuation_pending"] = "", True
        rehearsal = [{**row, REHEARSAL: True} for row in rehearsal_rows]  # read as they are, answers supervised
        super().__init__([row for row in aligned if row is not None] + rehearsal, processor, *args, **kwargs)
        self._pending = [row for row in self.rows if row.get("continuation_pending")]
        if no_transcript:
            self.checked["no transcript"] += no_transcript
            logger.warning("skipped %d rows without a transcript", no_transcript)

    def fill_continuations(self, model, cache_path: Path | None = None, batch_size: int = 8, max_new_tokens: int = 64) -> int:
        """Greedy continuations of the teacher (the model reading the transcript) for ASR rows that
        came without one; cached by transcript in `cache_path`. Returns how many were generated."""
        if not self._pending:
            return 0
        cache = json.loads(cache_path.read_text()) if cache_path and cache_path.is_file() else {}
        key = lambda row: hashlib.sha256(row["transcripts"][0].encode()).hexdigest()  # noqa: E731
        todo = [row for row in self._pending if key(row) not in cache]
        tokenizer = self.processor.tokenizer
        was_training = model.training
        model.eval()
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            prompts = [self.processor.apply_chat_template([{"role": "user", "content": row["transcripts"][0]}],
                                                          add_generation_prompt=True) for row in rows]  # fmt: skip
            inputs = self.processor(text=prompts, padding_side="left", return_tensors="pt").to(model.device)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
            for row, ids in zip(rows, output[:, inputs["input_ids"].shape[1] :]):
                cache[key(row)] = tokenizer.decode(ids, skip_special_tokens=True).strip()
        model.train(was_training)
        if cache_path is not None:
            cache_path.write_text(json.dumps(cache))
        for row in self._pending:
            row["messages"][-1]["content"] = cache[key(row)] or "."  # an empty answer would train nothing
            del row["continuation_pending"]
        self._pending = []
        self.lengths = self._token_counts()
        return len(todo)

    def encode_row(self, row: dict) -> dict:
        if row.get("continuation_pending"):
            raise RuntimeError("fill_continuations(model) must run before the data set is read")
        audio_token = self.processor.audio_token
        messages = row_messages(row, self.processor.image_token, audio_token)
        images, clips = self.load_media(row)
        student = encode_conversation(self.processor, messages, images, clips, self.max_length,
                                      precomputed=self.vision_cache is not None)  # fmt: skip
        if self.loss == "ce" or row.get(REHEARSAL):
            return student
        transcripts = as_list(row["transcripts"])
        if sum(m["content"].count(audio_token) for m in messages) != len(transcripts):
            raise _Skip("bad row", f"{len(transcripts)} transcripts for the row's audio placeholders")
        teacher = encode_conversation(self.processor, teacher_messages(messages, transcripts, audio_token), images, [],
                                      self.max_length, precomputed=self.vision_cache is not None)  # fmt: skip
        answer = student["labels"][student["labels"] != IGNORE_INDEX]
        if not torch.equal(answer, teacher["labels"][teacher["labels"] != IGNORE_INDEX]):
            raise _Skip("too long", "the student's and the teacher's responses differ after truncation")
        return {**student, **{TEACHER + key: value for key, value in teacher.items()}}


class AlignmentCollator:
    """Pads the student's inputs (every item) and the teacher's (`teacher_*`, the items that have
    one) as two batches; `rehearsal` flags the items without a teacher when the batch mixes both."""

    def __init__(self, pad_token_id: int):
        self.collate = MultimodalCollator(pad_token_id)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        student = self.collate([{k: v for k, v in item.items() if not k.startswith(TEACHER)} for item in items])
        taught = [any(key.startswith(TEACHER) for key in item) for item in items]
        if not any(taught):  # cross-entropy rows only (--align_loss ce, or a batch of rehearsal rows)
            return student
        teacher = self.collate([{k[len(TEACHER) :]: v for k, v in item.items() if k.startswith(TEACHER)}
                                for item, has in zip(items, taught) if has])  # fmt: skip
        if not all(taught):
            student[REHEARSAL] = torch.tensor([not has for has in taught])
        return {**student, **{TEACHER + key: value for key, value in teacher.items()}}


def response_logits(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits at the positions that predict a supervised token, (batch, kept, vocab), with which
    of them supervise in each row and their targets, (batch, kept). The head runs only at positions
    some row of the batch supervises: the full logits of every image and prompt token at Phi-3.5's
    32k vocabulary would be the step's largest cost (7x the steps' time in the demo)."""
    supervised = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    keep = supervised.any(0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=keep).logits
    return logits, supervised[:, keep], labels[:, 1:][:, keep]


def distillation_loss(model, inputs: dict, temperature: float = 1.0, num_items_in_batch=None) -> torch.Tensor:
    """KL(teacher || student) over the response tokens, scaled by temperature² as in Hinton et al.,
    plus the cross-entropy of the rehearsal rows' response tokens; summed and divided by the number
    of response tokens (or by `num_items_in_batch` under gradient accumulation)."""
    teacher = {key[len(TEACHER) :]: value for key, value in inputs.items() if key.startswith(TEACHER)}
    student = {key: value for key, value in inputs.items() if not key.startswith(TEACHER)}
    student_labels = student.pop("labels")
    rehearsal = student.pop(REHEARSAL, None)
    if rehearsal is None:  # one kind of row: all taught, or (no teacher in the batch) all rehearsal
        rehearsal = torch.full((student_labels.shape[0],), not teacher, dtype=torch.bool)
    rehearsal = rehearsal.to(student_labels.device)
    student_logits, supervised, targets = response_logits(model, student, student_labels)
    loss = student_logits.new_zeros(())
    if teacher:
        with torch.no_grad():
            teacher_logits, teacher_supervised, _ = response_logits(model, teacher, teacher.pop("labels"))
        # The response tokens' distributions, in order, on both sides.
        s = student_logits[~rehearsal][supervised[~rehearsal]].float()
        t = teacher_logits[teacher_supervised].float()
        if s.shape != t.shape:
            raise ValueError(f"student and teacher supervise different tokens: {tuple(s.shape)} vs {tuple(t.shape)}")
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="sum")
        loss = loss + kl * temperature**2
    if rehearsal.any():
        logits = student_logits[rehearsal][supervised[rehearsal]].float()
        loss = loss + F.cross_entropy(logits, targets[rehearsal][supervised[rehearsal]], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else max(int(supervised.sum()), 1)
    return loss / count


__all__ = ["ALIGN_LOSSES", "AlignmentCollator", "AlignmentDataset", "alignment_row", "distillation_loss", "response_logits",
           "teacher_messages"]
