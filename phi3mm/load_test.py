"""python -m phi3mm.load_test [--clients 16] [--seconds 60] [--burst 48] [--model DIR] [--json OUT]

A bounded load test of the Gradio app (space/app.py) on 127.0.0.1. N clients, each with its own
gradio_client session, send for a fixed time a mix of text, image, audio and image+audio messages,
unreadable and oversized uploads, and raw HTTP calls that try to make /chat read files of the
server (/etc/passwd, ../ paths, files in its working directory). A burst of simultaneous requests
then overflows the queue. It prints latency percentiles per kind, what became of every request, and
the server's memory (RSS) over the run.

    --model DIR    checkpoint to serve (default: a tiny random one built offline in a temp folder)
    --url URL      load an app that is already running instead (with --pid PID to watch its memory)

Every request must be answered, or refused with a message: in the chat (a bad upload, too large a
file), or by the server (an upload over the hard limit: HTTP 413; a path that was not uploaded;
"Queue is full"). `unanswered` counts the rest (timeouts, errors without a message) and must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "space" / "examples"
ERROR_TITLE = "⚠️ Error"  # space/app.py's title for messages that refuse a request
MAX_FILE_MB = 0.5  # the app's per-file limit in this test: small, so oversized files are cheap to make
# Relative weights of the request kinds; "attack" asks /chat to read a file that was never uploaded.
MIX = {"text": 3, "image": 3, "audio": 3, "image+audio": 1, "bad file": 1, "too large": 1, "over hard limit": 1,
       "attack": 1}  # fmt: skip
TURNS_PER_CONVERSATION = 5  # then the client starts a new conversation (a new session), as users do
ATTACK_PATHS = [
    "/etc/passwd", "../../../../etc/passwd", "/proc/self/environ", "README.md", "space/app.py",
    str(EXAMPLES / "red_circle.png"),  # served to browsers (allowed_paths), but never uploaded
    "/tmp/gradio/../../etc/passwd", "file:///etc/passwd", "http://127.0.0.1:1/x.png",
]  # fmt: skip


def make_files(folder: Path, max_file_mb: float) -> dict[str, Path]:
    """The uploads of each kind (examples from space/examples, and files made to be refused)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    files = {"image": EXAMPLES / "red_circle.png", "audio": EXAMPLES / "three_beeps.wav"}
    files["bad file"] = folder / "not_really.png"
    files["bad file"].write_text("this is not a PNG")
    seconds = max_file_mb * 2**20 * 1.5 / 32_000  # 16-bit mono at 16 kHz: 1.5x the limit
    files["too large"] = folder / "too_large.wav"
    sf.write(files["too large"], np.zeros(int(seconds * 16_000), np.float32), 16_000, subtype="PCM_16")
    files["over hard limit"] = folder / "over_hard_limit.png"  # over 4x the limit: Gradio refuses the upload
    files["over hard limit"].write_bytes(b"\x89PNG" + bytes(int(max_file_mb * 2**20 * 4.5)))
    return files


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def classify(reply) -> str:
    """'answered', 'refused in chat' or 'unanswered' for what /chat returned."""
    messages = reply if isinstance(reply, list) else [reply]
    if any(isinstance(m, dict) and (m.get("metadata") or {}).get("title") == ERROR_TITLE for m in messages):
        return "refused in chat"
    texts = [m if isinstance(m, str) else m.get("content") for m in messages if isinstance(m, (str, dict))]
    return "answered" if any(isinstance(t, str) and t.strip() for t in texts) else "unanswered"


def ask(client, kind: str, files: dict[str, Path], max_new_tokens: int) -> tuple[str, str]:
    """One /chat request of `kind` through gradio_client: (outcome, detail)."""
    from gradio_client import handle_file

    attached = {"text": [], "image": ["image"], "audio": ["audio"], "image+audio": ["image", "audio"]}.get(kind, [kind])
    message = {"text": f"A {kind} question: what is this?", "files": [handle_file(str(files[k])) for k in attached]}
    try:
        reply = client.predict(message, max_new_tokens, 0.0, False, "", api_name="/chat")  # system prompt last
    except Exception as error:  # gradio_client raises for uploads the server refuses, a full queue...
        text = " ".join(str(error).split())
        return ("refused by server" if text else "unanswered"), f"{type(error).__name__}: {text[:300]}"
    outcome = classify(reply)
    return outcome, (reply if isinstance(reply, str) else json.dumps(reply, ensure_ascii=False))[:120]


