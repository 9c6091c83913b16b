"""The app under load, and what /chat can be made to read.

The load test is phi3mm/load_test.py (run it standalone for the full figures: 16 clients for a
minute); here it runs shorter against space/app.py started as a user starts it. The file-access
test runs the app in this process, to see every path the chat handler is handed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import httpx
import pytest

from phi3mm import load_test
from space import app

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "outputs" / "reliability" / "load_test.json"
CLIENTS, SECONDS, BURST = 8, 20, 40


@pytest.mark.slow
def test_app_under_load_answers_or_refuses_every_request_and_holds_its_memory(tmp_path):
    checkpoint = load_test.tiny_checkpoint(tmp_path)
    # glibc gives each new thread its own malloc arena, which looks like growth for a while;
    # capping them makes a real leak stand out sooner (see RELIABILITY.md for the uncapped figures).
    process, url = load_test.start_app(checkpoint, tmp_path, load_test.MAX_FILE_MB, env={"MALLOC_ARENA_MAX": "2"})
    try:
        figures = load_test.run_load(url, process.pid, CLIENTS, SECONDS, BURST, work_dir=tmp_path / "files")
    finally:
        load_test.stop_app(process)
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(figures, indent=2, ensure_ascii=False))
    print("\n" + load_test.report(figures))

    assert figures["unanswered"] == 0 and figures["leaked"] == 0, figures["examples"]
    outcomes = figures["outcomes_by_kind"]
    for kind in ("text", "image", "audio", "image+audio"):
        assert outcomes.get(f"{kind}: answered", 0) >= 1, outcomes
    for kind in ("bad file", "too large"):  # a message in the chat, naming the file
        assert outcomes.get(f"{kind}: refused in chat", 0) >= 1 and f"{kind}: answered" not in outcomes, outcomes
    assert "exceeds the maximum file size" in figures["examples"]["over hard limit: refused by server"]
    assert set(k for k in outcomes if k.startswith("attack")) == {"attack: refused by server"}, outcomes

    burst = figures["burst"]["outcomes"]
    assert sum(burst.values()) == BURST and set(burst) <= {"answered", "refused by server"}, figures["burst"]
    if "refused by server" in burst:
        assert "Queue is full" in figures["burst"]["examples"]["refused by server"]
    assert figures["answers_after_load"]

    assert figures["latency_s"]["all"]["p99"] < 60
    memory = figures["memory_mb"]
    assert memory["samples"] >= 20 and memory["growth_second_half"] < 96, memory  # a smoke check: see RELIABILITY.md


# ---- what /chat can be made to read -------------------------------------------------------------



@pytest.fixture(scope="module")
def served(tiny):
    """The app in this process, on the session's tiny model; records every file the handler opens."""
    no_asr = tempfile.mkdtemp(prefix="no_asr_")
    assistant = app.Assistant(*tiny, asr_model=no_asr, max_file_mb=load_test.MAX_FILE_MB)
    seen: list[str] = []

    def spy(load):
        def opened(path, *args, **kwargs):
            seen.append(os.path.realpath(path))
            return load(path, *args, **kwargs)

        return opened

    assistant._load_image, assistant._load_audio = spy(assistant._load_image), spy(assistant._load_audio)
    demo = app.build_demo(assistant)
    port = load_test.free_port()
    app.launch(demo, "127.0.0.1", port, load_test.MAX_FILE_MB, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", seen
    demo.close()


def call_chat(url: str, files: list) -> str:
    body = {"data": [{"text": "What is in this file?", "files": files}, 4, 0.0, False, ""]}  # the inputs in order, system prompt last
    with httpx.Client(timeout=120) as http:
        posted = http.post(f"{url}gradio_api/call/chat", json=body)
        if posted.status_code != 200:
            return f"HTTP {posted.status_code}"
        return http.get(f"{url}gradio_api/call/chat/{posted.json()['event_id']}").text


@pytest.mark.parametrize("path", load_test.ATTACK_PATHS + ["/tmp/gradio", "/", "~/.bashrc", "%2e%2e/%2e%2e/etc/passwd"])
@pytest.mark.parametrize("with_meta", [True, False], ids=["filedata", "bare_path"])
def test_chat_cannot_be_made_to_read_files_that_were_not_uploaded(served, path, with_meta):
    """Gradio refuses the call, or (the upload folder itself, a folder) the handler says the upload
    is missing; either way no file is opened."""
    url, seen = served
    before = len(seen)
    item = {"path": path, "meta": {"_type": "gradio.FileData"}} if with_meta else {"path": path}
    events = call_chat(url, [item])
    refused = "event: error" in events and "event: complete" not in events
    assert refused or ("event: complete" in events and "the uploaded file is missing" in events), events[:500]
    assert len(seen) == before, f"the handler opened {seen[before:]}"


def test_uploads_reach_the_handler_only_from_the_upload_folder_and_over_the_limit_never_land(served, tmp_path):
    url, seen = served
    from gradio.utils import get_upload_folder

    upload_folder = os.path.realpath(get_upload_folder())
    image = ROOT / "space" / "examples" / "red_circle.png"
    with httpx.Client(timeout=60) as http:
        # A name that tries to climb out of the upload folder lands inside it.
        uploaded = http.post(f"{url}gradio_api/upload", files={"files": ("../../../../tmp/evil.png", image.read_bytes())})
        (stored,) = uploaded.json()
        assert os.path.realpath(stored).startswith(upload_folder + os.sep), stored
        # Over the hard limit (4x the chat's): refused before anything is written.
        too_big = bytes(int(load_test.MAX_FILE_MB * 2**20 * 4.5))
        refused = http.post(f"{url}gradio_api/upload", files={"files": ("big.png", too_big)})
        assert refused.status_code == 413 and "File size exceeded" in refused.text
    events = call_chat(url, [{"path": stored, "meta": {"_type": "gradio.FileData"}}])
    assert "event: complete" in events, events[:500]
    assert seen and all(path.startswith(upload_folder + os.sep) for path in seen), seen
