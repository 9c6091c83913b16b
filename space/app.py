"""python space/app.py [--model outputs/demo/model] [--host 127.0.0.1] [--port 7860]

A ChatGPT-like chat with the Phi-3.5 + CLIP + Whisper model: type, attach images and audio clips
or record your voice; the answer streams in token by token. The whole conversation, earlier
images and audio included, goes back to the model on every turn (oldest turns are dropped, with a
note, when it no longer fits the context).

The model loads once, through `AutoModelForCausalLM` / `AutoProcessor` with trust_remote_code, so
this folder runs as a Hugging Face Space on its own: it imports nothing from the repository.

    --model      hub id or folder; else $MODEL_ID; else outputs/demo/model if it exists; else DEFAULT_REPO_ID
    --asr_model  Whisper checkpoint for the "Transcribe audio with Whisper first" switch; else $ASR_MODEL;
                 else outputs/real_parts/whisper_base if it exists (written offline by the repository's
                 `python -m phi3mm.real_parts`), so the switch works offline; else DEFAULT_ASR_MODEL
                 (openai/whisper-small, online; openai/whisper-base through --asr_model is faster)

Both folders are looked for under the current directory, then the repository root next to space/.

`Assistant.respond` is the chat handler: a generator that tests (and other code) can call without
a browser. The chat endpoint is `/chat` and takes just the message `{"text": ..., "files": [...]}`.
"""

from __future__ import annotations

import argparse
import importlib
import mimetypes
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import soundfile
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

# The published checkpoint. A placeholder until the model is on the Hub: change it then.
DEFAULT_REPO_ID = "phi3-multimodal/phi-3.5-clip-whisper"
DEFAULT_ASR_MODEL = "openai/whisper-small"
DEMO_MODEL_DIR = Path("outputs") / "demo" / "model"  # what the offline demo run writes
LOCAL_ASR_DIR = Path("outputs") / "real_parts" / "whisper_base"  # what `python -m phi3mm.real_parts` writes
SPACE_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = SPACE_DIR / "examples"

MAX_FILE_MB = 20.0  # larger uploads get a message in the chat
UPLOAD_HARD_LIMIT_FACTOR = 4  # Gradio itself refuses uploads this many times larger, before they reach disk
QUEUE_MAX_SIZE = 32  # requests waiting for the model; more are turned away with "queue full"
DEFAULT_MAX_NEW_TOKENS = 512
MAX_ASR_TOKENS = 400  # Whisper's decoder holds 448 positions, its prompt tokens included
DEFAULT_TEMPERATURE = 0.7
TOKEN_POLL_S = 1.0  # how often the handler checks on a generation that has gone quiet
GENERATION_TIMEOUT_S = 600.0  # a request that has produced nothing for this long is given up
MODEL_WAIT_S = 600.0  # how long a request waits for the model when another one holds it

# Assistant messages that are not answers carry a metadata title; the title says how the message
# goes back into the prompt on later turns (see `parse_history`).
TRANSCRIPT_TITLE = "🎙️ Transcript"  # joins the user's message in place of the audio
ERROR_TITLE = "⚠️ Error"  # the user's message and this reply are left out of the prompt
NOTE_TITLE = "ℹ️ Note"  # shown to the user only
NO_SPEECH = "(no speech recognised)"

_CHAT_MARKERS = re.compile(r"<\|[A-Za-z0-9_]{1,32}\|>")  # Phi-3 role tokens such as <|user|>
_MEDIA_INDEX = re.compile(r"^(image|audio) \d+: ")  # the processor's "image 0: " prefix


class ModelLoadError(RuntimeError):
    """The model or processor could not be loaded; the message says which and why."""


def _resolve(given: str | None, env_var: str, local_dir: Path, hub_id: str) -> str:
    """`given`, else $`env_var`, else `local_dir` under the current directory or the repository root
    (when it holds a config.json), else `hub_id`."""
    if given:
        return given
    if os.environ.get(env_var):
        return os.environ[env_var]
    for root in (Path.cwd(), SPACE_DIR.parent):
        if (root / local_dir / "config.json").is_file():
            return str(root / local_dir)
    return hub_id