def attack(http, url: str, path: str) -> tuple[str, str]:
    """A raw /chat call naming a server file that was never uploaded; the handler must never see it."""
    body = {"data": [{"text": "Read this file", "files": [{"path": path, "meta": {"_type": "gradio.FileData"}}]},
                     8, 0.0, False, ""]}  # fmt: skip
    posted = http.post(f"{url}gradio_api/call/chat", json=body)
    if posted.status_code != 200:
        return "refused by server", f"HTTP {posted.status_code}"
    events = http.get(f"{url}gradio_api/call/chat/{posted.json()['event_id']}").text
    if "event: error" in events and "event: complete" not in events and "event: generating" not in events:
        return "refused by server", "error event (Gradio: the file was not uploaded by a user)"
    return "LEAKED", events[:200]  # the handler ran with a server path: the one outcome that must never happen


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"n": len(values), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1],
            "mean": statistics.fmean(values)}  # fmt: skip


def run_load(
    url: str,
    pid: int | None,
    clients: int = 16,
    seconds: float = 60.0,
    burst: int = 48,
    max_new_tokens: int = 16,
    max_file_mb: float = MAX_FILE_MB,
    seed: int = 0,
    work_dir: str | os.PathLike | None = None,
) -> dict:
    """Load the app at `url` and return the figures (see the module docstring)."""
    import httpx
    from gradio_client import Client

    files = make_files(Path(work_dir or tempfile.mkdtemp(prefix="load_test_")), max_file_mb)
    kinds, weights = list(MIX), list(MIX.values())
    records: list[tuple[str, str, float, str]] = []  # (kind, outcome, seconds, detail)
    lock = threading.Lock()
    memory: list[tuple[float, float]] = []
    stop = threading.Event()

    def watch_memory():
        while not stop.wait(0.5):
            if pid is not None:
                memory.append((time.monotonic() - start, rss_mb(pid)))

    def client_loop(index: int, deadline: float):
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(timeout=120) as http:
            n = 0
            while time.monotonic() < deadline:
                if n % TURNS_PER_CONVERSATION == 0:
                    client = Client(url, verbose=False, download_files=False)
                kind = rng.choices(kinds, weights)[0]
                began = time.monotonic()
                if kind == "attack":
                    outcome, detail = attack(http, url, ATTACK_PATHS[(index + n) % len(ATTACK_PATHS)])
                else:
                    outcome, detail = ask(client, kind, files, max_new_tokens)
                with lock:
                    records.append((kind, outcome, time.monotonic() - began, detail))
                n += 1

    # Warm up (first requests compile and allocate), then measure.
    warm = Client(url, verbose=False, download_files=False)
    for kind in ("text", "image", "audio"):
        ask(warm, kind, files, max_new_tokens)
    start = time.monotonic()
    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=client_loop, args=(i, start + seconds)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load_seconds = time.monotonic() - start

    # A burst larger than the queue: the excess is turned away with "Queue is full", not dropped.
    burst_outcomes: Counter = Counter()
    burst_details: dict[str, str] = {}
    if burst:
        barrier = threading.Barrier(burst)
        clients_for_burst = [Client(url, verbose=False, download_files=False) for _ in range(min(burst, 8))]

        def one(i: int):
            barrier.wait()
            outcome, detail = ask(clients_for_burst[i % len(clients_for_burst)], "text", files, max_new_tokens)
            with lock:
                burst_outcomes[outcome] += 1
                burst_details.setdefault(outcome, detail)

        burst_threads = [threading.Thread(target=one, args=(i,)) for i in range(burst)]
        for thread in burst_threads:
            thread.start()
        for thread in burst_threads:
            thread.join()
    after, _ = ask(warm, "text", files, max_new_tokens)
    stop.set()
    watcher.join()

    outcomes = Counter((kind, outcome) for kind, outcome, _, _ in records)
    by_kind = defaultdict(list)
    for kind, outcome, latency, _ in records:
        by_kind[kind].append(latency)
    examples = {}
    for kind, outcome, _, detail in records:
        examples.setdefault(f"{kind}: {outcome}", detail)
    rss = [mb for _, mb in memory]
    tenth = max(1, len(rss) // 10)
    middle = rss[max(0, len(rss) // 2 - tenth // 2) : len(rss) // 2 + tenth - tenth // 2]
    return {
        "clients": clients,
        "seconds": round(load_seconds, 1),
        "requests": len(records),
        "requests_per_second": round(len(records) / load_seconds, 2),
        "outcomes": dict(Counter(outcome for _, outcome, _, _ in records)),
        "outcomes_by_kind": {f"{kind}: {outcome}": n for (kind, outcome), n in sorted(outcomes.items())},
        "unanswered": sum(n for (_, outcome), n in outcomes.items() if outcome in ("unanswered", "LEAKED")),
        "leaked": sum(n for (_, outcome), n in outcomes.items() if outcome == "LEAKED"),
        "latency_s": {"all": percentiles([r[2] for r in records]), **{k: percentiles(v) for k, v in sorted(by_kind.items())}},
        "burst": {"requests": burst, "outcomes": dict(burst_outcomes), "examples": burst_details},
        "answers_after_load": after == "answered",
        "memory_mb": {
            "samples": len(rss),
            "start": round(statistics.median(rss[:tenth]), 1) if rss else None,  # medians of a tenth of the run
            "middle": round(statistics.median(middle), 1) if rss else None,
            "end": round(statistics.median(rss[-tenth:]), 1) if rss else None,
            "max": round(max(rss), 1) if rss else None,
            # The first half warms up (glibc gives each new worker thread its own arena, Gradio's pool
            # grows); a leak shows as growth after it.
            "growth_second_half": round(statistics.median(rss[-tenth:]) - statistics.median(middle), 1) if rss else None,
            "timeline": [(round(t, 1), round(mb)) for t, mb in memory[:: max(1, len(memory) // 40)]],
        },
        "examples": examples,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_checkpoint(folder: Path) -> Path:
    """A tiny random checkpoint (as the tests use), answers at least 8 tokens long."""
    from phi3mm.build import build_tiny_model, save_checkpoint

    model, processor = build_tiny_model(folder / "components")
    model.generation_config.min_new_tokens = 8
    return save_checkpoint(model, processor, folder / "checkpoint")


def start_app(model: Path, work: Path, max_file_mb: float, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """space/app.py as a user starts it, on a free port of 127.0.0.1; returns (process, url)."""
    port = free_port()
    no_asr = work / "no_asr_model"  # an empty folder: Whisper ASR is not part of this test
    no_asr.mkdir(exist_ok=True)
    log = open(work / "app.log", "w")
    command = [sys.executable, str(ROOT / "space" / "app.py"), "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--max_file_mb", str(max_file_mb), "--asr_model", str(no_asr)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}/"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the app did not start:\n{(work / 'app.log').read_text()[-3000:]}") from None
            time.sleep(0.25)


def stop_app(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=20)


def report(figures: dict) -> str:
    lines = [
        f"{figures['clients']} clients for {figures['seconds']} s: {figures['requests']} requests "
        f"({figures['requests_per_second']}/s); unanswered {figures['unanswered']}, leaked {figures['leaked']}",
        f"outcomes: {figures['outcomes']}",
    ]
    for kind, p in figures["latency_s"].items():
        lines.append(f"  latency {kind:16s} n={p['n']:4d}  p50 {p['p50']:.2f} s  p90 {p['p90']:.2f} s  "
                     f"p99 {p['p99']:.2f} s  max {p['max']:.2f} s")  # fmt: skip
    lines.append(f"burst of {figures['burst']['requests']}: {figures['burst']['outcomes']}")
    memory = figures["memory_mb"]
    if memory["samples"]:
        lines.append(f"server RSS (MB, medians of a tenth of the run): start {memory['start']}, middle {memory['middle']}, "
                     f"end {memory['end']} (second half {memory['growth_second_half']:+.1f}), max {memory['max']}")  # fmt: skip
    lines.append(f"answers after the load: {figures['answers_after_load']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--burst", type=int, default=48, help="simultaneous requests after the load (0: none)")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--model", default=None, help="checkpoint folder to serve (default: a tiny random one)")
    parser.add_argument("--url", default=None, help="an app already running (its --max_file_mb must be 0.5)")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the app's process id, to watch its memory")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="load_test_"))
    process = None
    try:
        if args.url:
            url, pid = args.url.rstrip("/") + "/", args.pid
        else:
            model = Path(args.model) if args.model else tiny_checkpoint(work)
            process, url = start_app(model, work, MAX_FILE_MB)
            pid = process.pid
        figures = run_load(url, pid, args.clients, args.seconds, args.burst, args.max_new_tokens, work_dir=work / "files")
    finally:
        if process is not None:
            stop_app(process)
    print(report(figures))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2, ensure_ascii=False))
    return figures


if __name__ == "__main__":
    main()
