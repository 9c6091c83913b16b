"""Spoken questions: the human turns of any LLaVA-format file read aloud by offline voices.

    python -m phi3mm.tts --data_path rows.json --out_dir spoken --engines flite,espeak-ng --seed 0

Every human turn with something to say (placeholders removed) becomes a 16 kHz mono PCM_16 WAV
under OUT/audio/ and an `<audio>` placeholder where its text stood; `<image>` placeholders, image
keys and clips the row already had stay. Each clip gets its own voice, speaking rate, pitch and a
little white or pink noise at a random SNR, all drawn in order from one seeded generator, so the
same seed gives the same files whatever the thread timing. OUT/rows.jsonl holds the rows:

    {"id": ..., "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\\n<audio>"}, ...],
     "audio": ["000/000000_0.wav"], "transcripts": ["What is in the picture?"],
     "voices": [{"engine": "flite", "voice": "slt", "rate": 1.05, "pitch": 0.95, "noise": "pink", "snr_db": 27.5}]}

(`audios` instead of `audio` for conversational `messages` rows, as that format names it; a row
that had clips keeps them, at their placeholders, with None as their transcript and voice.)
`--mode asr` writes bare ASR rows instead, `{"audio": "000/000000_0.wav", "text": "What is ..."}`,
one per clip, for the speech-alignment stage. Train with `--audio_folder OUT/audio`.

An engine is one function `(text, voice, rate, pitch) -> float32 samples at 16 kHz` in `ENGINES`
(rate and pitch relative to the voice's own, 1.0 = unchanged); a better synthesiser is one more
function there and its voices in `DEFAULT_VOICES`. A missing engine, an unknown voice or an engine
that fails says so by name before any clip is written.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile

from phi3mm.data import MEDIA_KEYS, ROLES, read_rows, row_media, row_messages
from processing_multimodal import SAMPLING_RATE, load_audio, load_image

IMAGE_TOKEN, AUDIO_TOKEN = "<image>", "<audio>"
PLACEHOLDER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(AUDIO_TOKEN)})")

# ---------------------------------------------------------------------------------------------
# Engines: (text, voice, rate, pitch) -> float32 mono samples at 16 kHz
# ---------------------------------------------------------------------------------------------


def _program(name: str) -> str:
    """The engine's executable, or a RuntimeError that says how to install it."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: apt-get install {name}")
    return path


def _synthesise(engine: str, command: list[str], wav: Path, stdin: str | None = None) -> np.ndarray:
    """Run an engine that writes `wav`; its samples at 16 kHz, or a RuntimeError with its stderr."""
    try:
        result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"{engine} failed: {error}") from None
    if result.returncode != 0 or not wav.is_file() or wav.stat().st_size <= 44:
        raise RuntimeError(
            f"{engine} failed (exit {result.returncode}): {result.stderr.strip()[-500:] or 'no audio written'}"
        )
    try:
        return load_audio(str(wav))
    except ValueError as error:
        raise RuntimeError(f"{engine} wrote unreadable audio: {error}") from None


def _check_rate_pitch(rate: float, pitch: float) -> None:
    if not 0.25 <= rate <= 4.0:
        raise ValueError(f"rate must lie in [0.25, 4], got {rate}")
    if not 0.5 <= pitch <= 2.0:
        raise ValueError(f"pitch must lie in [0.5, 2], got {pitch}")


@functools.lru_cache
def flite_voices(program: str = "flite") -> tuple[str, ...]:
    """The voices `flite -lv` lists (kal, kal16, awb, rms, slt, ...)."""
    result = subprocess.run([_program(program), "-lv"], capture_output=True, text=True, timeout=30, check=False)
    return tuple(result.stdout.split(":", 1)[-1].split())


# flite has no relative pitch: its int_f0_target_mean is in Hz, so the factor scales each voice's
# own mean F0 (measured with librosa.pyin on flite 2.2). rms ignores the feature: no pitch there.
FLITE_MEAN_F0 = {"kal": 87.0, "kal16": 87.0, "awb": 132.0, "slt": 174.0}


