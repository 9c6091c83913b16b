"""python -m phi3mm.demo_data OUT_DIR [--n_train 1200] [--n_eval 300] [--seed 0]

Offline demo data set: coloured shapes on white and synthetic tones/beeps, written to disk
in LLaVA format so a demo training run goes through exactly the same loading code as a real one.

Layout (every media path in every json is relative to OUT_DIR, so image_folder = audio_folder = OUT_DIR):
    OUT_DIR/images/*.png  OUT_DIR/audio/*.wav  OUT_DIR/train.json  OUT_DIR/eval.json
    OUT_DIR/independent_images/*.png  OUT_DIR/independent_audio/*.wav  OUT_DIR/independent.json

Row: {"id": "train_00000", "image": "images/train_00000.png", "question_type": "color",
      "conversations": [{"from": "human", "value": "<image>\\nWhat color is the shape?"},
                        {"from": "gpt", "value": "red."}]}
Audio rows carry "audio" and "<audio>" instead; question types: color, shape, position, pitch,
beeps, and "multi" (2-3 turns about one image, training split only).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from configuration_phi3_projector import SAMPLING_RATE

SR = SAMPLING_RATE  # the model's input rate: clips need no resampling
COLORS = {"red": (220, 20, 20), "green": (20, 160, 40), "blue": (30, 60, 220), "yellow": (240, 200, 0)}
# Deliberately different shades for the independent set, so it does not reuse the generator's exact RGB.
IND_COLORS = {"red": (232, 38, 48), "green": (45, 178, 75), "blue": (55, 85, 205), "yellow": (250, 218, 45)}
SHAPES = ("circle", "square", "triangle")
# Shape diameter in pixels of a 64 px image. At the tiny tower's 16 px patches, shapes under 20 px
# are mostly guessed: an independent set drawn at 18-28 px scored 90% on shape, its errors nearly
# all under 20 px, and training on 16-30 px brought held-out shape down to 78-83%.
SIZE_RANGE = (20, 30)
SIDES = ("left", "right")
# Each type is asked in a few wordings (the first is the one the app's examples use): spoken
# questions are learned from what the text path already understands, so it must know them all.
QUESTIONS = {
    "color": (("What color is the shape?", "Which colour is the shape?", "Tell me the color of the shape."), tuple(COLORS)),
    "shape": (("What shape is this?", "Which shape do you see?", "What kind of shape is it?"), SHAPES),
    "position": (("Is the shape on the left or the right?", "Which side is the shape on?",
                  "Where is the shape, left or right?"), SIDES),  # fmt: skip
    "pitch": (("Is the tone high or low?", "Is this a high or a low tone?"), ("high", "low")),
    "beeps": (("How many beeps are there?", "How many beeps do you hear?"), ("one", "two", "three")),
}
IMAGE_TYPES, AUDIO_TYPES = ("color", "shape", "position"), ("pitch", "beeps")
PITCH_BANDS = {"low": (200.0, 400.0), "high": (1500.0, 3000.0)}
COUNTS = {"one": 1, "two": 2, "three": 3}
Rng = np.random.Generator


def _box(rng: Rng, size: int, side: str, d_range: tuple[float, float]) -> tuple[int, int, int]:
    """Diameter and top-left corner of a shape lying fully inside one half (1px margin)."""
    lo, hi = (round(v * size / 64) for v in d_range)
    d = int(rng.integers(lo, hi + 1))
    half, m = size // 2, max(1, size // 64)
    x0 = (0 if side == "left" else half) + int(rng.integers(m, half - m - d + 1))
    return d, x0, int(rng.integers(m, size - m - d + 1))


def _box_continuous(rng: Rng, size: int, side: str, d_range: tuple[float, float]) -> tuple[float, float, float]:
    """As `_box`, but with sub-pixel diameter and corner, drawn uniformly."""
    d = rng.uniform(*d_range) * size / 64
    half, m = size / 2, max(1, size // 64)
    x0 = (0 if side == "left" else half) + rng.uniform(m, half - m - d)
    return d, x0, rng.uniform(m, size - m - d)


def draw_image(rng: Rng, size: int, shape: str, color: str, side: str) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d, x0, y0 = _box(rng, size, side, SIZE_RANGE)
    x1, y1, fill, draw = x0 + d - 1, y0 + d - 1, COLORS[color], ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([(x0 + (d - 1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def draw_image_independent(rng: Rng, size: int, shape: str, color: str, side: str) -> Image.Image:
    """Numpy rasteriser with 4x supersampled anti-aliasing, jittered colour and an off-white, noisy background."""
    d, x0, y0 = _box_continuous(rng, size, side, SIZE_RANGE)
    ss = 4
    ys, xs = (np.mgrid[0:size * ss, 0:size * ss] + 0.5) / ss
    u, v = (xs - x0) / d, (ys - y0) / d  # shape-local coordinates in [0, 1]
    if shape == "circle":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "square":
        mask = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    else:
        mask = (v <= 1) & (v >= 2 * np.abs(u - 0.5))
    alpha = mask.reshape(size, ss, size, ss).mean(axis=(1, 3))[..., None]
    fg = np.clip(np.array(IND_COLORS[color]) + rng.integers(-10, 11, 3), 0, 255)
    bg = rng.integers(242, 256, 3) + rng.normal(0, 1.5, (size, size, 3))
    return Image.fromarray(np.clip(bg * (1 - alpha) + fg * alpha, 0, 255).round().astype(np.uint8))


# The sounds leave nothing but the sound to answer by: any level (Whisper's log-mel is normalised
# to each clip's loudest frame), beeps starting anywhere in the first 0.5 s, 0.05-0.25 s long with
# 0.1-0.4 s gaps, clips of 0.5-3 s whatever the answer.
LEVEL_DB = (-34.0, -1.0)  # peak level, dBFS: 0.02 to 0.9
MAX_CLIP_SECONDS = 3.0
BEEP_SECONDS, GAP_SECONDS, BEEP_START_SECONDS = (0.05, 0.25), (0.1, 0.4), 0.5


def _level(rng: Rng) -> float:
    return float(10 ** (rng.uniform(*LEVEL_DB) / 20))


def _harmonics(rng: Rng) -> list[tuple[int, float, float]]:
    """A timbre: (multiple, weight, phase) of the fundamental and, half the time, random 2nd-4th
    harmonics; the answer is always the fundamental's."""
    extra = [(k, rng.uniform(0, 0.3), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)] if rng.random() < 0.5 else []
    return [(1, 1.0, 0.0), *extra]


