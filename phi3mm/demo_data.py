"""python -m phi3mm.demo_data OUT_DIR [--n_train 1200] [--n_eval 300] [--seed 0] [--pictures wide|simple]

Offline demo data set: pictures of 1-3 coloured shapes (phi3mm.demo_scenes), synthetic tones and
beeps, and spoken questions (phi3mm.tts), written to disk in LLaVA format so a demo training run
goes through exactly the same loading code as a real one.

Layout (every media path in every json is relative to OUT_DIR, so image_folder = audio_folder = OUT_DIR):
    OUT_DIR/images/*.png  OUT_DIR/audio/*.wav  OUT_DIR/train.json  OUT_DIR/eval.json
    OUT_DIR/independent_images/*.png  OUT_DIR/independent_audio/*.wav  OUT_DIR/independent.json
    OUT_DIR/spoken_{train,eval}/audio/*.wav  OUT_DIR/spoken_{train,eval}_images/*.png
    OUT_DIR/{asr,spoken_train,spoken_eval,typed_eval}.json   (make_spoken_questions)

Row: {"id": "train_00000", "image": "images/train_00000.png", "question_type": "color",
      "scene": {"background": [255, 255, 255], "shapes": [{"shape": "circle", "color": "red", ...}]},
      "conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"},
                        {"from": "gpt", "value": "red."}]}
Sound rows carry "audio" and "<audio>" instead. Question types: color, shape, position, count,
exists, negation (pictures), pitch, beeps (sounds), and "multi" (2-3 turns about one picture,
training split only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf

from configuration_phi3_projector import SAMPLING_RATE
from phi3mm import demo_scenes as scenes
from phi3mm.demo_scenes import draw_scene, draw_scene_independent

SR = SAMPLING_RATE  # the model's input rate: clips need no resampling
# The sound questions, each in a few wordings; the pictures' questions are phi3mm.demo_scenes'.
QUESTIONS = {
    "pitch": (("Is the tone high or low?", "Is this a high or a low tone?"), ("high", "low")),
    "beeps": (("How many beeps are there?", "How many beeps do you hear?"), ("one", "two", "three")),
}
AUDIO_TYPES = tuple(QUESTIONS)
SPOKEN_TYPES = ("color", "shape", "position")  # asked of one-shape pictures, in their "alone" wordings
PITCH_BANDS = {"low": (200.0, 400.0), "high": (1500.0, 3000.0)}
COUNTS = {"one": 1, "two": 2, "three": 3}
Rng = np.random.Generator


# The sounds leave nothing but the sound to answer by: any level (Whisper's log-mel is normalised
# to each clip's loudest frame), beeps starting anywhere in the first 0.5 s, 0.05-0.25 s long with
# 0.1-0.4 s gaps, clips of 0.5-3 s whatever the answer.
LEVEL_DB = (-34.0, -1.0)  # peak level, dBFS: 0.02 to 0.9
MAX_CLIP_SECONDS = 3.0
BEEP_SECONDS, GAP_SECONDS, BEEP_START_SECONDS = (0.05, 0.25), (0.1, 0.4), 0.5


def _level(rng: Rng) -> float:
    return float(10 ** (rng.uniform(*LEVEL_DB) / 20))


def _harmonics(rng: Rng, top: int = 4, weight: float = 0.3) -> list[tuple[int, float, float]]:
    """A timbre: (multiple, weight, phase) of the fundamental and, half the time, random 2nd to
    `top`th harmonics of up to `weight`; the answer is always the fundamental's."""
    if rng.random() >= 0.5:
        return [(1, 1.0, 0.0)]
    return [(1, 1.0, 0.0), *((k, rng.uniform(0, weight), rng.uniform(0, 2 * np.pi)) for k in range(2, top + 1))]


def _envelope(t: np.ndarray, attack: float, release: float) -> np.ndarray:
    """A linear attack and an exponential release (seconds; 0 for a hard edge)."""
    rise = np.minimum(1.0, t / attack) if attack else np.ones_like(t)
    fall = 1.0 - np.exp(-(t[-1] - t) / release * 5) if release else np.ones_like(t)
    return rise * fall


def _wave(harmonics: list[tuple[int, float, float]], phase: np.ndarray) -> np.ndarray:
    wave = sum(weight * np.sin(k * phase + offset) for k, weight, offset in harmonics)
    return wave / np.abs(wave).max()  # peak 1: the level drawn is the clip's peak


