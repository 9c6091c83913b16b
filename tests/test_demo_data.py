"""Checks that every demo answer is actually true of its picture or sound, judged by simple signal analysis."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from phi3mm import demo_scenes as scenes
from phi3mm.demo_data import QUESTIONS, _write_split, main, make_demo_dataset, make_independent_eval


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo_dataset(out, n_train=200, n_eval=100, seed=3), make_independent_eval(out, n=100, seed=5)


def load(out: Path, name: str) -> list[dict]:
    return json.loads((out / f"{name}.json").read_text())


def check_picture(path: Path, scene: dict, independent: bool) -> int:
    """The picture shows the scene: each shape's colour inside it (its shade in the independent
    set), the background's outside every shape; shapes apart and inside the canvas."""
    a = np.asarray(Image.open(path), dtype=float)
    size = a.shape[0]
    assert Image.open(path).mode == "RGB" and a.shape == (size, size, 3)
    palette = scenes.IND_COLORS if independent else scenes.COLORS
    tolerance = 20 if independent else 0
    for s in scene["shapes"]:
        assert 8 * size / 64 - 0.5 <= s["d"] <= 48 * size / 64 + 0.5
        assert 0 < s["x0"] and s["x0"] + s["d"] < size and 0 < s["y0"] and s["y0"] + s["d"] < size
        inside = (int(s["y0"] + 0.7 * s["d"]), int(s["x0"] + 0.5 * s["d"]))  # inside a circle, square and triangle
        assert np.abs(a[inside] - palette[s["color"]]).max() <= tolerance, (path, s)
    covered = np.zeros((size, size), bool)
    for s in scene["shapes"]:
        covered[int(s["y0"]) - 1 : int(s["y0"] + s["d"]) + 2, int(s["x0"]) - 1 : int(s["x0"] + s["d"]) + 2] = True
    background = a[~covered]
    assert np.abs(background - scene["background"]).max() <= (12 if independent else 0)
    kinds, colours = [s["shape"] for s in scene["shapes"]], [s["color"] for s in scene["shapes"]]
    assert len(set(kinds)) == len(kinds) and len(set(colours)) == len(colours)
    return size