def _wave(harmonics: list[tuple[int, float, float]], phase: np.ndarray) -> np.ndarray:
    wave = sum(weight * np.sin(k * phase + offset) for k, weight, offset in harmonics)
    return wave / np.abs(wave).max()  # peak 1: the level drawn is the clip's peak


def synth_tone(rng: Rng, pitch: str, independent: bool = False) -> np.ndarray:
    f = rng.uniform(*PITCH_BANDS[pitch])
    seconds = rng.uniform(0.5, MAX_CLIP_SECONDS)
    if not independent:
        lead = int(rng.uniform(0, min(0.5, seconds - 0.4)) * SR)  # the tone may start late
        t = np.arange(int(seconds * SR) - lead) / SR
        return np.concatenate([np.zeros(lead), _level(rng) * _wave(_harmonics(rng), 2 * np.pi * f * t)])
    # Another recipe: a random phase, a fixed weak 2nd harmonic, a slow vibrato of a few Hz, faded
    # ends, a noise floor, and a silent lead-in of up to 0.3 s.
    t = np.arange(int(seconds * SR)) / SR
    vibrato = rng.uniform(0, 0.01) * f / rng.uniform(3, 7) * np.sin(2 * np.pi * rng.uniform(3, 7) * t)
    phase = 2 * np.pi * f * t + vibrato + rng.uniform(0, 2 * np.pi)
    x = _fade(np.sin(phase) + 0.15 * np.sin(2 * phase), int(0.02 * SR))
    lead = np.zeros(int(rng.uniform(0, 0.3) * SR))
    x = np.concatenate([lead, x])[: int(MAX_CLIP_SECONDS * SR)] * _level(rng) / 1.15
    return x + rng.normal(0, 0.002 * np.abs(x).max(), x.size)