def synth_tone(rng: Rng, pitch: str, independent: bool = False) -> np.ndarray:
    f = rng.uniform(*PITCH_BANDS[pitch])
    seconds = rng.uniform(0.5, MAX_CLIP_SECONDS)
    if not independent:
        lead = int(rng.uniform(0, min(0.5, seconds - 0.4)) * SR)  # the tone may start late
        t = np.arange(int(seconds * SR) - lead) / SR
        return _maybe_noise(rng, np.concatenate([np.zeros(lead), _level(rng) * _wave(_harmonics(rng), 2 * np.pi * f * t)]))
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
    timing and level drawn as described above.

    Training beeps have hard edges half the time and otherwise a linear attack of 2-30 ms and an
    exponential release of 2-60 ms, with up to the 6th harmonic: with hard edges and harmonics up to
    the 4th alone, the default demo counted the independent set's beeps 66.7% right (hard-edged
    buzzers 94.4%, faded sines 92.2%, both together 71.1%, answered "triangle." among others); with
    these, 85.0% (README)."""
    f = rng.uniform(500, 900) if independent else rng.uniform(400, 2000)
    amp = _level(rng)
    parts = [np.zeros(int(rng.uniform(0, BEEP_START_SECONDS) * SR))]
    if independent:
        _harmonics(rng)  # drawn and not used: the independent set's clips stay the ones measured before
    else:  # one timbre and one envelope for every beep of a clip
        timbre = _harmonics(rng, top=6, weight=0.6)
        attack, release = (0.0, 0.0) if rng.random() < 0.5 else (rng.uniform(0.002, 0.03), rng.uniform(0.002, 0.06))
    for i in range(n):
        t = np.arange(int(rng.uniform(*BEEP_SECONDS) * SR)) / SR
        if independent:
            wave = sum(np.sin(2 * np.pi * k * f * t) / k for k in (1, 3, 5)) / 1.2
            parts.append(amp * _fade(wave, int(0.01 * SR)))
        else:
            wave = _wave(timbre, 2 * np.pi * f * t) * _envelope(t, attack, release)
            parts.append(amp * wave / np.abs(wave).max())
        if i < n - 1:
            parts.append(np.zeros(int(rng.uniform(*GAP_SECONDS) * SR)))
    x = np.concatenate(parts)
    total = int(rng.uniform(max(0.5, x.size / SR + 0.05), MAX_CLIP_SECONDS) * SR)
    x = np.pad(x, (0, max(0, total - x.size)))
    return x + rng.normal(0, 0.01 * amp, x.size) if independent else _maybe_noise(rng, x)


def _maybe_noise(rng: Rng, x: np.ndarray) -> np.ndarray:
    """Half the training clips get white noise 20-50 dB under their peak: without any, the silence
    between beeps is digital zero, and an independent set with a noise floor lost 50 points."""
    if rng.random() < 0.5:
        return x
    peak = np.abs(x).max()
    noisy = x + rng.normal(0, peak * 10 ** (-rng.uniform(20, 50) / 20), x.size)
    return noisy * peak / np.abs(noisy).max()  # the level drawn stays the clip's peak


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


def _ask_any(rng: Rng, scene: dict, qtype: str, size: int, family: scenes.Family) -> tuple[str, str] | None:
    """(question, answer) of `qtype` about `scene`, the answer whichever the scene allows."""
    for answer in rng.permutation(family.answers(qtype)):
        question = scenes.ask(rng, scene, qtype, str(answer), size, family)
        if question is not None:
            return question, str(answer)
    return None


def _write_split(out: Path, name: str, n: int, rng: Rng, img_dir: str, aud_dir: str, image_size: int,
                 independent: bool, multi_every: int = 0, clips_per_type: int = 0,
                 family: scenes.Family = scenes.FAMILIES["wide"]) -> list[dict]:  # fmt: skip
    """Rows cycling through every question type and every answer of each; pictures drawn by
    `demo_scenes.draw_scene`, or its independent renderer and sub-pixel scenes when `independent`.
    `clips_per_type` > 0: the sound rows of each type share that many clips (each heard with
    other wordings and placements), so a frozen audio encoder's cache holds few; 0: one clip a row."""
    (out / img_dir).mkdir(parents=True, exist_ok=True)
    (out / aud_dir).mkdir(parents=True, exist_ok=True)
    types = family.types + AUDIO_TYPES
    seen = {q: 0 for q in types}  # per-type counter: answers cycle so every class appears
    rows, k, written = [], 0, set()
    for i in range(n):
        rid = f"{name}_{i:05d}"
        after = bool(rng.random() < family.question_first)
        if multi_every and i % multi_every == multi_every - 1:
            qtype = "multi"
        else:
            qtype, k = types[k % len(types)], k + 1
            classes = QUESTIONS[qtype][1] if qtype in AUDIO_TYPES else family.answers(qtype)
            answer = classes[seen[qtype] % len(classes)]
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
        if qtype == "multi":  # one picture, 2-3 questions of different types
            scene, conv = scenes.sample_scene(rng, image_size, continuous=independent, family=family), []
            for q in rng.permutation(family.types):
                asked = _ask_any(rng, scene, str(q), image_size, family)
                if asked and len(conv) < 6:
                    question, reply = asked
                    text = _turn(question, "<image>", after) if not conv else question
                    conv += [{"from": "human", "value": text}, {"from": "gpt", "value": f"{reply}."}]
        else:
            scene, question = scenes.scene_and_question(rng, qtype, answer, image_size, continuous=independent, family=family)
            conv = [{"from": "human", "value": _turn(question, "<image>", after)}, {"from": "gpt", "value": f"{answer}."}]
        image = draw_scene_independent(scene, rng, image_size) if independent else draw_scene(scene, image_size)
        image.save(out / img_dir / f"{rid}.png")
        rows.append({"id": rid, "image": f"{img_dir}/{rid}.png", "conversations": conv, "question_type": qtype,
                     "scene": scene})  # fmt: skip
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return rows