def speak_flite(text: str, voice: str = "slt", rate: float = 1.0, pitch: float = 1.0) -> np.ndarray:
    """`text` in a flite voice (`flite -lv`, or a .flitevox file) as float32 samples at 16 kHz."""
    _check_rate_pitch(rate, pitch)
    program = _program("flite")
    if voice not in flite_voices(program) and not os.path.isfile(voice):  # flite itself falls back silently
        raise ValueError(f"unknown flite voice {voice!r}; flite -lv lists {', '.join(flite_voices(program))}")
    with tempfile.TemporaryDirectory(prefix="tts_") as tmp:
        wav = Path(tmp) / "speech.wav"
        command = [program, "-voice", voice, "--setf", f"duration_stretch={1 / rate:.4f}"]
        if pitch != 1.0 and voice in FLITE_MEAN_F0:
            command += ["--setf", f"int_f0_target_mean={FLITE_MEAN_F0[voice] * pitch:.1f}"]
        return _synthesise("flite", [*command, "-t", text, "-o", str(wav)], wav)


@functools.lru_cache
def espeak_ng_voices(program: str = "espeak-ng") -> tuple[frozenset[str], frozenset[str]]:
    """(voices, variants) espeak-ng knows: languages, voice names and files; variant files (`+f3`)."""

    def table(option: str) -> list[list[str]]:
        result = subprocess.run([program, option], capture_output=True, text=True, timeout=30, check=False)
        return [line.split() for line in result.stdout.splitlines()[1:] if len(line.split()) >= 5]

    voices = {name for cols in table("--voices") for name in (cols[1], cols[3], cols[4], cols[4].rsplit("/", 1)[-1])}
    variants = {cols[4].rsplit("/", 1)[-1] for cols in table("--voices=variant")}
    return frozenset(voices), frozenset(variants)


def speak_espeak_ng(text: str, voice: str = "en-us", rate: float = 1.0, pitch: float = 1.0) -> np.ndarray:
    """`text` in an espeak-ng voice (en-us, en-gb-x-rp, en-us+f3, ...) as float32 samples at 16 kHz."""
    _check_rate_pitch(rate, pitch)
    program = _program("espeak-ng")
    voices, variants = espeak_ng_voices(program)
    base, _, variant = voice.partition("+")
    if base not in voices:
        raise ValueError(f"unknown espeak-ng voice {base!r}; espeak-ng --voices=en lists the English ones")
    if variant and variant not in variants:  # espeak-ng ignores an unknown variant without a word
        raise ValueError(f"unknown espeak-ng variant {variant!r}; espeak-ng --voices=variant lists them")
    # -s: words a minute (default 175, 80 at least); -p: 0-99, default 50, about +1% F0 per step
    speed = max(80, round(175 * rate))
    level = min(99, max(0, round(50 + 100 * math.log(pitch))))
    with tempfile.TemporaryDirectory(prefix="tts_") as tmp:
        wav = Path(tmp) / "speech.wav"
        command = [program, "-v", voice, "-s", str(speed), "-p", str(level), "-w", str(wav), "--stdin"]
        return _synthesise("espeak-ng", command, wav, stdin=text)  # on stdin: a leading "-" is no option


Engine = Callable[[str, str, float, float], np.ndarray]
ENGINES: dict[str, Engine] = {"flite": speak_flite, "espeak-ng": speak_espeak_ng}

# A spread of English voices whisper-base understands: male and female, US, British, Scottish,
# Caribbean accents. kal (8 kHz, telephone band) and flite's awb_time (a clock-only voice) are left out.
DEFAULT_VOICES: dict[str, tuple[str, ...]] = {
    "flite": ("kal16", "awb", "rms", "slt"),
    "espeak-ng": (
        "en-us",
        "en-gb",
        "en-gb-x-rp",
        "en-gb-scotland",
        "en-029",
        "en-us+f3",
        "en-gb+f2",
        "en-us+m3",
        "en-gb-x-rp+f4",
    ),
}


