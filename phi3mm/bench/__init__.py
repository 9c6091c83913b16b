"""Speed and memory of this project's model against transformers' LLaVA holding the same weights.

    python -m phi3mm.bench --size both --threads 1      # the CPU run of BENCHMARKS.md (~6 min on 2 cores)
    python -m phi3mm.bench --size phi35 --device cuda   # Phi-3.5-mini + CLIP-L/336 shapes, bf16 (GPU only)

This package owns the benchmark: `run` measures the sizes and returns the results (BENCHMARKS.json),
`main` is the command, which also writes BENCHMARKS.md. The parts, one concern each:

- `cases.py`: the sizes and the measured cases (training step from pixels, from precomputed vision
  features and with pooling 2; prefill; `generate` in fp32 / bf16 / 4-bit; a loop without KV cache;
  a QLoRA step);
- `padding.py`: padding efficiency of length-grouped batches on a `LlavaDataset`'s lengths;
- `timing.py`: interleaved rounds, paired ratios, peak memory, the machine's load;
- `flops.py`: model FLOPs counted from a config, and the matmul rate MFU is measured against;
- `audio.py`: Whisper encoding at the real length against 30 s of padding, and resampling;
- `report.py` with `BENCHMARKS.template.md`: the Markdown, its conclusions computed from the figures.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from huggingface_hub.utils import disable_progress_bars

from phi3mm.bench import audio
from phi3mm.bench.cases import (
    SIZES,
    Size,
    bench_generation,
    bench_no_cache,
    bench_prefill,
    bench_qlora,
    bench_training,
    prepare_models,
)
from phi3mm.bench.flops import matmul_rates
from phi3mm.bench.padding import padding_benchmark
from phi3mm.bench.report import render_markdown, summary
from phi3mm.bench.timing import load_average, release_freed_memory_promptly
from phi3mm.real_parts import FetchError


def bench_size(size: Size, device: str, repeats: int | None, work_dir: Path, load: list[float], fast_bf16: bool,
               log=print) -> dict:
    """Every case on one size; the load average is appended to `load` after each. Without `fast_bf16`
    the bf16 generation is left out and the 4-bit layers compute in float32."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    repeats = repeats or size.repeats
    started = time.perf_counter()
    log(f"[{size.name}] building components, our checkpoint and its LLaVA export in {work_dir}")
    m = prepare_models(size, work_dir, device, dtype, "bfloat16" if fast_bf16 else "float32")
    text, vision = m.ours.config.text_config, m.ours.config.vision_config
    parts = {"vision_tower": m.ours.model.vision_tower, "projector": m.ours.model.multi_modal_projector,
             "language_model": m.ours.model.language_model, "lm_head": m.ours.lm_head}  # fmt: skip
    parameters = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    result = {
        "size": asdict(size), "repeats": repeats, "dtype": str(dtype).removeprefix("torch."),
        "config": {"text_width": text.hidden_size, "text_layers": text.num_hidden_layers,
                   "text_intermediate": text.intermediate_size, "vocab_size": text.vocab_size,
                   "vision_width": vision.hidden_size, "vision_layers": vision.num_hidden_layers,
                   "image_size": vision.image_size, "patch_size": vision.patch_size},
        "parameters": parameters | {"total": sum(parameters.values())},
        "image_tokens": m.ours.config.image_seq_length, "image_tokens_pool2": m.pooled.config.image_seq_length,
    }  # fmt: skip
    # The loop without cache re-runs the whole model per token (seconds each on `small`), and its gap
    # to `generate` is many times the noise: a third of the rounds past the tiny size.
    no_cache_repeats = repeats if size.name == "tiny" else max(1, repeats // 3)
    precisions = ["fp32"] * (device == "cpu") + ["bf16"] * fast_bf16 + ["4bit"]
    for name, case, args in (("train", bench_training, [repeats]), ("prefill", bench_prefill, [repeats]),
                             ("generation", bench_generation, [repeats, precisions]),
                             ("no_cache", bench_no_cache, [no_cache_repeats]), ("qlora", bench_qlora, [repeats])):
        log(f"[{size.name}] {name}")
        result[name] = case(m, device, *args)
        load.append(load_average())
    del m
    gc.collect()
    return result | {"seconds": time.perf_counter() - started}


def machine_info(device: str) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    info = {
        "cpu": next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown"),
        "usable_cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "bitsandbytes": importlib.metadata.version("bitsandbytes"),
    }  # fmt: skip
    return info | ({"gpu": torch.cuda.get_device_name(0)} if device == "cuda" else {})


def run(sizes: list[str], device: str = "cpu", repeats: int | None = None, work_dir: str | os.PathLike | None = None,
        threads: int | None = None, command: str = "python -m phi3mm.bench", log=print) -> dict:
    """Measure `sizes` on `device` with `threads` torch threads (default: torch's); the results."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    if "phi35" in sizes and device != "cuda":
        raise SystemExit("--size phi35 builds Phi-3.5-mini + CLIP-L/336 (4.1B parameters) and would take hours a "
                         "step on a CPU: run it on a GPU with --device cuda")  # fmt: skip
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        torch.manual_seed(0)
        load, started = [load_average()], time.perf_counter()
        rates = matmul_rates(device)
        fast_bf16 = device == "cuda" or rates["bfloat16"] >= rates["float32"] / 2
        results = {"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "device": device, "machine": machine_info(device), "matmul_rates": rates, "fast_bf16": fast_bf16,
                   "sizes": {}}  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="phi3mm-bench-") as tmp:
            for name in sizes:
                results["sizes"][name] = bench_size(SIZES[name], device, repeats, Path(work_dir or tmp) / name, load,
                                                    fast_bf16, log)  # fmt: skip
        log("padding efficiency of length-grouped batches")
        results["padding"] = padding_benchmark()
        if device == "cpu":  # the audio cases are CPU work (preprocessing, the app's ASR)
            log("audio: Whisper-base at real length vs padded, and resampling (phi3mm.bench.audio)")
            try:
                results["audio"] = audio.run(repeats or 5)
            except FetchError as error:  # offline, and Whisper-base was never fetched
                results["audio"] = {"skipped": str(error)}
        return results | {"load_average": [*load, load_average()], "seconds": time.perf_counter() - started}
    finally:
        torch.set_num_threads(previous_threads)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m phi3mm.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small", "both", "phi35"], default="both",
                        help="both = tiny then small (the CPU run); phi35 = the real shapes (GPU only)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="BENCHMARKS.json", help="the results as JSON")
    parser.add_argument("--md", default="BENCHMARKS.md", help="the report rendered from them")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds of each measurement, after one warm-up round (default: each size's own, "
                             + ", ".join(f"{s.name} {s.repeats}" for s in SIZES.values()) + ")")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one a usable core); on a machine shared with "
                             "other jobs 1 avoids waiting for descheduled threads at every op")
    parser.add_argument("--work-dir", default=None, help="keep the built checkpoints here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    release_freed_memory_promptly()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' v6 renames, met through peft
    transformers.logging.set_verbosity_error()  # generation-config chatter would bury the progress lines
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()  # huggingface_hub's "Writing model shards" bar for every checkpoint saved
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f}s  {message}", flush=True)

    command = " ".join(["python -m phi3mm.bench", *(argv if argv is not None else sys.argv[1:])])
    sizes = ["tiny", "small"] if args.size == "both" else [args.size]
    results = run(sizes, args.device, args.repeats, args.work_dir, args.threads, command, log)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    Path(args.md).write_text(render_markdown(results))
    print("\n".join(summary(results)))
    print(f"wrote {args.out} and {args.md}")
    return results


__all__ = ["SIZES", "bench_size", "main", "run"]