def _counts(rows: list[dict]) -> dict[str, int]:
    return {q: sum(r["question_type"] == q for r in rows) for q in sorted({r["question_type"] for r in rows})}


def make_demo_dataset(out_dir: str | Path, n_train: int = 1200, n_eval: int = 300, seed: int = 0,
                      image_size: int = 64, clips_per_type: int = 0, pictures: str = "wide") -> dict:
    """Write train.json (with ~5% multi-turn rows) and eval.json; image_folder = audio_folder = out_dir.
    `clips_per_type`: distinct training clips per sound type (0: one per row); `pictures`: the
    family of pictures and questions (`demo_scenes.FAMILIES`)."""
    out, family = Path(out_dir), scenes.FAMILIES[pictures]
    # Separate seed streams keep eval independent of how many train rows were drawn.
    train = _write_split(out, "train", n_train, np.random.default_rng([seed, 0]), "images", "audio",
                         image_size, False, multi_every=20, clips_per_type=clips_per_type, family=family)
    evals = _write_split(out, "eval", n_eval, np.random.default_rng([seed, 1]), "images", "audio",
                         image_size, False, family=family)
    return {"out_dir": str(out), "image_folder": str(out), "audio_folder": str(out),
            "train": str(out / "train.json"), "eval": str(out / "eval.json"), "n_train": len(train),
            "n_eval": len(evals), "train_counts": _counts(train), "eval_counts": _counts(evals)}


def make_independent_eval(out_dir: str | Path, n: int = 300, seed: int = 1, image_size: int = 64,
                          pictures: str = "wide") -> dict:  # fmt: skip
    """Media drawn/synthesised by a different method; writes independent.json (paths relative to out_dir)."""
    out = Path(out_dir)
    rows = _write_split(out, "independent", n, np.random.default_rng([seed, 7919]), "independent_images",
                        "independent_audio", image_size, True, family=scenes.FAMILIES[pictures])
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