def synth_beeps(rng: Rng, n: int, independent: bool = False) -> np.ndarray:
    """`n` beeps of one pitch: sines or random timbres at 400-2000 Hz (training) or, for the
    independent set, a buzzer's odd harmonics at 500-900 Hz with faded edges and a noise floor;
    timing and level drawn as described above."""
    f = rng.uniform(500, 900) if independent else rng.uniform(400, 2000)
    amp = _level(rng)
    parts = [np.zeros(int(rng.uniform(0, BEEP_START_SECONDS) * SR))]
    timbre = _harmonics(rng)  # one timbre for every beep of a clip
    for i in range(n):
        t = np.arange(int(rng.uniform(*BEEP_SECONDS) * SR)) / SR
        if independent:
            wave = sum(np.sin(2 * np.pi * k * f * t) / k for k in (1, 3, 5)) / 1.2
            parts.append(amp * _fade(wave, int(0.01 * SR)))
        else:
            parts.append(amp * _wave(timbre, 2 * np.pi * f * t))
        if i < n - 1:
            parts.append(np.zeros(int(rng.uniform(*GAP_SECONDS) * SR)))
    x = np.concatenate(parts)
    total = int(rng.uniform(max(0.5, x.size / SR + 0.05), MAX_CLIP_SECONDS) * SR)
    x = np.pad(x, (0, max(0, total - x.size)))
    return x + rng.normal(0, 0.01 * amp, x.size) if independent else x


def _fade(x: np.ndarray, n: int) -> np.ndarray:
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))
    x = x.copy()
    x[:n] *= ramp
    x[-n:] *= ramp[::-1]
    return x


def _wording(rng: Rng, qtype: str) -> str:
    wordings = QUESTIONS[qtype][0]
    return wordings[int(rng.integers(len(wordings)))]


def _turn(question: str, tag: str, after: bool) -> str:
    return f"{question}\n{tag}" if after else f"{tag}\n{question}"


def _write_split(out: Path, name: str, n: int, rng: Rng, img_dir: str, aud_dir: str, image_size: int,
                 draw: Callable[..., Image.Image], independent: bool, multi_every: int = 0,
                 clips_per_type: int = 0) -> list[dict]:  # fmt: skip
    """`clips_per_type` > 0: the sound rows of each type share that many clips (each heard with
    other wordings and placements), so a frozen audio encoder's cache holds few; 0: one clip a row."""
    (out / img_dir).mkdir(parents=True, exist_ok=True)
    (out / aud_dir).mkdir(parents=True, exist_ok=True)
    types = IMAGE_TYPES + AUDIO_TYPES
    seen = {q: 0 for q in types}  # per-type counter: answers cycle so every class appears
    rows, k, written = [], 0, set()
    for i in range(n):
        rid = f"{name}_{i:05d}"
        after = bool(rng.random() < 0.2)  # ~20% of rows put the placeholder after the question
        if multi_every and i % multi_every == multi_every - 1:
            qtype = "multi"
        else:
            qtype, k = types[k % len(types)], k + 1
            answer = QUESTIONS[qtype][1][seen[qtype] % len(QUESTIONS[qtype][1])]
            seen[qtype] += 1
        if qtype in AUDIO_TYPES:
            clip = f"{aud_dir}/{rid}.wav"
            if clips_per_type:
                classes = len(QUESTIONS[qtype][1])
                index = (seen[qtype] - 1) // classes % max(1, clips_per_type // classes)
                clip = f"{aud_dir}/{name}_{qtype}_{answer}_{index:04d}.wav"
            if clip not in written:
                wav = synth_tone(rng, answer, independent) if qtype == "pitch" else \
                    synth_beeps(rng, COUNTS[answer], independent)
                sf.write(out / clip, wav.astype(np.float32), SR, subtype="PCM_16")
                written.add(clip)
            conv = [{"from": "human", "value": _turn(_wording(rng, qtype), "<audio>", after)},
                    {"from": "gpt", "value": f"{answer}."}]
            rows.append({"id": rid, "audio": clip, "conversations": conv, "question_type": qtype})
            continue
        attrs = {"color": str(rng.choice(list(COLORS))), "shape": str(rng.choice(SHAPES)),
                 "position": str(rng.choice(SIDES))}
        if qtype != "multi":
            attrs[qtype] = answer
        draw(rng, image_size, attrs["shape"], attrs["color"], attrs["position"]).save(out / img_dir / f"{rid}.png")
        asked = [qtype] if qtype != "multi" else \
            [str(q) for q in rng.permutation(IMAGE_TYPES)[: rng.integers(2, 4)]]
        conv = []
        for j, q in enumerate(asked):
            text = _wording(rng, q) if j else _turn(_wording(rng, q), "<image>", after)
            conv += [{"from": "human", "value": text}, {"from": "gpt", "value": f"{attrs[q]}."}]
        rows.append({"id": rid, "image": f"{img_dir}/{rid}.png", "conversations": conv, "question_type": qtype})
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return rows