def speak(
    text: str, engine: str = "espeak-ng", voice: str | None = None, rate: float = 1.0, pitch: float = 1.0
) -> np.ndarray:
    """`text` spoken by one of ENGINES as float32 mono samples at 16 kHz (voice: the engine's first default).

    ValueError for an unknown engine, voice, rate or pitch; RuntimeError naming a missing or failing engine.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return ENGINES[engine](text, voice or DEFAULT_VOICES[engine][0], rate, pitch)


def parse_voices(
    voices: Iterable[str | tuple[str, str]] | None = None, engines: Iterable[str] | None = None
) -> list[tuple[str, str]]:
    """(engine, voice) pairs from pairs or "engine:voice" strings; default: DEFAULT_VOICES of `engines`.

    A bare voice name is taken for the one engine given. ValueError for an unknown engine.
    """
    engines = list(engines or ENGINES)
    for engine in engines:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    if voices is None:
        return [(engine, voice) for engine in engines for voice in DEFAULT_VOICES[engine]]
    pairs = []
    for item in voices:
        if isinstance(item, str):
            engine, sep, voice = item.partition(":")
            if not sep:
                if len(engines) != 1:
                    raise ValueError(f"voice {item!r}: write engine:voice (engines: {', '.join(engines)})")
                engine, voice = engines[0], item
        else:
            engine, voice = item
        if engine not in ENGINES:
            raise ValueError(f"voice {item!r}: unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
        pairs.append((engine, voice))
    if not pairs:
        raise ValueError("no voices given")
    return pairs


def check_voices(pairs: Sequence[tuple[str, str]]) -> None:
    """Speak a word in every voice: a missing engine, an unknown voice or a failing engine raises now."""
    for engine, voice in dict.fromkeys(pairs):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
        ENGINES[engine]("test", voice, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------

NOISE_KINDS = ("white", "pink")


def add_noise(wave: np.ndarray, snr_db: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """`wave` plus white or pink (1/f power) noise `snr_db` below the speech's active level."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
    if kind == "pink":  # white noise shaped by 1/sqrt(f), at a power-of-two length (a fast FFT)
        n_fft = 1 << max(len(wave) - 1, 1).bit_length()
        spectrum = np.fft.rfft(rng.standard_normal(n_fft))
        spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
        noise = np.fft.irfft(spectrum, n_fft)[: len(wave)]
    else:
        noise = rng.standard_normal(len(wave))
    # The level of the speech itself, not of the pauses: 20 ms frames within 30 dB of the loudest
    frames = wave[: len(wave) // 320 * 320].reshape(-1, 320) if len(wave) >= 320 else wave[None]
    power = (frames.astype(np.float64) ** 2).mean(axis=1)
    speech_power = power[power >= power.max() * 1e-3].mean()
    noise *= math.sqrt(speech_power / max((noise**2).mean(), 1e-20) / 10 ** (snr_db / 10))
    out = wave + noise
    peak = np.abs(out).max()
    return (out / peak * 0.99 if peak > 0.99 else out).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def spoken_text(text: str) -> str:
    """What a turn's text says aloud: placeholders removed, whitespace collapsed."""
    return " ".join(PLACEHOLDER.sub(" ", text).split())


def _has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _format(row: dict) -> tuple[str, str, str, str]:
    """(turns key, role key, content key, audio key) of a LLaVA or conversational row."""
    if isinstance(row.get("messages"), list):
        turns, role, content, audio = "messages", "role", "content", "audios"
    else:
        turns, role, content, audio = "conversations", "from", "value", "audio"
    existing = next((k for k in ("audio", "audios") if row.get(k) not in (None, "", [])), None)
    return turns, role, content, existing or audio


def _pieces(content) -> list:
    """A turn's content as a list of pieces: "<image>" / "<audio>" / a part dict for media, str for text."""
    pieces: list = []
    for part in [content] if isinstance(content, str) else content:
        if isinstance(part, dict) and part.get("type") in ("image", "audio"):
            pieces.append(part)
        else:
            text = part if isinstance(part, str) else part["text"]
            pieces += [piece for piece in PLACEHOLDER.split(text) if piece.strip()]
    return pieces


def _is_media(piece, kind: str) -> bool:
    return piece == f"<{kind}>" or (isinstance(piece, dict) and piece.get("type") == kind)


def _content(pieces: list, as_string: bool):
    """Pieces back into the turn's format: a string of placeholders, or a list of typed parts."""
    if as_string:
        return "\n".join(f"<{p['type']}>" if isinstance(p, dict) else p for p in pieces)
    return [p if isinstance(p, dict) else {"type": p[1:-1]} for p in pieces]


@dataclass
class Clip:
    """One spoken turn: what it says, where it goes and how it sounds."""

    text: str
    file: str  # relative to OUT/audio
    engine: str = ""
    voice: str = ""
    rate: float = 1.0
    pitch: float = 1.0
    noise: str = "white"
    snr_db: float | None = None  # None: no noise
    noise_seed: int = 0
    silence_s: tuple[float, float] = (0.0, 0.0)  # before and after the speech, as in a recording

    @property
    def key(self) -> str:
        """Identical synthesis, identical key: repeats are spoken once."""
        spec = json.dumps([self.text, self.engine, self.voice, self.rate, self.pitch])
        return hashlib.sha1(spec.encode()).hexdigest()

    def metadata(self) -> dict:
        keys = ("engine", "voice", "rate", "pitch", "noise", "snr_db", "silence_s")
        return {k: v for k, v in asdict(self).items() if k in keys}


def speak_row(
    row: dict, index: int, first_turn_only: bool = False, max_words: int | None = None
) -> tuple[dict, list[Clip]]:
    """A row with its human turns' text replaced by `<audio>`, and the clips to speak (no voices yet).

    The audio list follows the placeholders: the row's own clips at theirs, new ones where the text
    stood. A row whose clips have no placeholder gets them at the start of its first human turn, as
    `row_messages` would read it. ValueError for a row `row_messages` refuses.
    """
    row_messages(row)  # the same checks training makes: roles, an answer, placeholder counts
    turns_key, role_key, content_key, audio_key = _format(row)
    old_audio = row_media(row, "audio", None)
    old_audio = [str(a) if isinstance(a, Path) else a for a in old_audio]
    out = dict(row)
    out[turns_key] = [dict(turn) for turn in row[turns_key]]
    human = [t for t in out[turns_key] if ROLES.get(str(t.get(role_key)).lower()) == "user"]
    human_ids = {id(t) for t in human}
    first_is_string = isinstance(human[0][content_key], str)
    n_slots = sum(1 for t in out[turns_key] for p in _pieces(t[content_key]) if _is_media(p, "audio"))
    if old_audio and n_slots == 0:  # make row_messages' implicit placeholders explicit before adding more
        prefix = [AUDIO_TOKEN if first_is_string else {"type": "audio"}] * len(old_audio)
        human[0][content_key] = _content(prefix + _pieces(human[0][content_key]), first_is_string)
    clips, audio, transcripts, old = [], [], [], iter(old_audio)
    for turn in out[turns_key]:
        pieces = _pieces(turn[content_key])
        text = " ".join(p for p in pieces if isinstance(p, str) and not PLACEHOLDER.fullmatch(p))
        text = " ".join(text.split())
        speak = id(turn) in human_ids and _has_words(text) and not (first_turn_only and turn is not human[0])
        speak = speak and (max_words is None or len(text.split()) <= max_words)
        new_pieces, placed = [], False
        for piece in pieces:
            if _is_media(piece, "audio"):
                new_pieces.append(piece)
                audio.append(next(old))
                transcripts.append(None)
            elif _is_media(piece, "image") or not speak:
                new_pieces.append(piece)
            elif not placed:  # the clip stands where the text began
                new_pieces.append(AUDIO_TOKEN)
                clip = Clip(text=text, file=f"{index // 1000:03d}/{index:06d}_{len(clips)}.wav")
                clips.append(clip)
                audio.append(clip)
                transcripts.append(text)
                placed = True
        if speak:
            turn[content_key] = _content(new_pieces, isinstance(turn[content_key], str))
    out.pop("audio", None), out.pop("audios", None)
    if audio:
        out[audio_key] = audio  # Clip objects: file names once the clips are voiced
        out["transcripts"] = transcripts
    return out, clips


# ---------------------------------------------------------------------------------------------
# Speaking a data set
# ---------------------------------------------------------------------------------------------


def _media_to_files(row: dict, index: int, out_dir: Path) -> dict:
    """The row with images and clips it holds itself (bytes, PIL images, arrays: a datasets folder)
    written to files under `out_dir`/images and /audio, named by absolute path (which loads under any
    folder), so the row can be JSON. Rows of file names come back as they are."""
    row = dict(row)
    for kind in ("image", "audio"):
        key = next((k for k in MEDIA_KEYS[kind] if row.get(k) not in (None, "", [])), None)
        items = row_media(row, kind, None) if key else []
        if all(isinstance(item, Path) for item in items):
            continue
        names = []
        for k, item in enumerate(items):
            if isinstance(item, Path):
                names.append(str(item))
                continue
            folder = out_dir / ("images" if kind == "image" else "audio") / f"{index // 1000:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            if kind == "image":
                path = folder / f"{index:06d}_{k}.png"
                load_image(item, k).save(path)
            else:
                path = folder / f"{index:06d}_own{k}.wav"
                soundfile.write(str(path), load_audio(item, k), SAMPLING_RATE, subtype="PCM_16")
            names.append(str(path.resolve()))
        row[key] = names if isinstance(row[key], (list, tuple)) else names[0]
    return row


def _draw(low_high: Sequence[float], rng: np.random.Generator, step: float) -> float:
    """A value drawn evenly from [low, high] on a grid of `step`: repeats hit the synthesis cache."""
    low, high = low_high
    value = round(round(rng.uniform(low, high) / step) * step, 4)
    return min(high, max(low, value))


def _jsonable(value):
    """Row values JSON can hold; Clip objects become their file names."""
    if isinstance(value, Clip):
        return value.file
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"a {type(value).__name__} in the row cannot be written as JSON")


