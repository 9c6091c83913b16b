"""Audio benchmarks: the Whisper encoder on the real length against 30 s of padding, and resampling
through librosa's soxr against the numpy FFT fallback.

    python -m phi3mm.bench.audio [--threads 1] [--repeats 5]

Both cases measure this project's own code paths side by side in one run and print a Markdown
section; `python -m phi3mm.bench` includes it in BENCHMARKS.md.
- Audio prefill: `get_audio_features` (Whisper-base encoder + audio projector) of a 1, 3, 10 and
  30 s clip with `audio_real_length` on and off, the real Whisper-base weights
  (`phi3mm.real_parts`), median of the repeats.
- Resampling: a 60 s 44.1 kHz stereo clip to 16 kHz mono by `resample` (librosa, soxr_hq) and
  `resample_fft` (numpy); the error is against the exact signal, a sum of tones below 7 kHz
  evaluated at the 16 kHz sample times, over the middle of the clip (both methods treat the ends
  differently).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

CLIP_SECONDS = (1, 3, 10, 30)
TONES_HZ = (220.0, 1234.5, 3100.0, 6800.0)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def audio_prefill(repeats: int = 5) -> dict:
    """Seconds of `get_audio_features` per clip length, padded vs real length, with Whisper-base."""
    from phi3mm.build import build_model_and_processor, make_tiny_components
    from phi3mm.real_parts import whisper_base_path

    with tempfile.TemporaryDirectory() as work:
        paths = make_tiny_components(work, with_audio=False)
        model, processor = build_model_and_processor(paths["text"], paths["vision"], whisper_base_path())
    model.eval()
    rng = np.random.default_rng(0)
    rows = []
    for seconds in CLIP_SECONDS:
        wave = (0.1 * rng.standard_normal(seconds * 16_000)).astype(np.float32)
        inputs = processor(text="<audio>", audio=[wave], return_tensors="pt")
        row = {"seconds": seconds}
        for mode, real in (("padded", False), ("real_length", True)):
            model.config.audio_real_length = real

            def run():
                with torch.no_grad():
                    model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])

            row[mode] = _median_seconds(run, repeats)
        row["speedup"] = row["padded"] / row["real_length"]
        rows.append(row)
    return {"encoder": "openai/whisper-base (real weights)", "rows": rows}


def resampling(repeats: int = 5) -> dict:
    """Time and error of both resamplers on a 60 s 44.1 kHz stereo clip."""
    from processing_multimodal import load_audio, resample, resample_fft

    orig, new, seconds = 44_100, 16_000, 60
    t = np.arange(orig * seconds) / orig
    mono = sum(0.2 * np.sin(2 * np.pi * f * t) for f in TONES_HZ)
    stereo = np.stack([mono, mono], axis=1).astype(np.float32)
    t_new = np.arange(new * seconds) / new
    exact = sum(0.2 * np.sin(2 * np.pi * f * t_new) for f in TONES_HZ)
    middle = slice(new, -new)  # 1 s in from each end
    out = {}
    for name, fn in (("librosa_soxr_hq", resample), ("numpy_fft", resample_fft)):
        seconds_taken = _median_seconds(lambda fn=fn: fn(stereo.mean(axis=1), orig, new), repeats)
        result = fn(stereo.mean(axis=1), orig, new)
        error = result[: len(exact)][middle] - exact[middle]
        rms = float(np.sqrt(np.mean(error**2)) / np.sqrt(np.mean(exact[middle] ** 2)))
        out[name] = {"seconds": seconds_taken, "relative_rms_error": rms, "samples": len(result)}
    load_seconds = _median_seconds(lambda: load_audio((orig, stereo)), repeats)
    return {"clip": f"{seconds} s, {orig} Hz stereo -> {new} Hz mono", "methods": out, "load_audio_seconds": load_seconds}


def run(repeats: int = 5) -> dict:
    return {"audio_prefill": audio_prefill(repeats), "resampling": resampling(repeats)}


def render(results: dict) -> str:
    prefill, resample_ = results["audio_prefill"], results["resampling"]
    lines = [
        "## Audio: real-length encoding and resampling",
        "",
        f"`get_audio_features` with {prefill['encoder']}: the encoder on 30 s of padding (how checkpoints "
        "without `audio_real_length` run) against the real length (masked, rounded up to 16 frames).",
        "",
        "| clip | padded to 30 s | real length | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    for row in prefill["rows"]:
        lines.append(f"| {row['seconds']} s | {1000 * row['padded']:.1f} ms | {1000 * row['real_length']:.1f} ms | "
                     f"{row['speedup']:.2f}x |")  # fmt: skip
    three = next(row for row in prefill["rows"] if row["seconds"] == 3)
    verdict = "meets" if three["speedup"] >= 8 else "misses"
    lines += ["", f"A 3 s clip is encoded {three['speedup']:.1f}x faster at its real length ({verdict} the 8x goal)."]
    methods = resample_["methods"]
    soxr, fft = methods["librosa_soxr_hq"], methods["numpy_fft"]
    faster = "librosa's soxr" if soxr["seconds"] < fft["seconds"] else "numpy's FFT"
    ratio = max(soxr["seconds"], fft["seconds"]) / min(soxr["seconds"], fft["seconds"])
    lines += [
        "",
        f"Resampling {resample_['clip']}: the error is relative RMS against the exact tones.",
        "",
        "| method | time | relative RMS error |",
        "|---|---:|---:|",
        f"| librosa `soxr_hq` (used when librosa is installed) | {1000 * soxr['seconds']:.1f} ms | {soxr['relative_rms_error']:.2e} |",
        f"| numpy FFT (the remote code's fallback) | {1000 * fft['seconds']:.1f} ms | {fft['relative_rms_error']:.2e} |",
        "",
        f"{faster} is {ratio:.1f}x faster on this clip; `load_audio` of the whole stereo clip takes "
        f"{1000 * resample_['load_audio_seconds']:.1f} ms.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m phi3mm.bench.audio", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.repeats)
    print(render(results))
    return results


if __name__ == "__main__":
    main()