def resolve_model_id(model: str | None = None) -> str:
    """--model, else $MODEL_ID, else the demo's outputs/demo/model, else the Hub id."""
    return _resolve(model, "MODEL_ID", DEMO_MODEL_DIR, DEFAULT_REPO_ID)


def resolve_asr_model(asr_model: str | None = None) -> str:
    """--asr_model, else $ASR_MODEL, else the local outputs/real_parts/whisper_base, else openai/whisper-small."""
    return _resolve(asr_model, "ASR_MODEL", LOCAL_ASR_DIR, DEFAULT_ASR_MODEL)


def load_model(model_id: str, dtype: str = "auto") -> tuple[Any, Any]:
    """(model, processor) from a hub id or folder, on the GPU when there is one; ModelLoadError otherwise.

    dtype "auto": bfloat16 on a GPU (half the memory), the checkpoint's own dtype on the CPU (bf16
    matmuls are slow on many CPUs); or "bfloat16" / "float16" / "float32".
    """
    if dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_available() else "auto"
    else:
        dtype = getattr(torch, dtype)
    try:
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
        # safetensors only: a pickled pytorch_model.bin could run code while it loads.
        model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, dtype=dtype, use_safetensors=True)
    except Exception as error:  # OSError (not found / offline), ValueError (not this model), ImportError...
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ModelLoadError(
            f"Could not load the model {model_id!r}: {reason}\n"
            "Pass --model <hub id or folder> or set MODEL_ID to a checkpoint saved by this project."
        ) from None
    media = importlib.import_module(type(processor).__module__)
    ours = hasattr(model.config, "text_config") and hasattr(processor, "image_token") and hasattr(media, "load_audio")
    if not ours:
        raise ModelLoadError(
            f"Could not load the model {model_id!r}: it loads, but it is not this project's multimodal model "
            f"({type(model).__name__} with {type(processor).__name__}).\n"
            "Pass --model <hub id or folder> or set MODEL_ID to a checkpoint saved by this project."
        )
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), processor


def whisper_transcriber(asr_model: str, device: torch.device | str = "cpu") -> Callable[[np.ndarray], str]:
    """A function 16 kHz mono float32 samples -> text, backed by a Whisper ASR pipeline."""
    from transformers import pipeline

    # chunk_length_s: Whisper hears 30 s at a time; longer clips are transcribed window by window.
    asr = pipeline("automatic-speech-recognition", model=asr_model, chunk_length_s=30, device=device)

    def transcribe(wave: np.ndarray) -> str:
        # At most ~8 tokens per second of audio (fast speech is 3-4 words a second): on silence
        # Whisper can repeat ". . ." up to its 448-token limit, minutes on a CPU.
        seconds = min(len(wave) / 16_000, 30.0)
        limit = min(MAX_ASR_TOKENS, 16 + int(8 * seconds))
        return asr({"raw": wave, "sampling_rate": 16_000}, generate_kwargs={"max_new_tokens": limit})["text"]

    return transcribe


@dataclass
class Turn:
    """One user message of the conversation and what the assistant said back."""

    text: str = ""
    files: list[str] = field(default_factory=list)  # images and audio clips, in upload order
    transcripts: list[str] | None = None  # set when the audio went to the model as text
    answer: str = ""
    failed: bool = False  # answered with an error: not part of what the model sees
    closed: bool = False  # the assistant has replied; the next user message starts a new turn


def file_kind(path: str) -> str | None:
    """'image', 'audio' or None, from the file name (Gradio names microphone recordings audio.wav)."""
    mime = mimetypes.guess_type(str(path))[0] or ""
    kind = mime.split("/")[0]
    return kind if kind in ("image", "audio") else None