def speak_rows(
    rows: Iterable[dict] | str | os.PathLike,
    out_dir: str | os.PathLike,
    voices: Iterable[str | tuple[str, str]] | None = None,
    engines: Iterable[str] | None = None,
    seed: int = 0,
    rates: Sequence[float] = (0.85, 1.15),
    pitches: Sequence[float] = (0.9, 1.1),
    noise_db: Sequence[float] | None = (20.0, 40.0),
    noise_kinds: Sequence[str] = NOISE_KINDS,
    silence_s: Sequence[float] = (0.0, 0.0),
    mode: str = "chat",
    first_turn_only: bool = False,
    max_words: int | None = 80,
    audio_folder: str | os.PathLike | None = None,
    image_folder: str | os.PathLike | None = None,
    workers: int | None = None,
    chunk_size: int = 512,
    log: Callable[[str], None] = print,
) -> dict:
    """Speak the human turns of `rows` (a list of LLaVA / conversational rows or a path `read_rows`
    reads) into `out_dir`/audio and write `out_dir`/rows.jsonl; returns a summary dict.

    voices: (engine, voice) pairs or "engine:voice" strings, drawn evenly per clip (default: the
        DEFAULT_VOICES of `engines`, all engines if None). Give the training or held-out voices here.
    rates, pitches: [low, high] ranges relative to each voice's own (grid of 0.05); noise_db: the
        [low, high] SNR range of the noise, None for clean clips; noise_kinds: which noises to draw.
    silence_s: [low, high] seconds of silence before and after the speech, drawn for each end (a
        microphone recording starts before the speaker and stops after); the noise covers it too.
    mode: "chat" (the rows, spoken) or "asr" (one {"audio", "text"} row per clip).
    max_words: longer turns stay text (a minute of synthetic speech is not a question).
    audio_folder: where the rows' own clips are (they are written as paths from there, which load
        under any folder); image_folder: images checked to exist (the count missing is reported).
    """
    if mode not in ("chat", "asr"):
        raise ValueError(f"mode must be 'chat' or 'asr', got {mode!r}")
    for kind in noise_kinds:
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise must be among {NOISE_KINDS}, got {kind!r}")
    ranges = (("rates", rates), ("pitches", pitches), ("noise_db", noise_db or (0, 0)), ("silence_s", silence_s))
    for name, low_high in ranges:
        if len(low_high) != 2 or low_high[0] > low_high[1]:
            raise ValueError(f"{name} must be a (low, high) range, got {low_high!r}")
    if silence_s[0] < 0:
        raise ValueError(f"silence_s must be seconds >= 0, got {silence_s!r}")
    for rate, pitch in zip(rates, pitches):  # both ends, before any engine runs
        _check_rate_pitch(rate, pitch)
    pairs = parse_voices(voices, engines)
    check_voices(pairs)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    source = read_rows(rows)

    spoken, skipped, missing_images = [], Counter(), 0
    for index, row in enumerate(source):
        try:
            new_row, clips = speak_row(_media_to_files(row, index, out_dir), index, first_turn_only, max_words)
            _jsonable(new_row)  # anything else a row holds must be JSON too
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            skipped[f"bad row: {str(error)[:60]}"] += 1
            continue
        if not clips:
            skipped["nothing to say"] += 1
            continue
        if audio_folder is not None:
            key = _format(new_row)[3]
            new_row[key] = [a if isinstance(a, Clip) else str(Path(audio_folder, a).resolve()) for a in new_row[key]]
        if image_folder is not None:
            names = [item for item in row_media(row, "image", None) if isinstance(item, Path)]
            missing_images += sum(not Path(image_folder, name).is_file() for name in names)
        spoken.append((new_row, clips))

    # Every random choice in row order, here: the same seed gives the same clips in any thread order
    rng, silence_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    all_clips = [clip for _, clips in spoken for clip in clips]
    for clip in all_clips:
        clip.engine, clip.voice = pairs[rng.integers(len(pairs))]
        clip.rate, clip.pitch = _draw(rates, rng, 0.05), _draw(pitches, rng, 0.05)
        clip.noise = noise_kinds[rng.integers(len(noise_kinds))]
        clip.snr_db = None if noise_db is None else round(float(rng.uniform(*noise_db)), 1)
        clip.noise_seed = int(rng.integers(2**31))
        # From a generator of their own: padding leaves every other draw as the seed gives it
        clip.silence_s = (_draw(silence_s, silence_rng, 0.05), _draw(silence_s, silence_rng, 0.05))

    pending = Counter(clip.key for clip in all_clips)  # a synthesis is kept until its last clip is written
    cache: dict[str, np.ndarray] = {}
    seconds = 0.0

    def synthesise(clip: Clip) -> None:
        try:
            cache[clip.key] = ENGINES[clip.engine](clip.text, clip.voice, clip.rate, clip.pitch)
        except RuntimeError as error:
            raise RuntimeError(f"{clip.engine} voice {clip.voice!r} on {clip.text[:80]!r}: {error}") from None

    def write(clip: Clip) -> float:
        wave = cache[clip.key]
        if any(clip.silence_s):
            before, after = (np.zeros(round(s * SAMPLING_RATE), np.float32) for s in clip.silence_s)
            wave = np.concatenate([before, wave, after])
        if clip.snr_db is not None:
            wave = add_noise(wave, clip.snr_db, clip.noise, np.random.default_rng(clip.noise_seed))
        path = out_dir / "audio" / clip.file
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), wave, SAMPLING_RATE, subtype="PCM_16")
        return len(wave) / SAMPLING_RATE

    workers = workers or min(4, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # engines are subprocesses: threads suffice
        for begin in range(0, len(all_clips), chunk_size):
            chunk = all_clips[begin : begin + chunk_size]
            todo = list({clip.key: clip for clip in chunk if clip.key not in cache}.values())
            list(pool.map(synthesise, todo))
            seconds += sum(pool.map(write, chunk))
            for clip in chunk:
                pending[clip.key] -= 1
                if not pending[clip.key]:
                    del cache[clip.key]
            log(f"spoke {begin + len(chunk)}/{len(all_clips)} clips")
    synthesised = len({clip.key for clip in all_clips})

    rows_path = out_dir / "rows.jsonl"
    with open(rows_path, "w", encoding="utf-8") as file:
        for row, clips in spoken:
            if mode == "asr":
                lines = [{"audio": clip.file, "text": clip.text} for clip in clips]
            else:
                audio_key = _format(row)[3]
                voiced = {id(clip): clip.metadata() for clip in clips}
                row["voices"] = [voiced.get(id(a)) for a in row[audio_key]]
                lines = [row]
            file.writelines(json.dumps(_jsonable(line), ensure_ascii=False) + "\n" for line in lines)

    elapsed = time.perf_counter() - start
    summary = {
        "rows_path": str(rows_path),
        "audio_folder": str(out_dir / "audio"),
        "mode": mode,
        "rows_in": len(source),
        "rows_out": len(spoken),
        "skipped": dict(skipped),
        "clips": len(all_clips),
        "synthesised": synthesised,
        "audio_seconds": round(seconds, 1),
        "seconds": round(elapsed, 2),
        "clips_per_s": round(len(all_clips) / elapsed, 1) if elapsed else None,
        "voices": dict(Counter(f"{c.engine}:{c.voice}" for c in all_clips).most_common()),
        "seed": seed,
    }
    if image_folder is not None:
        summary["missing_images"] = missing_images
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"{len(all_clips)} clips ({synthesised} synthesised, {seconds / 60:.1f} min of speech) from "
        f"{len(spoken)}/{len(source)} rows in {elapsed:.1f} s: {summary['clips_per_s']} clips/s -> {rows_path}"
    )
    return summary