def analyse_audio(path: Path, qtype: str) -> str:
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    x, sr = sf.read(str(path))
    assert 0.5 <= len(x) / sr <= 3.0
    assert 0.015 <= np.abs(x).max() <= 0.95  # levels drawn from -34 to -1 dBFS
    spec = np.abs(np.fft.rfft(x))
    f = np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()]
    if qtype == "pitch":  # 5 Hz slack covers the FFT bin width (< 2 Hz for clips >= 0.5 s)
        return "low" if 195 <= f <= 405 else "high" if 1495 <= f <= 3005 else f"{f=}"
    assert 395 <= f <= 2005
    frames = x[: len(x) // 80 * 80].reshape(-1, 80)  # 5 ms energy envelope
    rms = np.sqrt((frames ** 2).mean(1))
    on = (rms > 0.3 * rms.max()).astype(int)
    starts = np.flatnonzero(np.diff(on) == 1) + 1
    n = int(on[0] + len(starts))
    rises = ([0] if on[0] else []) + list(starts)
    assert rises[0] * 0.005 <= 0.51  # the first beep starts in the first half second
    return {1: "one", 2: "two", 3: "three"}.get(n, str(n))


def check_rows(out: Path, rows: list[dict]) -> None:
    for row in rows:
        conv = row["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        tag = "<image>" if "image" in row else "<audio>"
        assert conv[0]["value"].count(tag) == 1 and all(tag not in t["value"] for t in conv[1:])
        if tag == "<image>":
            size = check_picture(out / row["image"], row["scene"], row["image"].startswith("independent"))
        for q, a in zip(conv[::2], conv[1::2]):
            assert a["value"].endswith(".") and " " not in a["value"]
            question = q["value"].replace(tag, "").strip()
            if tag == "<image>":
                got = scenes.true_answer(row["scene"], question, size)
            else:
                qtype = next(k for k, (texts, _) in QUESTIONS.items() if question in texts)
                assert row["question_type"] == qtype
                got = analyse_audio(out / row["audio"], qtype)
            assert a["value"] == f"{got}.", (row["id"], question, a["value"], got)


@pytest.mark.parametrize("split", ["train", "eval", "independent"])
def test_answers_match_media(data: tuple[Path, dict, dict], split: str) -> None:
    out = data[0]
    check_rows(out, load(out, split))


@pytest.mark.parametrize("split", ["train", "eval", "independent"])
def test_every_class_and_layout_appears(data: tuple[Path, dict, dict], split: str) -> None:
    rows = load(data[0], split)
    answers = {(r["question_type"], r["conversations"][1]["value"]) for r in rows}
    for qtype, classes in {**{k: v for k, (_, v) in QUESTIONS.items()}, **scenes.ANSWERS}.items():
        assert {(qtype, f"{c}.") for c in classes} <= answers
    # 1, 2 and 3 shapes, on white and on tints, and every wording of the counting question
    assert {len(r["scene"]["shapes"]) for r in rows if "scene" in r} == {1, 2, 3}
    assert len({tuple(r["scene"]["background"]) for r in rows if "scene" in r}) > 10
    firsts = {r["conversations"][0]["value"].replace("<image>", "").strip() for r in rows if r["question_type"] == "count"}
    assert firsts == set(scenes.WORDINGS["count"]["any"])
    firsts = [r["conversations"][0]["value"] for r in rows]
    assert any(v.startswith("<") for v in firsts) and any(v.endswith(">") for v in firsts)
    assert any(v.endswith("<audio>") for v in firsts) and any(v.endswith("<image>") for v in firsts)
    assert (split == "train") == any(r["question_type"] == "multi" for r in rows)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_the_family_sets_the_share_of_questions_asked_before_their_media(tmp_path: Path, share: float) -> None:
    family = dataclasses.replace(scenes.FAMILIES["wide"], question_first=share)
    rows = _write_split(tmp_path, "t", 200, np.random.default_rng(0), "img", "aud", 64, False, family=family)
    first = [r["conversations"][0]["value"].endswith(("<image>", "<audio>")) for r in rows]
    assert abs(np.mean(first) - share) <= 0.1


def test_splits_share_no_files(data: tuple[Path, dict, dict]) -> None:
    out, info, ind = data
    media = {s: {r.get("image") or r["audio"] for r in load(out, s)} for s in ("train", "eval", "independent")}
    assert not media["train"] & media["eval"] and not (media["train"] | media["eval"]) & media["independent"]
    for s, paths in media.items():
        assert all((out / p).is_file() for p in paths)
    assert {p.split("/")[0] for p in media["independent"]} == {"independent_images", "independent_audio"}
    assert (info["n_train"], info["n_eval"], ind["n"]) == (200, 100, 100)
    assert sum(info["train_counts"].values()) == 200 and set(ind["counts"]) == set(QUESTIONS) | set(scenes.TYPES)


def test_deterministic_and_image_size(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_demo_dataset(a, n_train=30, n_eval=10, seed=7, image_size=96)
    make_demo_dataset(b, n_train=30, n_eval=10, seed=7, image_size=96)
    assert (a / "train.json").read_text() == (b / "train.json").read_text()
    assert (a / "images/train_00000.png").read_bytes() == (b / "images/train_00000.png").read_bytes()
    assert Image.open(a / "images/train_00000.png").size == (96, 96)
    check_rows(a, load(a, "train"))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path), "--n_train", "20", "--n_eval", "10", "--n_independent", "10", "--seed", "1"])
    info = json.loads(capsys.readouterr().out)
    assert info["n_train"] == 20 and info["independent"]["n"] == 10
    assert all((tmp_path / f).is_file() for f in ("train.json", "eval.json", "independent.json"))


