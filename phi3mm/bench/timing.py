"""How the benchmark times and weighs: interleaved rounds, paired ratios, peak memory, machine load.

Every comparison runs its sides in the same rounds, in alternating order (A B, B A, A B, ...), so load
from other work on a shared machine falls on both alike; ratios are taken per round, from wall time
and from the process's CPU time (with one thread, the time it really had a core).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Self

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory_promptly() -> None:
    """Make glibc hand freed large blocks back at once, so RSS follows what torch really holds.

    By default glibc raises its mmap threshold after large frees and keeps the memory, which would
    hide a later step's allocations from the RSS sampler (whichever model ran second would look cheaper).
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD = 128 KiB, fixed (no dynamic threshold)
        libc.mallopt(-1, 1 << 17)  # M_TRIM_THRESHOLD = 128 KiB


class PeakMemory:
    """Peak memory a block adds over what was allocated before it, in bytes (`increase`).

    CUDA: `torch.cuda.max_memory_allocated` (tensors only). CPU: the resident set size sampled by a
    thread every `interval` seconds (tracemalloc does not see torch's allocations, and `ru_maxrss`
    only ever rises); short spikes between samples can be missed.
    """

    def __init__(self, device: str, interval: float = 0.002):
        self.device, self.interval, self.increase = device, interval, 0

    def __enter__(self) -> Self:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.increase = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.increase = max(self._peak, _rss_bytes()) - self._base


def interleave(fns: dict[str, Callable[[], dict | None]], repeats: int, device: str, warmup: int = 1,
               memory: bool = False) -> dict[str, list[dict]]:
    """Run each function `warmup + repeats` times, in rounds of alternating order; the timed records.

    A record has `seconds` (synchronised wall time), `cpu_seconds` (this process's CPU time),
    `memory_increase` (bytes, with `memory`) and whatever the function returned.
    """
    records: dict[str, list[dict]] = {name: [] for name in fns}
    gc.collect()  # once: a full collection takes longer than a tiny model's step
    for round_ in range(warmup + repeats):
        for name in list(fns) if round_ % 2 == 0 else list(fns)[::-1]:
            sync(device)
            tracker = PeakMemory(device) if memory else contextlib.nullcontext()
            with tracker:
                start, cpu_start = time.perf_counter(), time.process_time()
                extra = fns[name]() or {}
                sync(device)
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            if round_ >= warmup:
                memory_increase = {"memory_increase": tracker.increase} if memory else {}
                records[name].append({"seconds": seconds, "cpu_seconds": cpu_seconds, **extra, **memory_increase})
    return records


def summarize(records: list[dict]) -> dict:
    """Medians of every numeric field, the raw times, and the largest memory increase."""
    out = {"repeats": len(records), "times": [round(r["seconds"], 5) for r in records]}
    for key in records[0]:
        values = [r[key] for r in records if r.get(key) is not None]
        if values and all(isinstance(v, (int, float)) for v in values):
            out[key] = statistics.median(values)
    if "memory_increase" in records[0]:
        out["memory_increase"] = max(r["memory_increase"] for r in records)
    return out


def paired_ratio(records_a: list[dict], records_b: list[dict], key: str = "seconds",
                 cpu_key: str = "cpu_seconds") -> dict:
    """a / b per round (the two ran back to back, under the same load): median, min, max and the
    number of rounds; the same from CPU time under "cpu"."""

    def spread(k):
        ratios = [a[k] / b[k] for a, b in zip(records_a, records_b) if a.get(k) and b.get(k)]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}

    return spread(key) | {"cpu": spread(cpu_key)}


def load_average() -> float:
    """The 1-minute load average: runnable threads, this run's own included."""
    return round(os.getloadavg()[0], 2)
