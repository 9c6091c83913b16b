"""Property-based fuzzing (hypothesis) of the processor and the model's forward.

Images of any size from 1x1 up and every PIL mode, arrays of every dtype and shape, encoded files in
18 formats then truncated or corrupted, decompression bombs; audio of any length, dtype, channel
layout and sampling rate, NaN and inf, WAV/FLAC/OGG files corrupted, bytes that are not audio; text
with too many or too few placeholders, empty, or past the context. Each input either works or raises
a ValueError that names the problem; nothing else escapes and nothing hangs (a deadline per example).

The examples are derandomized, so CI runs the same inputs every time; the number tried per property
is written to outputs/reliability/fuzz.json (RELIABILITY.md quotes it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import time
import warnings
import zlib
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from processing_multimodal import MAX_ASPECT_RATIO, MAX_AUDIO_SECONDS, MAX_IMAGE_PIXELS, load_audio, load_image

ROOT = Path(__file__).resolve().parents[1]
# FUZZ_SCALE=10 FUZZ_RANDOM=1 pytest tests/test_fuzz.py: a longer campaign with fresh inputs, recorded in
# fuzz_campaign.json (CI runs the same derandomized inputs every time, in under a minute).
FUZZ_SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
FUZZ_RANDOM = bool(os.environ.get("FUZZ_RANDOM"))
RECORD = ROOT / "outputs" / "reliability" / ("fuzz.json" if FUZZ_SCALE == 1 and not FUZZ_RANDOM else "fuzz_campaign.json")
TRIED: Counter = Counter()  # inputs tried, per property
OUTCOMES: Counter = Counter()  # (property, "ok" | "ValueError")


def fuzz(max_examples: int):
    """Derandomized (the same inputs on every run), no example database, a deadline against hangs."""
    return settings(
        max_examples=max(1, int(max_examples * FUZZ_SCALE)),
        deadline=timedelta(seconds=10),  # generous: a 2-core CI box shared with other jobs
        derandomize=not FUZZ_RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


@pytest.fixture(scope="module", autouse=True)
def record_counts():
    yield
    if not TRIED:
        return
    summary = {
        "inputs_tried": dict(TRIED),
        "total": sum(TRIED.values()),
        "outcomes": {f"{name}: {outcome}": n for (name, outcome), n in sorted(OUTCOMES.items())},
    }
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(summary, indent=2))
    print(f"\nfuzz: {summary['total']} inputs tried: {dict(TRIED)}")


def works_or_names_the_problem(name: str, call, *keywords: str):
    """Run `call`; it must return, or raise a ValueError whose message contains one of `keywords`."""
    TRIED[name] += 1
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning, numpy's casts: noise here
        try:
            result = call()
        except ValueError as error:
            OUTCOMES[name, "ValueError"] += 1
            message = str(error)
            assert any(k in message for k in keywords), f"{name}: the message does not name the problem: {message!r}"
            return None
    OUTCOMES[name, "ok"] += 1
    assert time.monotonic() - start < 10
    return result


PROMPT_IMAGE = "<|user|>\n<image>\nWhat shape is this?<|end|>\n<|assistant|>\n"
PROMPT_AUDIO = "<|user|>\n<audio>\nIs the tone high or low?<|end|>\n<|assistant|>\n"
IMAGE_WORDS = ("image 0", "<image>")
AUDIO_WORDS = ("audio 0", "<audio>", "context")  # a long clip may be refused for the context it needs


def image_processed(processor, image) -> np.ndarray | None:
    out = works_or_names_the_problem(
        "image", lambda: processor(text=PROMPT_IMAGE, images=[image], return_tensors="np"), *IMAGE_WORDS
    )
    if out is not None:
        side = processor.image_processor.crop_size["height"]
        assert out["pixel_values"].shape == (1, 3, side, side) and np.isfinite(out["pixel_values"]).all()
    return out


# ---- images ---------------------------------------------------------------------------------------

PIL_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa", "La",
             "I;16", "I;16L", "I;16B", "I;16N"]  # fmt: skip
SIDES = st.one_of(st.integers(1, 48), st.sampled_from([1, 2, 3, 500, 2000]))


@fuzz(max_examples=250)
@given(mode=st.sampled_from(PIL_MODES), width=SIDES, height=SIDES, seed=st.integers(0, 2**32 - 1))
@example(mode="RGB", width=100_000, height=1, seed=0)  # extreme strips: bounded by crop_long_side
@example(mode="L", width=1, height=3_000_000, seed=0)
@example(mode="La", width=5, height=7, seed=0)  # Pillow cannot convert La to RGBA directly
@example(mode="F", width=4, height=4, seed=1)  # random bytes: NaN and inf floats
def test_pil_images_of_every_mode_and_size(tiny, mode, width, height, seed):
    blank = Image.new(mode, (width, height))
    noise = np.random.default_rng(seed).bytes(len(blank.tobytes()))
    image_processed(tiny[1], Image.frombytes(mode, (width, height), noise))


DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
          np.float16, np.float32, np.float64, np.longdouble, np.complex64, object]  # fmt: skip


@fuzz(max_examples=200)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 24), min_size=0, max_size=4).map(tuple),
    seed=st.integers(0, 2**32 - 1),
    specials=st.booleans(),
)
def test_array_images_of_every_dtype_and_shape(tiny, dtype, shape, seed, specials):
    rng = np.random.default_rng(seed)
    array = (rng.standard_normal(shape) * 300).astype(dtype) if dtype is not object else np.empty(shape, object)
    if specials and array.dtype.kind == "f" and array.size:
        array.flat[rng.integers(0, array.size, 3)] = [np.nan, np.inf, -np.inf]
    image_processed(tiny[1], array)


def encoded(fmt: str, mode: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.frombytes("RGBA", size, rng.bytes(size[0] * size[1] * 4)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


FORMATS = [("PNG", "RGBA"), ("PNG", "I;16"), ("JPEG", "RGB"), ("JPEG", "CMYK"), ("GIF", "P"), ("BMP", "RGB"),
           ("TIFF", "RGB"), ("TIFF", "F"), ("WEBP", "RGBA"), ("ICO", "RGBA"), ("PPM", "RGB"), ("TGA", "RGBA"),
           ("PCX", "RGB"), ("DDS", "RGBA"), ("SGI", "RGB"), ("IM", "RGB"), ("QOI", "RGBA"),
           ("JPEG2000", "RGB")]  # fmt: skip
# Found by fuzzing load_image: Pillow raised NotImplementedError (DDS), IndexError (QOI) and bare
# ValueErrors that named no image; all are "image 0: not a readable image (...)" now.
FOUND_DDS = base64.b64decode(
    "RERTIHwAAAAPEAAADQAAABEAAABEAAAAAAAAAAAAAAAAAAAAilMAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAIAAAAEEAAAAAAAAAIAAAAAAA/wAA/wAA/wAAAAAAAP8AEAAAAAAAAAAAAAAAAAAAAAAAAMGBXtgO6s6i2NYggQ+890TM57dN"
)  # truncated after the header: Pillow reads the header, then fails on the pixel format
FOUND_QOI = base64.b64decode(
    "cW9pZgAAABEAAABoAwH+XoHB/tjO6v4OoiD+1tiB/ve8D/5Et+f+zE2o/jx8Cf4c70H+ErUm/joDOv5Q3Sv+d3kx/s9NG/4/pXj+WKno"
    "/n6x7P5/cHr+S5pE/pmB9/5eSL/+ub5+/tug5v4AKor+7L5V/o4G5/5f7kv+NkZM/sbaz/6vj73+qmd3/rLv9P7lY77+133a/h6U5v6M"
    "cg/+mAd4/tLOwv4Gssn+uaUm/rjXSP7D9iv+DX7a/hU5Sv742y3+eKcE/tgynP6JNxH+lBMf/uq4S/7w1SX+ermqgHfOOf40awv+ojlm"
    "/jz0Pv4GZ8n+XQBf/gbQHv6n6h3+AagJ/q2quv7hjYX+OTWt/jcwZf7dQO/+34ic/mQZmP7CMrD+gAAAAPT9dP58JUj+/j7E/hLNVf4F"
    "F/r+LHAn/mDyrP5+rj3+xTjy/sV+g/6lu6SnHdZ//go9r/6uaDj+s7tZ/o9iuf46Cd/+Pa6U/iEUA/4yk7j+dLK3/jppcP7X8J3+fIUX"
    "/k0aX/70AWv+ThcM/kZrwP6zXnv+QrID/reFeP604pH+pasR/tF4HP7umx/+BYdL/naXWv7QpDf+q2rG/k6R7P7dLED+Swdl/lGi1f4w"
    "t/j+CiOX/kGTIP6AnVj+gFW7/pG5wf6OI0D+Y+lI/gJTGf4E6OL+ormP/kICJv45uwH+07VU/jCInv7uiWz+C5AG/oEUu/4ri1/+tikn"
    "/tRO7f6cZVD+RX7I/l/sAv5Q2E/+RjwD/h6ryf5BRGD+bGv7/ksTkf5P/Q3+rejW/qqFw/4KVbf+o9mR/hK2d/4lFaP+KtvS/m9Icv6u"
    "SR3+5Ejn/trKa/5UkLP+J10K/jqHvP5Zw5n+Q1AM/qq28P6QmLT+j2a7/hQj/v44v9D+Md9x/k7xcf6WOhb+GjqH/p7JqP6PkyH+QSDl"
    "/ohYdv5LE2D+7eU2/toGq/7tCfD+4rFw/hIy4/4nG8H+JVIt/vAT1f5vCyf+23Zc/uuA8f6hFrz+ABqG/oOSgf5XOgz+oI6t/pPCMv5Z"
    "7LP+Q+ln/qSNu/5vL+b+ZHjm/gkz8/4y4Rv+MQor/vh+b/7VwAv+fMfa/muwDf7xC07+xZ1n/g5/WP4BpL3+/ULS/o6ZAP747PH+Z1Mt"
    "/gOrg/7EdBz+mb7U/oCD+f7AwUn+UGcA/hdWfv4d95P+anCA/obRfv7wOW0AAAAAAAAAAQ=="
)


@fuzz(max_examples=400)
@given(
    source=st.sampled_from(FORMATS),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    seed=st.integers(0, 2**32 - 1),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
)
def test_encoded_images_truncated_and_corrupted(tiny, source, size, seed, cut, flips):
    fmt, mode = source
    data = bytearray(encoded(fmt, mode, size, seed))
    if cut is not None:
        data = data[: int(len(data) * cut)]
    for where, value in flips:
        if data:
            data[int(where * len(data))] = value
    image_processed(tiny[1], bytes(data))


@pytest.mark.parametrize("data", [FOUND_DDS, FOUND_QOI], ids=["dds_pixel_format", "qoi_index"])
def test_corrupt_files_found_by_fuzzing(tiny, data):
    assert image_processed(tiny[1], data) is None


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds a few rows: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(12_000, 12_000), (20_000, 20_000), (100_000, 100_000), (1, 2**31 - 1)])
def test_decompression_bombs_are_refused_at_once_by_pixel_count(tiny, width, height, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(width, height))
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow warns first; the error is ours
    for source in (path, path.read_bytes()):
        start = time.monotonic()
        with pytest.raises(ValueError, match=rf"image 0: {width * height:,} pixels, more than the {MAX_IMAGE_PIXELS:,}"):
            load_image(source)
        assert time.monotonic() - start < 1  # refused from the header, nothing decoded
    TRIED["decompression bomb"] += 2


def test_extreme_strips_keep_the_middle_and_stay_cheap(tiny):
    """A 10 x 2000 strip, red in the middle and blue at the ends: what CLIP keeps (the middle square) is
    the same with the cut, and a 1 x 3,000,000 strip costs no more than a small image."""
    processor = tiny[1]
    strip = np.zeros((10, 2000, 3), np.uint8)
    strip[..., 2] = 255
    strip[:, 900:1100] = (255, 0, 0)
    cut = load_image(strip)
    assert cut.size == (10 * MAX_ASPECT_RATIO, 10)
    whole = processor.image_processor(Image.fromarray(strip), return_tensors="np")["pixel_values"]
    kept = processor.image_processor(cut, return_tensors="np")["pixel_values"]
    assert np.abs(whole - kept).max() < 1e-5
    start = time.monotonic()
    processor(text=PROMPT_IMAGE, images=[np.zeros((1, 3_000_000), np.uint8)])
    assert time.monotonic() - start < 2
    TRIED["extreme strip"] += 2


# ---- audio ----------------------------------------------------------------------------------------

RATES = st.one_of(
    st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000, 96000, 7919, 44101]),
    st.integers(-10, 1_100_000),
    st.sampled_from([0, True, 16000.0, float("nan"), "16000", None]),
)


@fuzz(max_examples=200)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.one_of(
        st.tuples(st.integers(0, 20_000)),  # mono, up to 1.25 s at 16 kHz
        st.tuples(st.integers(0, 4000), st.integers(1, 9)),  # (samples, channels)
        st.tuples(st.integers(1, 9), st.integers(0, 4000)),  # (channels, samples); or more channels than samples
        st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
    ),
    rate=RATES,
    wrapper=st.sampled_from(["tuple", "dict", "bare", "tensor"]),
    specials=st.booleans(),
    scale=st.sampled_from([1.0, 1e-30, 1e30, 1e300]),
    seed=st.integers(0, 2**32 - 1),
)
# Found by a FUZZ_RANDOM campaign: one float32 sample of 1e30 is finite, but Whisper's log-mel of it is NaN.
@example(dtype=np.float32, shape=(1,), rate=8000, wrapper="tuple", specials=False, scale=1e30, seed=0)
def test_audio_arrays_of_every_dtype_layout_and_rate(tiny, dtype, shape, rate, wrapper, specials, scale, seed):
    rng = np.random.default_rng(seed)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wave = (rng.standard_normal(shape) * scale).astype(dtype) if dtype is not object else np.empty(shape, object)
    if specials and wave.dtype.kind == "f" and wave.size:
        wave.flat[rng.integers(0, wave.size, 2)] = [np.nan, np.inf]
    kwargs = {}
    if wrapper == "tuple":
        clip = (rate, wave)
    elif wrapper == "dict":
        clip = {"array": wave, "sampling_rate": rate}
    elif wrapper == "tensor" and wave.dtype.kind in "fiub" and wave.dtype != np.longdouble and wave.dtype != np.uint64:
        clip, kwargs = torch.from_numpy(np.ascontiguousarray(wave)), {"sampling_rate": rate if isinstance(rate, int) else None}
    else:
        clip, kwargs = wave, {"sampling_rate": rate if isinstance(rate, int) and rate > 0 else None}
    out = works_or_names_the_problem(
        "audio array", lambda: tiny[1](text=PROMPT_AUDIO, audio=[clip], return_tensors="np", **kwargs), *AUDIO_WORDS,
        "sampling rate",
    )
    if out is not None:  # (that tokens and features agree is checked against the model further down)
        assert np.isfinite(out["input_features"]).all() and out["input_features_mask"].sum() >= 1


@fuzz(max_examples=200)
@given(
    fmt=st.sampled_from([("WAV", "PCM_16"), ("WAV", "PCM_U8"), ("WAV", "FLOAT"), ("WAV", "PCM_32"), ("FLAC", "PCM_16"),
                         ("OGG", "VORBIS"), ("WAV", "ULAW")]),
    frames=st.integers(1, 6000),
    channels=st.integers(1, 8),
    rate=st.sampled_from([8000, 16000, 22050, 44100, 48000, 7919]),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6),
    seed=st.integers(0, 2**32 - 1),
)  # fmt: skip
@example(fmt=("WAV", "PCM_16"), frames=2, channels=8, rate=16000, cut=None, flips=[], seed=0)  # channels > frames
def test_audio_files_of_any_format_corrupted(tiny, fmt, frames, channels, rate, cut, flips, seed):
    buffer = io.BytesIO()
    wave = np.random.default_rng(seed).uniform(-0.5, 0.5, (frames, channels))
    sf.write(buffer, wave, rate, format=fmt[0], subtype=fmt[1])
    data = bytearray(buffer.getvalue())
    if cut is not None:
        data = data[: int(len(data) * cut)]
    for where, value in flips:
        if data:
            data[int(where * len(data))] = value
    out = works_or_names_the_problem(
        "audio file", lambda: tiny[1](text=PROMPT_AUDIO, audio=[bytes(data)], return_tensors="np"), *AUDIO_WORDS
    )
    if out is not None and cut is None and not flips and fmt[1] != "VORBIS":
        # a file's samples are (frames, channels), however few the frames
        seconds = frames / rate
        assert abs(out["input_features_mask"].sum() - np.ceil(seconds * 16_000 / 160)) <= 2


@fuzz(max_examples=150)
@given(data=st.binary(max_size=2048))
@example(data=b"")
@example(data=b"RIFF\x24\x00\x00\x00WAVEfmt ")
@example(data=b"fLaC\x00\x00\x00\x22")
def test_bytes_that_are_not_audio(tiny, data):
    works_or_names_the_problem(
        "non-audio bytes", lambda: tiny[1](text=PROMPT_AUDIO, audio=[data], return_tensors="np"), *AUDIO_WORDS
    )


@pytest.mark.parametrize(
    "seconds, rate", [(0.0, 16000), (0.001, 16000), (29.99, 16000), (30.0, 16000), (30.01, 44100), (180, 7919), (300, 44101)]
)
def test_audio_from_nothing_to_minutes_at_odd_rates_stays_bounded(tiny, seconds, rate):
    """Up to five minutes at a prime rate: resampled by FFT and cut into 30 s windows in seconds."""
    processor = tiny[1]
    wave = np.sin(np.arange(int(seconds * rate)) * 0.05).astype(np.float32)
    start = time.monotonic()
    out = works_or_names_the_problem(
        "audio length", lambda: processor(text=PROMPT_AUDIO, audio=[(rate, wave)], return_tensors="np"), *AUDIO_WORDS
    )
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"{seconds} s at {rate} Hz took {elapsed:.1f} s"
    if len(wave) == 0:
        assert out is None
    else:
        window = processor.window_samples / 16_000
        assert out is not None and len(out["input_features"]) == max(1, int(np.ceil(round(seconds * 16000) / 16000 / window)))


def test_hours_of_audio_are_refused_before_any_work(tiny, tmp_path):
    long_clip = np.zeros(int((MAX_AUDIO_SECONDS + 1) * 100), np.int16)  # 100 Hz: few samples, over the limit
    with pytest.raises(ValueError, match=r"audio 0: the clip is 1,801 s long, more than the 1,800 s accepted"):
        load_audio((100, long_clip))
    path = tmp_path / "long.wav"
    sf.write(path, long_clip, 100)
    start = time.monotonic()
    with pytest.raises(ValueError, match="more than the 1,800 s accepted"):
        load_audio(path)
    assert time.monotonic() - start < 1
    # A 1 kB FLAC whose header declares 100 M frames of 96 kHz stereo (17 minutes): soundfile.read
    # would allocate the 800 MB that the header promises before finding out it is not there.
    flac = tmp_path / "lying_header.flac"
    flac.write_bytes(flac_declaring(100_000_000, rate=96_000, channels=2))
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"audio 0: 200,000,000 samples over all channels, more than the 172,800,000"):
        load_audio(flac)
    assert time.monotonic() - start < 1 and flac.stat().st_size < 4096
    TRIED["audio over the limit"] += 3


def flac_declaring(frames: int, rate: int, channels: int) -> bytes:
    """A short FLAC whose STREAMINFO claims `frames` frames (an audio decompression bomb)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((4096, channels), np.int16), rate, format="FLAC")
    data = bytearray(buffer.getvalue())
    # "fLaC", a 4-byte block header, then STREAMINFO; its bytes 10-17 pack rate (20 bits), channels,
    # bits per sample and, in the low 36 bits, the total number of frames.
    packed = int.from_bytes(data[18:26], "big")
    data[18:26] = ((packed >> 36 << 36) | frames).to_bytes(8, "big")
    return bytes(data)