def _audio_frames(path: str) -> int | None:
    """Samples in an audio file, or None when soundfile can't tell (the processor then decides)."""
    try:
        return soundfile.info(path).frames
    except Exception:  # not a format libsndfile knows: leave the verdict to the processor
        return None


def _file_path(item: Any) -> str | None:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, dict):
        if isinstance(item.get("file"), dict):
            item = item["file"]
        return item.get("path")
    return getattr(item, "path", None)  # gradio FileData


def _contents(content: Any) -> tuple[list[str], list[str]]:
    """(texts, file paths) of a chat message's content in any of the forms Gradio hands over."""
    texts: list[str] = []
    paths: list[str] = []
    items = content if isinstance(content, (list, tuple)) else [content]
    for item in items:
        if item is None:
            continue
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            texts.append(item.get("text") or "")
        elif isinstance(item, dict) and ("path" in item or item.get("type") == "file"):
            if path := _file_path(item):
                paths.append(path)
        elif isinstance(item, gr.components.Component):  # e.g. gr.Image(value=...) in a hand-made history
            if path := _file_path(item.value):
                paths.append(path)
    return texts, paths


def parse_history(history: list[Any]) -> list[Turn]:
    """Gradio's chat history (messages as dicts, in its UI or API form) -> the turns of the conversation."""
    turns: list[Turn] = []
    for message in history or []:
        get = message.get if isinstance(message, dict) else lambda key, m=message: getattr(m, key, None)
        role, metadata = get("role"), get("metadata") or {}
        title = metadata.get("title") if isinstance(metadata, dict) else getattr(metadata, "title", None)
        texts, paths = _contents(get("content"))
        text = "\n".join(t for t in texts if t.strip())
        if role == "user":
            if not turns or turns[-1].closed:
                turns.append(Turn())
            turn = turns[-1]
            turn.text = "\n".join(t for t in (turn.text, text) if t)
            turn.files += paths
        elif role == "assistant" and turns:
            turn = turns[-1]
            turn.closed = True
            if title == TRANSCRIPT_TITLE:
                turn.transcripts = [] if text == NO_SPEECH else [text]
            elif title == ERROR_TITLE:
                # An error after an answer belongs to a message that never showed (an empty one).
                turn.failed = turn.failed or not turn.answer
            elif not title:  # notes are for the user only
                turn.answer = "\n".join(t for t in (turn.answer, text) if t)
    return turns