def _counts(rows: list[dict]) -> dict[str, int]:
    return {q: sum(r["question_type"] == q for r in rows) for q in sorted({r["question_type"] for r in rows})}


def make_demo_dataset(out_dir: str | Path, n_train: int = 1200, n_eval: int = 300, seed: int = 0,
                      image_size: int = 64, clips_per_type: int = 0) -> dict:
    """Write train.json (with ~5% multi-turn rows) and eval.json; image_folder = audio_folder = out_dir.
    `clips_per_type`: distinct training clips per sound type (0: one per row)."""
    out = Path(out_dir)
    # Separate seed streams keep eval independent of how many train rows were drawn.
    train = _write_split(out, "train", n_train, np.random.default_rng([seed, 0]), "images", "audio",
                         image_size, draw_image, False, multi_every=20, clips_per_type=clips_per_type)
    evals = _write_split(out, "eval", n_eval, np.random.default_rng([seed, 1]), "images", "audio",
                         image_size, draw_image, False)
    return {"out_dir": str(out), "image_folder": str(out), "audio_folder": str(out),
            "train": str(out / "train.json"), "eval": str(out / "eval.json"), "n_train": len(train),
            "n_eval": len(evals), "train_counts": _counts(train), "eval_counts": _counts(evals)}


def make_independent_eval(out_dir: str | Path, n: int = 300, seed: int = 1, image_size: int = 64) -> dict:
    """Media drawn/synthesised by a different method; writes independent.json (paths relative to out_dir)."""
    out = Path(out_dir)
    rows = _write_split(out, "independent", n, np.random.default_rng([seed, 7919]), "independent_images",
                        "independent_audio", image_size, draw_image_independent, True)
    return {"out_dir": str(out), "image_folder": str(out), "audio_folder": str(out),
            "independent": str(out / "independent.json"), "n": len(rows), "counts": _counts(rows)}


# Spoken questions: the image questions' wordings read by Debian's flite and espeak-ng voices
# (phi3mm.tts: a voice, rate, pitch and noise drawn per clip). Voices heard in training are never
# among the held-out ones: a male and a female voice of each engine, and an accent, are kept out.
HELD_OUT_VOICES = ("flite:slt", "flite:rms", "espeak-ng:en-gb-scotland", "espeak-ng:en-us+f3")


def training_voices() -> list[str]:
    from phi3mm.tts import DEFAULT_VOICES

    every = [f"{engine}:{voice}" for engine, voices in DEFAULT_VOICES.items() for voice in voices]
    return [voice for voice in every if voice not in HELD_OUT_VOICES]


