"""Checks that every demo answer is actually true of its picture or sound, judged by simple signal analysis."""
from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from phi3mm.demo_data import QUESTIONS, main, make_demo_dataset, make_independent_eval


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo_dataset(out, n_train=200, n_eval=100, seed=3), make_independent_eval(out, n=100, seed=5)


def load(out: Path, name: str) -> list[dict]:
    return json.loads((out / f"{name}.json").read_text())


def analyse_image(path: Path) -> dict[str, str]:
    img = Image.open(path)
    assert img.mode == "RGB"
    a = np.asarray(img, dtype=float)
    bg = np.median(a.reshape(-1, 3), axis=0)  # the background covers most of the picture
    diff = np.abs(a - bg).max(-1)
    mask = diff > 0.5 * diff.max()  # drops anti-aliased edge pixels
    ys, xs = np.nonzero(mask)
    r, g, b = np.median(a[mask], axis=0) / 255
    hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
    color = "red" if hue < 20 or hue > 340 else "yellow" if 35 < hue < 70 else \
        "green" if 90 < hue < 160 else "blue" if 200 < hue < 260 else f"hue={hue:.0f}"
    # Fill ratio from coverage, not from a thresholded mask: a sub-pixel edge row of a square would
    # otherwise count in its bounding box but hardly in its area. A column's width is its largest
    # coverage, so partly covered edge columns count by the fraction covered.
    alpha = np.clip(diff / np.median(diff[mask]), 0, 1)
    alpha[alpha < 0.1] = 0  # background noise
    fill = alpha.sum() / (alpha.max(0).sum() * alpha.max(1).sum())
    shape = "square" if fill > 0.9 else "circle" if 0.68 < fill <= 0.9 else "triangle" if fill < 0.65 else f"{fill=}"
    half = a.shape[1] / 2
    side = "left" if xs.max() < half else "right" if xs.min() >= half else "straddles"
    assert (side == "left") == (xs.mean() < half)
    return {"color": color, "shape": shape, "position": side}


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
        for q, a in zip(conv[::2], conv[1::2]):
            assert a["value"].endswith(".") and " " not in a["value"]
            qtype = next(k for k, (texts, _) in QUESTIONS.items() if q["value"].replace(tag, "").strip() in texts)
            assert row["question_type"] in (qtype, "multi")
            got = analyse_image(out / row["image"])[qtype] if tag == "<image>" else \
                analyse_audio(out / row["audio"], qtype)
            assert a["value"] == f"{got}.", (row["id"], a["value"], got)


@pytest.mark.parametrize("split", ["train", "eval", "independent"])
def test_answers_match_media(data: tuple[Path, dict, dict], split: str) -> None:
    out = data[0]
    check_rows(out, load(out, split))


@pytest.mark.parametrize("split", ["train", "eval", "independent"])
def test_every_class_and_layout_appears(data: tuple[Path, dict, dict], split: str) -> None:
    rows = load(data[0], split)
    answers = {(r["question_type"], r["conversations"][1]["value"]) for r in rows}
    for qtype, (_, classes) in QUESTIONS.items():
        assert {(qtype, f"{c}.") for c in classes} <= answers
    firsts = [r["conversations"][0]["value"] for r in rows]
    assert any(v.startswith("<") for v in firsts) and any(v.endswith(">") for v in firsts)
    assert any(v.endswith("<audio>") for v in firsts) and any(v.endswith("<image>") for v in firsts)
    assert (split == "train") == any(r["question_type"] == "multi" for r in rows)


def test_splits_share_no_files(data: tuple[Path, dict, dict]) -> None:
    out, info, ind = data
    media = {s: {r.get("image") or r["audio"] for r in load(out, s)} for s in ("train", "eval", "independent")}
    assert not media["train"] & media["eval"] and not (media["train"] | media["eval"]) & media["independent"]
    for s, paths in media.items():
        assert all((out / p).is_file() for p in paths)
    assert {p.split("/")[0] for p in media["independent"]} == {"independent_images", "independent_audio"}
    assert (info["n_train"], info["n_eval"], ind["n"]) == (200, 100, 100)
    assert sum(info["train_counts"].values()) == 200 and set(ind["counts"]) == set(QUESTIONS)


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


def test_shared_clip_pool(tmp_path: Path) -> None:
    """`clips_per_type`: the sound rows of a type reuse that many clips (what the audio cache holds),
    every answer still among them and every clip's answer true of it."""
    info = make_demo_dataset(tmp_path, n_train=300, n_eval=10, seed=2, clips_per_type=9)
    rows = load(tmp_path, "train")
    for qtype in ("pitch", "beeps"):
        typed = [r for r in rows if r["question_type"] == qtype]
        clips = {r["audio"] for r in typed}
        assert len(typed) == 57 and len(clips) == 9 - 9 % len(QUESTIONS[qtype][1])  # 15 rows are multi-turn
        assert {r["conversations"][1]["value"] for r in typed} == {f"{c}." for c in QUESTIONS[qtype][1]}
    check_rows(tmp_path, [r for r in rows if "audio" in r])
    assert len(list((tmp_path / "audio").glob("train_*.wav"))) == 8 + 9