class _StopOnEvent(StoppingCriteria):
    """Ends generation when the handler is closed (the stop button, a client gone away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Assistant:
    """The model, its processor and the chat handler. One generation runs at a time (one model in memory).

    Args:
        model, processor: what `load_model` returns.
        asr_model: Whisper checkpoint for transcribing audio, loaded on first use (default: `resolve_asr_model()`).
        transcriber: 16 kHz samples -> text; replaces the Whisper pipeline (tests inject a fake).
        max_file_mb: uploads above this size are refused with a message in the chat.
    """

    def __init__(
        self,
        model,
        processor,
        asr_model: str | None = None,
        transcriber: Callable[[np.ndarray], str] | None = None,
        max_file_mb: float = MAX_FILE_MB,
    ):
        self.model = model
        self.processor = processor
        self.asr_model = resolve_asr_model(asr_model)
        self.transcriber = transcriber
        self.max_file_mb = max_file_mb
        self.context_length = model.config.text_config.max_position_embeddings
        self.has_audio_tower = model.config.audio_config is not None
        # Aligned for speech (train_trainer.py --stage audio_align): spoken questions go to its own ears.
        self.speech_aligned = self.has_audio_tower and bool(getattr(model.config, "speech_aligned", False))
        # The checkpoint's processing module ships its own decoders (any image mode, any audio rate
        # -> 16 kHz mono); checking uploads with them means an upload that passes is one the
        # processor can read.
        media = importlib.import_module(type(processor).__module__)
        self._load_image, self._load_audio = media.load_image, media.load_audio
        # The token the chat template opens every user turn with (<|user|> for Phi-3), read off the
        # template itself rather than restated here.
        user_turn = processor.apply_chat_template([{"role": "user", "content": "."}], add_generation_prompt=False)
        self._user_token_id = processor.tokenizer(user_turn, add_special_tokens=False)["input_ids"][0]
        self._model_lock = threading.Lock()  # around processing + generate: one model, one tokenizer
        self._asr_lock = threading.Lock()
        self._asr_error: str | None = None

    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs) -> Assistant:
        return cls(*load_model(model_id), **kwargs)

    # ---- the chat handler ---------------------------------------------------------------------

    def respond(
        self,
        message: dict | str,
        history: list[Any],
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        transcribe_audio: bool = False,
        system_prompt: str = "",
    ) -> Iterator[str | dict | list[dict]]:
        """Answer `message` ({"text", "files"}) given the earlier `history`, yielding the reply so far.

        `system_prompt`, when not empty, goes to the model as the conversation's system turn.

        Each yield is the whole reply up to now: the answer text, or a list of messages when notes
        come with it (a transcript, older turns dropped), or one error message. Bad uploads and
        other problems end in an error message in the chat, never an exception.
        """
        if isinstance(message, str):
            message = {"text": message, "files": []}
        files = [path for path in map(_file_path, message.get("files") or []) if path]
        turn = Turn(text=(message.get("text") or "").strip(), files=files)
        if not turn.text and not turn.files:
            yield _error("Type a message, or attach an image or an audio clip.")
            return
        notes: list[dict] = []
        clips: dict[str, np.ndarray] = {}
        for path in turn.files:
            try:
                kind, decoded = self._check_upload(path)
            except ValueError as error:
                yield _error(str(error))
                return
            if kind == "audio":
                clips[path] = decoded

        if clips and (transcribe_audio or not self.has_audio_tower):
            try:
                turn.transcripts = [self._transcribe(wave) for wave in clips.values()]
            except RuntimeError as error:
                yield _error(str(error))
                return
            shown = "\n".join(t for t in turn.transcripts if t) or NO_SPEECH
            notes.append({"role": "assistant", "content": shown, "metadata": {"title": TRANSCRIPT_TITLE}})
            yield notes

        if not self._model_lock.acquire(timeout=MODEL_WAIT_S):
            yield _error("The model is busy with other requests; please try again in a minute.", notes)
            return
        try:
            past = parse_history(history)
            yield from self._generate(past, turn, int(max_new_tokens), float(temperature), notes, system_prompt or "")
        finally:
            self._model_lock.release()

    def _generate(self, past: list[Turn], turn: Turn, max_new_tokens: int, temperature: float, notes: list[dict],
                  system_prompt: str = ""):
        missing = sum(not os.path.isfile(path) for t in past for path in t.files)
        if missing:  # Gradio's upload cache was cleaned up since: go on without those files
            for t in past:
                t.files = [path for path in t.files if os.path.isfile(path)]
            gone = f"{missing} earlier uploaded files are gone from the server; the model no longer sees them."
            notes = notes + [_note(gone)]
        try:
            inputs, dropped = self.prepare_inputs(past, turn, max_new_tokens, system_prompt)
        except ValueError as error:
            yield _error(str(error), notes)
            return
        if dropped:
            notes = [_note(
                f"This conversation is longer than the model's context ({self.context_length} tokens), "
                f"so the model no longer sees the {dropped} oldest turn{'s' if dropped > 1 else ''}."
            )] + notes
            yield notes

        streamer = TextIteratorStreamer(
            self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=TOKEN_POLL_S
        )
        stop = threading.Event()
        failure: list[BaseException] = []
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        kwargs = dict(
            **inputs.to(self.model.device, dtype=self.model.dtype),
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
            **sampling,
        )

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as error:  # reported in the chat below
                failure.append(error)
                streamer.end()  # wake the loop below instead of leaving it waiting

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        answer = ""
        last_token = time.monotonic()
        try:
            while True:
                try:
                    piece = next(streamer)
                except StopIteration:
                    break
                except queue.Empty:  # nothing new yet: fine unless the worker is gone or stuck
                    if not worker.is_alive() or time.monotonic() - last_token > GENERATION_TIMEOUT_S:
                        break
                    continue
                last_token = time.monotonic()
                if piece:
                    answer += piece
                    yield _reply(notes, answer)
        finally:  # also runs when Gradio closes the generator (stop button): end generate promptly
            stop.set()
            worker.join(timeout=GENERATION_TIMEOUT_S)
        if failure:
            yield _error(f"Generation failed: {type(failure[0]).__name__}: {failure[0]}", notes, answer)
        elif not answer.strip():
            yield notes + [_note("The model gave an empty answer.")]

    # ---- building the prompt ------------------------------------------------------------------

    def prepare_inputs(self, past: list[Turn], turn: Turn, max_new_tokens: int, system_prompt: str = ""):
        """Model inputs for the conversation `past + [turn]`, dropping the oldest turns that do not fit
        (the system prompt, before the first turn, is always kept).

        Returns (BatchFeature, number of turns dropped). ValueError when even the new turn alone is
        too long, or a file can no longer be read.
        """
        turns = [t for t in past if not t.failed] + [turn]
        budget = self.context_length - max_new_tokens
        inputs = self._encode(turns, system_prompt)
        ids = inputs["input_ids"][0].tolist()
        if len(ids) <= budget:
            return inputs, 0
        # Each turn starts with a <|user|> token (user text cannot contain one: see _clean), so the
        # tokens left after dropping the k oldest turns are known without encoding again.
        starts = [i for i, token in enumerate(ids) if token == self._user_token_id]
        if len(starts) == len(turns):
            for k in range(1, len(turns)):
                if starts[0] + len(ids) - starts[k] <= budget:
                    return self._encode(turns[k:], system_prompt), k
        own = starts[0] + len(ids) - starts[-1] if starts else len(ids)
        raise ValueError(
            f"This message is {own} tokens long with its images and audio; with {max_new_tokens} tokens kept for "
            f"the answer, it does not fit the model's context of {self.context_length} tokens. "
            "Send a shorter message, fewer images or shorter audio, or lower 'Max new tokens'."
        )

    def _encode(self, turns: list[Turn], system_prompt: str = ""):
        messages, images, clips = [], [], []
        if self._clean(system_prompt).strip():
            messages.append({"role": "system", "content": self._clean(system_prompt).strip()})
        for turn in turns:
            parts = []
            for path in turn.files:
                kind = file_kind(path)
                if kind == "image":
                    parts.append({"type": "image"})
                    images.append(path)
                elif kind == "audio" and turn.transcripts is None:
                    parts.append({"type": "audio"})
                    clips.append(path)
            text = "\n".join(self._clean(t) for t in [*(turn.transcripts or []), turn.text] if self._clean(t))
            if text:
                parts.append({"type": "text", "text": text})
            messages.append({"role": "user", "content": parts})
            if turn is not turns[-1]:
                messages.append({"role": "assistant", "content": self._clean(turn.answer)})
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        # No length limit here: prepare_inputs measures the prompt and trims it itself.
        return self.processor(
            text=prompt, images=images or None, audio=clips or None, max_length=sys.maxsize, return_tensors="pt"
        )

    def _clean(self, text: str) -> str:
        """Typed text can't forge chat roles or media placeholders (they would break the prompt)."""
        text = _CHAT_MARKERS.sub("", text or "")
        for token in (self.processor.image_token, self.processor.audio_token):
            text = text.replace(token, "")
        return text.strip()

    # ---- uploads and speech recognition ------------------------------------------------------

    def _check_upload(self, path: str) -> tuple[str, Any]:
        """('image' | 'audio', decoded) for a usable upload; ValueError naming the file otherwise."""
        name = Path(path).name
        if not os.path.isfile(path):
            raise ValueError(f"{name}: the uploaded file is missing; please upload it again.")
        size_mb = os.path.getsize(path) / 2**20
        if size_mb > self.max_file_mb:
            raise ValueError(f"{name} is {size_mb:.1f} MB; files up to {self.max_file_mb:g} MB are accepted.")
        kind = file_kind(path)
        if kind is None:
            raise ValueError(
                f"{name} is not an image or an audio file; attach images (PNG, JPEG...) or audio (WAV, FLAC...)."
            )
        if kind == "audio" and _audio_frames(path) == 0:
            raise ValueError(f"{name} is an empty audio clip; record or attach some sound.")
        try:
            decoded = self._load_image(path) if kind == "image" else self._load_audio(path)
        except ValueError as error:
            reason = _MEDIA_INDEX.sub("", str(error)).replace(f"'{path}'", name)  # no server paths in the chat
            raise ValueError(f"{name} could not be used: {reason}") from None
        return kind, decoded

    def _transcribe(self, wave: np.ndarray) -> str:
        """Whisper ASR of one 16 kHz clip; RuntimeError with a clear message when ASR is unavailable."""
        with self._asr_lock:
            if self.transcriber is None and self._asr_error is None:
                try:
                    self.transcriber = whisper_transcriber(self.asr_model, self.model.device)
                except Exception as error:  # offline, not a Whisper checkpoint, no tokenizer...
                    reason = " ".join(str(error).split()) or type(error).__name__
                    # Remembered, so every later request doesn't retry a download that cannot work.
                    self._asr_error = (
                        f"Speech recognition is unavailable: could not load {self.asr_model!r} ({reason})."
                    )
            if self._asr_error is not None:
                hint = (
                    " Turn off 'Transcribe audio with Whisper first' to send the audio to the model directly."
                    if self.has_audio_tower
                    else " This model has no audio encoder, so it cannot use audio without it."
                )
                raise RuntimeError(self._asr_error + hint)
            try:
                return " ".join(str(self.transcriber(wave)).split())
            except Exception as error:
                raise RuntimeError(f"Speech recognition failed: {type(error).__name__}: {error}") from None