def speak_wordings(out: Path, name: str, voices: list[str], takes: int, seed: int) -> list[dict]:
    """Every image question's wordings spoken `takes` times each by `voices`, into out/spoken_<name>:
    [{"audio" (relative to out), "transcript", "voice", "question_type"}]."""
    from phi3mm.data import read_rows
    from phi3mm.tts import speak_rows

    source = [{"id": f"{qtype}_{i}_{take}", "question_type": qtype,
               "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "."}]}
              for qtype in IMAGE_TYPES for i, text in enumerate(QUESTIONS[qtype][0]) for take in range(takes)]  # fmt: skip
    folder = f"spoken_{name}"
    summary = speak_rows(source, out / folder, voices=voices, seed=seed, workers=2, log=lambda _: None)
    clips = []
    for row in read_rows(summary["rows_path"]):
        voice = row["voices"][0]
        clips.append({"audio": f"{folder}/audio/{row['audio'][0]}", "transcript": row["transcripts"][0],
                      "voice": f"{voice['engine']}:{voice['voice']}", "question_type": row["question_type"]})  # fmt: skip
    return clips


def spoken_rows(out: Path, name: str, n: int, clips: list[dict], rng: Rng, image_size: int = 64) -> list[dict]:
    """`n` rows, each a new image with a spoken question about it: `<image>` and `<audio>` in the
    user turn, the clip's transcript under `transcripts`, answers cycling through every class."""
    (out / f"{name}_images").mkdir(parents=True, exist_ok=True)
    by_type = {qtype: [clip for clip in clips if clip["question_type"] == qtype] for qtype in IMAGE_TYPES}
    rows = []
    for i in range(n):
        qtype, j = IMAGE_TYPES[i % len(IMAGE_TYPES)], i // len(IMAGE_TYPES)
        classes = QUESTIONS[qtype][1]
        attrs = {"color": str(rng.choice(list(COLORS))), "shape": str(rng.choice(SHAPES)),
                 "position": str(rng.choice(SIDES)), qtype: classes[j % len(classes)]}  # fmt: skip
        image = f"{name}_images/{name}_{i:05d}.png"
        draw_image(rng, image_size, attrs["shape"], attrs["color"], attrs["position"]).save(out / image)
        clip = by_type[qtype][int(rng.integers(len(by_type[qtype])))]
        rows.append({"id": f"{name}_{i:05d}", "image": image, "audio": clip["audio"], "transcripts": [clip["transcript"]],
                     "voice": clip["voice"], "question_type": qtype,
                     "conversations": [{"from": "human", "value": "<image>\n<audio>"},
                                       {"from": "gpt", "value": f"{attrs[qtype]}."}]})  # fmt: skip
    return rows


def typed(rows: list[dict]) -> list[dict]:
    """The same rows with each question typed: its transcript in place of the clip."""
    return [{**{k: v for k, v in row.items() if k not in ("audio", "transcripts")},
             "conversations": [{"from": "human", "value": f"<image>\n{row['transcripts'][0]}"}, *row["conversations"][1:]]}
            for row in rows]  # fmt: skip


def make_spoken_questions(out_dir: str | Path, n_train: int = 900, n_eval: int = 180, takes: int = 40,
                          eval_takes: int = 12, seed: int = 0, image_size: int = 64) -> dict:  # fmt: skip
    """Spoken questions about new images, in training voices and in held-out ones; writes
    asr.json (bare clips and transcripts, training voices: the distillation data),
    spoken_train.json (image + spoken question rows, training voices: the supervised data),
    spoken_eval.json (held-out voices) and typed_eval.json (the same rows, typed)."""
    out = Path(out_dir)
    train_clips = speak_wordings(out, "train", training_voices(), takes, seed)
    eval_clips = speak_wordings(out, "eval", list(HELD_OUT_VOICES), eval_takes, seed + 1)
    paths = {}
    asr = [{"id": f"asr_{i:05d}", "audio": clip["audio"], "text": clip["transcript"], "voice": clip["voice"]}
           for i, clip in enumerate(train_clips)]  # fmt: skip
    train = spoken_rows(out, "spoken_train", n_train, train_clips, np.random.default_rng([seed, 11]), image_size)
    evals = spoken_rows(out, "spoken_eval", n_eval, eval_clips, np.random.default_rng([seed, 12]), image_size)
    for name, rows in (("asr", asr), ("spoken_train", train), ("spoken_eval", evals), ("typed_eval", typed(evals))):
        paths[name] = str(out / f"{name}.json")
        Path(paths[name]).write_text(json.dumps(rows, indent=1))
    voices = lambda clips: sorted({clip["voice"] for clip in clips})  # noqa: E731
    return {**paths, "train_voices": voices(train_clips), "eval_voices": voices(eval_clips),
            "train_clips": len(train_clips), "eval_clips": len(eval_clips)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--n_train", type=int, default=1200)
    p.add_argument("--n_eval", type=int, default=300)
    p.add_argument("--n_independent", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=64)
    a = p.parse_args(argv)
    info = make_demo_dataset(a.out_dir, a.n_train, a.n_eval, a.seed, a.image_size)
    info["independent"] = make_independent_eval(a.out_dir, a.n_independent, a.seed + 1, a.image_size)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