def speak_wordings(out: Path, name: str, voices: list[str], takes: int, seed: int,
                   family: scenes.Family = scenes.FAMILIES["wide"]) -> list[dict]:  # fmt: skip
    """The one-shape questions' wordings spoken `takes` times each by `voices`, into out/spoken_<name>:
    [{"audio" (relative to out), "transcript", "voice", "question_type"}]."""
    from phi3mm.data import read_rows
    from phi3mm.tts import speak_rows

    source = [{"id": f"{qtype}_{i}_{take}", "question_type": qtype,
               "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "."}]}
              for qtype in SPOKEN_TYPES for i, text in enumerate(family.wording(qtype, "alone"))
              for take in range(takes)]  # fmt: skip
    folder = f"spoken_{name}"
    summary = speak_rows(source, out / folder, voices=voices, seed=seed, workers=2, log=lambda _: None)
    clips = []
    for row in read_rows(summary["rows_path"]):
        voice = row["voices"][0]
        clips.append({"audio": f"{folder}/audio/{row['audio'][0]}", "transcript": row["transcripts"][0],
                      "voice": f"{voice['engine']}:{voice['voice']}", "question_type": row["question_type"]})  # fmt: skip
    return clips


def spoken_rows(out: Path, name: str, n: int, clips: list[dict], rng: Rng, image_size: int = 64,
                family: scenes.Family = scenes.FAMILIES["wide"]) -> list[dict]:  # fmt: skip
    """`n` rows, each a new image with a spoken question about it: `<audio>` and then `<image>` in
    the user turn, the clip's transcript under `transcripts`, answers cycling through every class.

    The question comes first so that the picture sits just before the answer, at one distance from
    it whatever the question's length. The tiny demo LM reads left and right off that distance
    (RoPE's relative positions): measured on a stage-2 model taught three wordings, typed side
    questions fell from 96.7% to 26.7% when the question's positions were shifted by 3, and a
    spoken question is as long as its clip (10 tokens a second), not as its words. With the clip
    after the picture, spoken side questions stayed at 53-67%; with it before, 100% (README)."""
    (out / f"{name}_images").mkdir(parents=True, exist_ok=True)
    by_type = {qtype: [clip for clip in clips if clip["question_type"] == qtype] for qtype in SPOKEN_TYPES}
    rows = []
    for i in range(n):
        qtype, j = SPOKEN_TYPES[i % len(SPOKEN_TYPES)], i // len(SPOKEN_TYPES)
        classes = family.answers(qtype)
        answer = classes[j % len(classes)]
        scene, _ = scenes.scene_and_question(rng, qtype, answer, image_size, n=1, family=family)  # spoken: asked the same
        image = f"{name}_images/{name}_{i:05d}.png"
        draw_scene(scene, image_size).save(out / image)
        clip = by_type[qtype][int(rng.integers(len(by_type[qtype])))]
        rows.append({"id": f"{name}_{i:05d}", "image": image, "audio": clip["audio"], "transcripts": [clip["transcript"]],
                     "voice": clip["voice"], "question_type": qtype, "scene": scene,
                     "conversations": [{"from": "human", "value": "<audio>\n<image>"},
                                       {"from": "gpt", "value": f"{answer}."}]})  # fmt: skip
    return rows


def typed(rows: list[dict]) -> list[dict]:
    """The same rows with each question typed: its transcript in place of the clip."""
    return [{**{k: v for k, v in row.items() if k not in ("audio", "transcripts")},
             "conversations": [{"from": "human", "value": f"{row['transcripts'][0]}\n<image>"}, *row["conversations"][1:]]}
            for row in rows]  # fmt: skip


def make_spoken_questions(out_dir: str | Path, n_train: int = 900, n_eval: int = 180, takes: int = 40,
                          eval_takes: int = 12, seed: int = 0, image_size: int = 64, pictures: str = "wide") -> dict:  # fmt: skip
    """Spoken questions about new images, in training voices and in held-out ones; writes
    asr.json (bare clips and transcripts, training voices: the distillation data),
    spoken_train.json (image + spoken question rows, training voices: the supervised data),
    spoken_eval.json (held-out voices) and typed_eval.json (the same rows, typed)."""
    out = Path(out_dir)
    family = scenes.FAMILIES[pictures]
    train_clips = speak_wordings(out, "train", training_voices(), takes, seed, family)
    eval_clips = speak_wordings(out, "eval", list(HELD_OUT_VOICES), eval_takes, seed + 1, family)
    paths = {}
    asr = [{"id": f"asr_{i:05d}", "audio": clip["audio"], "text": clip["transcript"], "voice": clip["voice"]}
           for i, clip in enumerate(train_clips)]  # fmt: skip
    train = spoken_rows(out, "spoken_train", n_train, train_clips, np.random.default_rng([seed, 11]), image_size, family)
    evals = spoken_rows(out, "spoken_eval", n_eval, eval_clips, np.random.default_rng([seed, 12]), image_size, family)
    for name, rows in (("asr", asr), ("spoken_train", train), ("spoken_eval", evals), ("typed_eval", typed(evals))):
        paths[name] = str(out / f"{name}.json")
        Path(paths[name]).write_text(json.dumps(rows, indent=1))
    voices = lambda clips: sorted({clip["voice"] for clip in clips})
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
    p.add_argument("--pictures", default="wide", choices=sorted(scenes.FAMILIES), help="family of pictures and questions")
    a = p.parse_args(argv)
    info = make_demo_dataset(a.out_dir, a.n_train, a.n_eval, a.seed, a.image_size, pictures=a.pictures)
    info["independent"] = make_independent_eval(a.out_dir, a.n_independent, a.seed + 1, a.image_size, a.pictures)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