def _floats(text: str) -> tuple[float, ...] | None:
    return None if text.lower() in ("", "none", "off") else tuple(float(x) for x in text.split(","))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data_path", required=True, help="LLaVA / conversational rows: JSON, JSON Lines or a datasets folder"
    )
    parser.add_argument("--out_dir", required=True, type=Path, help="writes audio/, rows.jsonl and summary.json")
    parser.add_argument("--image_folder", default=None, help="checks that the rows' images exist (reported)")
    parser.add_argument("--audio_folder", default=None, help="where the rows' own clips are")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma list among {', '.join(ENGINES)}")
    parser.add_argument("--voices", default=None, help="comma list of engine:voice (default: the engines' defaults)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rates", default="0.85,1.15", help="low,high speaking rate relative to the voice's own")
    parser.add_argument("--pitches", default="0.9,1.1", help="low,high pitch factor (where the engine allows)")
    parser.add_argument(
        "--noise_db", default="20,40", help="low,high SNR of the added noise in dB; 'none' for clean clips"
    )
    parser.add_argument("--noise", default=",".join(NOISE_KINDS), help="noise kinds to draw from: white,pink")
    parser.add_argument("--silence_s", default="0,0", help="low,high seconds of silence before and after the speech")
    parser.add_argument("--mode", choices=("chat", "asr"), default="chat", help="spoken rows, or bare ASR rows")
    parser.add_argument("--first_turn_only", action="store_true", help="speak only each row's first human turn")
    parser.add_argument("--max_words", type=int, default=80, help="longer human turns stay text (0: no limit)")
    parser.add_argument("--workers", type=int, default=None, help="engine processes at once (default: up to 4)")
    parser.add_argument("--list_voices", action="store_true", help="print the default voices and exit")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    if args.list_voices:
        for engine, voice in parse_voices(None, engines):
            print(f"{engine}:{voice}")
        return {}
    try:
        return speak_rows(
            args.data_path,
            args.out_dir,
            voices=args.voices.split(",") if args.voices else None,
            engines=engines,
            seed=args.seed,
            rates=_floats(args.rates) or (1.0, 1.0),
            pitches=_floats(args.pitches) or (1.0, 1.0),
            noise_db=_floats(args.noise_db),
            noise_kinds=tuple(args.noise.split(",")),
            silence_s=_floats(args.silence_s) or (0.0, 0.0),
            mode=args.mode,
            first_turn_only=args.first_turn_only,
            max_words=args.max_words or None,
            audio_folder=args.audio_folder,
            image_folder=args.image_folder,
            workers=args.workers,
        )
    except (ValueError, RuntimeError) as error:
        parser.exit(2, f"error: {error}\n")


__all__ = [
    "DEFAULT_VOICES",
    "ENGINES",
    "FLITE_MEAN_F0",
    "NOISE_KINDS",
    "Clip",
    "add_noise",
    "check_voices",
    "espeak_ng_voices",
    "flite_voices",
    "parse_voices",
    "speak",
    "speak_espeak_ng",
    "speak_flite",
    "speak_row",
    "speak_rows",
    "spoken_text",
]


if __name__ == "__main__":
    main()