def test_training_beeps_vary_their_edges_and_timbre() -> None:
    """Training beeps come with hard and with soft edges and with harmonics up to the 6th, so a model
    counts beeps rather than the clicks of their edges (the independent set's buzzers fade in)."""
    from phi3mm.demo_data import SR, synth_beeps

    rng = np.random.default_rng(0)
    rise_ms, sixth = [], 0
    for _ in range(60):
        x = synth_beeps(rng, 1)
        on = np.flatnonzero(np.abs(x) > 0.05 * np.abs(x).max())
        beep = x[on[0] : on[-1] + 1]
        head = np.abs(beep[: int(0.04 * SR)])
        peaks = np.maximum.accumulate(head) / np.abs(beep).max()
        rise_ms.append(1000 * np.argmax(peaks >= 0.9) / SR)  # from the first sound to 90% of the peak
        spec = np.abs(np.fft.rfft(beep, 16 * beep.size))
        freqs = np.fft.rfftfreq(16 * beep.size, 1 / SR)
        f0 = freqs[spec.argmax()]
        near6 = spec[(freqs > 5.9 * f0) & (freqs < 6.1 * f0)]
        sixth += bool(near6.size and near6.max() > 0.1 * spec.max())
    hard = sum(r < 1.5 for r in rise_ms)
    assert 15 <= hard <= 45 and max(rise_ms) > 10  # about half hard-edged, the others ramping up
    assert sixth >= 5  # some timbres carry a strong 6th harmonic


def test_shared_clip_pool(tmp_path: Path) -> None:
    """`clips_per_type`: the sound rows of a type reuse that many clips (what the audio cache holds),
    every answer still among them and every clip's answer true of it."""
    info = make_demo_dataset(tmp_path, n_train=300, n_eval=10, seed=2, clips_per_type=9)
    rows = load(tmp_path, "train")
    for qtype in ("pitch", "beeps"):
        typed = [r for r in rows if r["question_type"] == qtype]
        clips = {r["audio"] for r in typed}
        assert len(typed) in (35, 36) and len(clips) == 9 - 9 % len(QUESTIONS[qtype][1])  # 285 single-question rows, 8 types
        assert {r["conversations"][1]["value"] for r in typed} == {f"{c}." for c in QUESTIONS[qtype][1]}
    check_rows(tmp_path, [r for r in rows if "audio" in r])
    assert len(list((tmp_path / "audio").glob("train_*.wav"))) == 8 + 9


def test_spoken_questions_split_voices_and_mirror_typed_rows(tmp_path: Path) -> None:
    """Spoken questions: held-out voices never in training, each clip saying one of its type's
    one-shape wordings, answers true of the picture, and the typed rows the same questions."""
    from phi3mm.demo_data import HELD_OUT_VOICES, SPOKEN_TYPES, make_spoken_questions

    info = make_spoken_questions(tmp_path, n_train=12, n_eval=9, takes=1, eval_takes=1, seed=4)
    assert set(info["eval_voices"]) <= set(HELD_OUT_VOICES) and not set(info["eval_voices"]) & set(info["train_voices"])
    spoken, typed_rows = load(tmp_path, "spoken_eval"), load(tmp_path, "typed_eval")
    assert len(spoken) == len(typed_rows) == 9 and {r["question_type"] for r in spoken} == set(SPOKEN_TYPES)
    for row in spoken + load(tmp_path, "spoken_train"):
        assert row["transcripts"][0] in scenes.WORDINGS[row["question_type"]]["alone"]
        assert row["conversations"][0]["value"] == "<audio>\n<image>" and len(row["scene"]["shapes"]) == 1
        check_picture(tmp_path / row["image"], row["scene"], independent=False)
        answer = scenes.true_answer(row["scene"], row["transcripts"][0])
        assert row["conversations"][1]["value"] == f"{answer}."
        assert sf.info(str(tmp_path / row["audio"])).duration > 0.5
    for row, typed_row in zip(spoken, typed_rows):
        assert "audio" not in typed_row and typed_row["conversations"][0]["value"] == f"{row['transcripts'][0]}\n<image>"
    asr = load(tmp_path, "asr")
    assert len(asr) == info["train_clips"] == 9 and all(r["voice"] in info["train_voices"] for r in asr)
