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
QUESTIONS = {
    "color": ("What color is the shape?", tuple(COLORS)),
    "shape": ("What shape is this?", SHAPES),
    "position": ("Is the shape on the left or the right?", SIDES),
    "pitch": ("Is the tone high or low?", ("high", "low")),
    "beeps": ("How many beeps are there?", ("one", "two", "three")),
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


def synth_tone(rng: Rng, pitch: str, independent: bool = False) -> np.ndarray:
    f = rng.uniform(*PITCH_BANDS[pitch])
    t = np.arange(int(rng.uniform(0.5, 1.5) * SR)) / SR
    if not independent:
        return rng.uniform(0.3, 0.8) * np.sin(2 * np.pi * f * t)
    # A weak 2nd harmonic changes the timbre without moving the fundamental out of its band.
    x = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) + 0.15 * np.sin(4 * np.pi * f * t)
    return rng.uniform(0.25, 0.6) * _fade(x, int(0.02 * SR)) + rng.normal(0, 0.003, t.size)


def synth_beeps(rng: Rng, n: int, independent: bool = False) -> np.ndarray:
    f = rng.uniform(900, 1100) if independent else 1000.0
    amp = rng.uniform(0.25, 0.6) if independent else rng.uniform(0.3, 0.8)
    parts = [np.zeros(int(rng.uniform(0.02, 0.15) * SR))]
    for i in range(n):
        beep = amp * np.sin(2 * np.pi * f * np.arange(int(rng.uniform(0.08, 0.15) * SR)) / SR)
        parts.append(_fade(beep, int(0.008 * SR)) if independent else beep)
        if i < n - 1:
            parts.append(np.zeros(int(rng.uniform(0.12, 0.25) * SR)))
    x = np.concatenate(parts)
    total = int(rng.uniform(max(0.6, x.size / SR + 0.05), 1.6) * SR)
    x = np.pad(x, (0, max(0, total - x.size)))
    return x + rng.normal(0, 0.003, x.size) if independent else x


def _fade(x: np.ndarray, n: int) -> np.ndarray:
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))
    x = x.copy()
    x[:n] *= ramp
    x[-n:] *= ramp[::-1]
    return x


def _turn(question: str, tag: str, after: bool) -> str:
    return f"{question}\n{tag}" if after else f"{tag}\n{question}"


def _write_split(out: Path, name: str, n: int, rng: Rng, img_dir: str, aud_dir: str, image_size: int,
                 draw: Callable[..., Image.Image], independent: bool, multi_every: int = 0) -> list[dict]:
    (out / img_dir).mkdir(parents=True, exist_ok=True)
    (out / aud_dir).mkdir(parents=True, exist_ok=True)
    types = IMAGE_TYPES + AUDIO_TYPES
    seen = {q: 0 for q in types}  # per-type counter: answers cycle so every class appears
    rows, k = [], 0
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
            wav = synth_tone(rng, answer, independent) if qtype == "pitch" else \
                synth_beeps(rng, COUNTS[answer], independent)
            sf.write(out / aud_dir / f"{rid}.wav", wav.astype(np.float32), SR, subtype="PCM_16")
            conv = [{"from": "human", "value": _turn(QUESTIONS[qtype][0], "<audio>", after)},
                    {"from": "gpt", "value": f"{answer}."}]
            rows.append({"id": rid, "audio": f"{aud_dir}/{rid}.wav", "conversations": conv, "question_type": qtype})
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
            text = QUESTIONS[q][0] if j else _turn(QUESTIONS[q][0], "<image>", after)
            conv += [{"from": "human", "value": text}, {"from": "gpt", "value": f"{attrs[q]}."}]
        rows.append({"id": rid, "image": f"{img_dir}/{rid}.png", "conversations": conv, "question_type": qtype})
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return rows


def _counts(rows: list[dict]) -> dict[str, int]:
    return {q: sum(r["question_type"] == q for r in rows) for q in sorted({r["question_type"] for r in rows})}


def make_demo_dataset(out_dir: str | Path, n_train: int = 1200, n_eval: int = 300, seed: int = 0,
                      image_size: int = 64) -> dict:
    """Write train.json (with ~5% multi-turn rows) and eval.json; image_folder = audio_folder = out_dir."""
    out = Path(out_dir)
    # Separate seed streams keep eval independent of how many train rows were drawn.
    train = _write_split(out, "train", n_train, np.random.default_rng([seed, 0]), "images", "audio",
                         image_size, draw_image, False, multi_every=20)
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