# ---- text -----------------------------------------------------------------------------------------

TEXT = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=8),
        st.sampled_from(["<image>", "<audio>", "<|user|>", "<|end|>", "<|assistant|>", "<", ">", "\n", "\x00"]),
    ),
    max_size=10,
).map("".join)


@fuzz(max_examples=300)
@given(
    texts=st.one_of(TEXT.map(lambda t: [t]), st.lists(TEXT, min_size=0, max_size=3)),
    batched=st.booleans(),
    n_images=st.integers(0, 2),
    n_clips=st.integers(0, 2),
    long=st.sampled_from([0, 0, 0, 5000]),
    surrogate=st.booleans(),
)
@example(texts=[""], batched=False, n_images=0, n_clips=0, long=0, surrogate=False)
@example(texts=["<image><image>"], batched=False, n_images=1, n_clips=0, long=0, surrogate=False)
@example(texts=["<audio>"], batched=False, n_images=0, n_clips=2, long=0, surrogate=False)
def test_text_with_any_placeholders_empty_or_past_the_context(tiny, texts, batched, n_images, n_clips, long, surrogate):
    processor = tiny[1]
    texts = list(texts)
    if texts and long:
        texts[0] += " hello" * long
    if texts and surrogate:
        texts[-1] += "\ud800"
    text = texts if batched or len(texts) != 1 else texts[0]
    images = [np.full((8, 8, 3), 200, np.uint8)] * n_images
    clips = [np.zeros(1600, np.float32)] * n_clips
    out = works_or_names_the_problem(
        "text",
        lambda: processor(text=text, images=images or None, audio=clips or None, return_tensors="pt"),
        "placeholders", "context", "empty", "text must be", "Unicode",
    )
    if out is not None:
        expected_images = sum(t.count("<image>") for t in texts)
        assert expected_images == n_images and sum(t.count("<audio>") for t in texts) == n_clips
        assert (out["attention_mask"].sum(-1) >= 1).all()