def _note(text: str) -> dict:
    return {"role": "assistant", "content": text, "metadata": {"title": NOTE_TITLE}}


def _error(text: str, notes: list[dict] = (), answer: str = "") -> dict | list[dict]:
    error = {"role": "assistant", "content": text, "metadata": {"title": ERROR_TITLE}}
    before = list(notes) + ([{"role": "assistant", "content": answer}] if answer else [])
    return before + [error] if before else error


def _reply(notes: list[dict], answer: str) -> str | list[dict]:
    return notes + [{"role": "assistant", "content": answer}] if notes else answer


# ---- the app ------------------------------------------------------------------------------------


def pass_every_upload(textbox: gr.MultimodalTextbox) -> gr.MultimodalTextbox:
    """Let every upload reach the handler; `file_types` then only filter the browser's file picker.

    Gradio would refuse other files on the server, with an error the chat never shows (API clients
    get an exception); the handler checks files by content and explains a bad one in the chat.
    Set on this instance rather than in a subclass: Gradio writes a .pyi stub next to the module
    of every component subclass.
    """

    def preprocess(payload):
        return None if payload is None else {"text": payload.text, "files": [file.path for file in payload.files]}

    textbox.preprocess = preprocess
    return textbox


EXAMPLES = [
    ("What color is the shape?", ["red_circle.png"]),
    ("What shape is the blue object?", ["blue_triangle.png"]),
    ("Is the tone high or low?", ["low_tone.wav"]),
    ("How many beeps are there?", ["three_beeps.wav"]),
    ("Hello! What can you do?", []),
]