# ---- the model's forward --------------------------------------------------------------------------


@fuzz(max_examples=20)
@given(
    words=st.text(alphabet="abc de<>|\n", max_size=40),
    n_images=st.integers(0, 2),
    clip_samples=st.lists(st.integers(1, 40_000), max_size=2),
    height=st.integers(1, 300),
    width=st.integers(1, 300),
)
def test_model_forward_on_whatever_the_processor_makes(tiny, words, n_images, clip_samples, height, width):
    """Whatever the processor accepts, the model runs: token and feature counts always agree."""
    model, processor = tiny
    content = [{"type": "image"}] * n_images + [{"type": "audio"}] * len(clip_samples) + [{"type": "text", "text": words}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [np.random.default_rng(height).integers(0, 255, (height, width, 3), dtype=np.uint8)] * n_images
    clips = [np.sin(np.arange(n) * 0.1).astype(np.float32) for n in clip_samples]
    inputs = processor(text=prompt, images=images or None, audio=clips or None, return_tensors="pt")

    def forward():
        with torch.no_grad():
            return model(**inputs)

    out = works_or_names_the_problem("model forward (processor inputs)", forward)
    assert out is not None and out.logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out.logits).all()


@fuzz(max_examples=80)
@given(
    pixel_shape=st.one_of(st.none(), st.lists(st.integers(0, 68), min_size=1, max_size=5).map(tuple)),
    feature_shape=st.one_of(st.none(), st.lists(st.integers(0, 3000), min_size=1, max_size=4).map(tuple)),
    mask_shape=st.one_of(st.none(), st.lists(st.integers(0, 3000), min_size=1, max_size=3).map(tuple)),
    mask_dtype=st.sampled_from([torch.long, torch.float32, torch.bool]),
    with_ids=st.sampled_from(["image", "audio", "both", "empty"]),
)
@example(pixel_shape=(1, 4, 64, 64), feature_shape=None, mask_shape=None, mask_dtype=torch.long, with_ids="image")
@example(pixel_shape=(0, 3, 64, 64), feature_shape=None, mask_shape=None, mask_dtype=torch.long, with_ids="image")
@example(pixel_shape=None, feature_shape=(1, 80, 3000), mask_shape=(2, 3000), mask_dtype=torch.float32, with_ids="audio")
@example(pixel_shape=None, feature_shape=(80, 3000), mask_shape=(1, 3000), mask_dtype=torch.long, with_ids="audio")
def test_model_forward_on_malformed_media_tensors(tiny, pixel_shape, feature_shape, mask_shape, mask_dtype, with_ids):
    """Media tensors of any shape against processor-made token ids: they work, or a ValueError says why."""
    model, processor = tiny
    if with_ids == "empty":
        input_ids = torch.zeros((1, 0), dtype=torch.long)
    else:
        parts = {"image": "<image>", "audio": "<audio>", "both": "<image><audio>"}[with_ids]
        n_audio = int(with_ids != "image")
        ids = processor(text=parts, images=[np.zeros((4, 4, 3), np.uint8)] * (with_ids != "audio") or None,
                        audio=[np.zeros(1600, np.float32)] * n_audio or None)["input_ids"]  # fmt: skip
        input_ids = ids
    inputs = {"input_ids": input_ids}
    if pixel_shape is not None and np.prod(pixel_shape) < 2_000_000:
        inputs["pixel_values"] = torch.randn(pixel_shape)
    if feature_shape is not None and np.prod(feature_shape) < 2_000_000:
        inputs["input_features"] = torch.randn(feature_shape)
    if mask_shape is not None and np.prod(mask_shape) < 2_000_000:
        inputs["input_features_mask"] = torch.ones(mask_shape, dtype=mask_dtype)

    def forward():
        with torch.no_grad():
            return model(**inputs)

    works_or_names_the_problem(
        "model forward (malformed media)", forward,
        "pixel_values", "input_features", "tokens and", "features do not match", "Input image size", "Whisper expects",
        "input_ids", "(batch, sequence", "vision features",
    )  # fmt: skip