def build_demo(assistant: Assistant) -> gr.ChatInterface:
    """The chat UI around `assistant.respond`; the caller launches it."""
    if assistant.speech_aligned:
        audio_info = (
            "Off: the model hears your audio itself, spoken questions included (it was aligned for speech). "
            "On: Whisper turns speech into text that joins your message."
        )
    elif assistant.has_audio_tower:
        audio_info = (
            "The model hears sounds itself but was not aligned for speech: turn this on for spoken "
            "questions, and Whisper turns them into text that joins your message."
        )
    else:
        audio_info = "Always on: this model has no audio encoder."

    examples = [
        [{"text": text, "files": [str(EXAMPLES_DIR / name) for name in files]}]
        for text, files in EXAMPLES
        if all((EXAMPLES_DIR / name).is_file() for name in files)
    ]
    demo = gr.ChatInterface(
        assistant.respond,
        multimodal=True,
        chatbot=gr.Chatbot(
            placeholder="## What can I help with?\nAsk anything, attach images or audio clips, or record your voice.",
            show_label=False,
            scale=1,
            height="70vh",
            buttons=["copy", "copy_all"],
        ),
        textbox=pass_every_upload(
            gr.MultimodalTextbox(
                file_types=["image", "audio"],
                file_count="multiple",
                sources=["upload", "microphone"],
                placeholder="Message the model…",
                stop_btn=True,
                autofocus=True,
            )
        ),
        additional_inputs=[
            gr.Slider(1, 4096, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens"),
            gr.Slider(0.0, 1.5, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature", info="0: most likely token"),
            gr.Checkbox(
                value=not assistant.has_audio_tower,
                interactive=assistant.has_audio_tower,
                label="Transcribe audio with Whisper first",
                info=audio_info,
            ),
            gr.Textbox(value="", label="System prompt", lines=2, placeholder="Sent as the system turn, e.g. 'Answer in one word.'"),
        ],
        additional_inputs_accordion=gr.Accordion("⚙️ Generation settings", open=False),
        examples=examples or None,
        cache_examples=False,  # Spaces would otherwise run the model on every example at start-up
        title="Phi-3.5 multimodal chat",
        description="Text, images and audio in, text out: Phi-3.5-mini with CLIP vision and a Whisper audio encoder.",
        api_name="chat",
        # One model in memory: one request generates at a time, the rest wait in the queue (the
        # handler's lock also covers the UI's retry / example events, which have their own limits).
        concurrency_limit=1,
        fill_height=True,
    )
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, host: str, port: int, max_file_mb: float = MAX_FILE_MB, **kwargs):
    """Launch on host:port; Gradio refuses uploads far above the handler's limit before storing them."""
    return demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{int(max_file_mb * UPLOAD_HARD_LIMIT_FACTOR * 1024) + 1}kb",
        allowed_paths=[str(EXAMPLES_DIR)],
        **kwargs,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="hub id or folder (default: $MODEL_ID, outputs/demo/model, or DEFAULT_REPO_ID)"
    )
    parser.add_argument(
        "--asr_model",
        default=None,
        help="Whisper checkpoint for ASR (default: $ASR_MODEL, outputs/real_parts/whisper_base, or DEFAULT_ASR_MODEL)",
    )
    # Spaces set GRADIO_SERVER_NAME=0.0.0.0; locally the app stays on the loopback interface.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--max_file_mb", type=float, default=float(os.environ.get("MAX_FILE_MB", MAX_FILE_MB)))
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model_id, asr_model = resolve_model_id(args.model), resolve_asr_model(args.asr_model)
    print(f"Loading {model_id} (speech recognition, on first use: {asr_model}) ...", flush=True)
    try:
        assistant = Assistant(*load_model(model_id, args.dtype), asr_model=asr_model, max_file_mb=args.max_file_mb)
    except ModelLoadError as error:
        sys.exit(f"error: {error}")
    launch(build_demo(assistant), args.host, args.port, args.max_file_mb)


if __name__ == "__main__":
    main()
