"""Training faults: real `train_trainer.py` processes killed with SIGKILL mid-step and mid-save,
resumed with `--resume_from_checkpoint auto`, end where an uninterrupted run ends; a data set with
10% broken rows trains to the end with the count reported.

Each run is a subprocess on the tiny model (stage 1, projectors only: the part every stage trains),
killed by a small wrapper that patches one Trainer method to SIGKILL its own process at a chosen
point. tests/test_train.py covers resuming from a chosen checkpoint; this file covers the kills.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from phi3mm.build import build_tiny_model, save_checkpoint
from phi3mm.demo_data import make_demo_dataset
from phi3mm.training import checkpoint_is_complete, last_complete_checkpoint, resolve_resume

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, SAVE_STEPS = 10, 2
# Same seed, same CPU, same batches: only float reordering could move the loss, so the tolerance is tight.
LOSS_TOLERANCE = 1e-5
RECORD = ROOT / "outputs" / "reliability" / "faults.json"

# Runs train_trainer.main(argv) with one Trainer method patched to SIGKILL the process at FAULT:
#   step:K     while computing step K (after checkpoint K-1 or earlier was saved)
#   weights:K  after writing half of checkpoint-K's model.safetensors (its first file)
#   state:K    after writing half of checkpoint-K's trainer_state.json (its last file)
FAULTY_RUN = r"""
import os, signal, sys
from transformers import Trainer, TrainerState
import train_trainer
from phi3mm import training

kind, step = os.environ.get("FAULT", "none:0").split(":")
step = int(step)

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if kind == "step":
    training_step = training.MultimodalTrainer.training_step
    def killed_in_step(self, *args, **kwargs):
        if self.state.global_step == step - 1:
            die()
        return training_step(self, *args, **kwargs)
    training.MultimodalTrainer.training_step = killed_in_step
elif kind == "weights":
    save_model = Trainer.save_model
    def killed_writing_weights(self, output_dir=None, _internal_call=False):
        save_model(self, output_dir, _internal_call)
        if output_dir and os.path.basename(output_dir) == f"checkpoint-{step}":
            weights = os.path.join(output_dir, "model.safetensors")
            with open(weights, "r+b") as f:
                f.truncate(os.path.getsize(weights) // 2)
            die()
    Trainer.save_model = killed_writing_weights
elif kind == "state":
    save_to_json = TrainerState.save_to_json
    def killed_writing_state(self, json_path):
        save_to_json(self, json_path)
        if os.path.basename(os.path.dirname(json_path)) == f"checkpoint-{step}":
            with open(json_path) as f:
                text = f.read()
            with open(json_path, "w") as f:
                f.write(text[: len(text) // 2])
            die()
    TrainerState.save_to_json = killed_writing_state
train_trainer.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny base checkpoint and a 40-row demo set with 4 broken rows (10%)."""
    work = tmp_path_factory.mktemp("faults")
    model, processor = build_tiny_model(work / "components")
    save_checkpoint(model, processor, work / "base")
    data = work / "data"
    make_demo_dataset(data, n_train=40, n_eval=1)
    rows = json.loads((data / "train.json").read_text())
    images = [r for r in rows if "image" in r]
    png = (data / images[0]["image"]).read_bytes()
    for i, row in enumerate(images[1:3]):  # truncated downloads: found only when decoded
        row["image"] = f"images/truncated_{i}.png"
        (data / row["image"]).write_bytes(png[: len(png) // 3])
    images[3]["image"] = "images/not_there.png"
    clip = next(r for r in rows if "audio" in r)
    clip["audio"] = "audio/not_audio.wav"
    (data / clip["audio"]).write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt this is not audio")
    (data / "broken.json").write_text(json.dumps(rows))
    return work


def train_process(work: Path, out: Path, *extra: str, fault: str = "none:0") -> subprocess.CompletedProcess:
    argv = [
        "--model_name_or_path", work / "base", "--stage", "pretrain", "--data_path", work / "data" / "broken.json",
        "--image_folder", work / "data", "--audio_folder", work / "data", "--output_dir", out,
        "--per_device_train_batch_size", 4, "--max_steps", MAX_STEPS, "--save_strategy", "steps",
        "--save_steps", SAVE_STEPS, "--save_total_limit", 1, "--logging_steps", 1, "--learning_rate", 1e-3,
        "--seed", 3, "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", *extra,
    ]  # fmt: skip
    env = {**os.environ, "FAULT": fault, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", FAULTY_RUN, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def checkpoints(out: Path) -> dict[str, bool]:
    return {p.name: checkpoint_is_complete(p) for p in sorted(out.glob("checkpoint-*"))}


@pytest.mark.slow
def test_killed_mid_step_and_mid_save_resumes_to_the_same_final_loss(work, tmp_path):
    reference = train_process(work, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads((tmp_path / "reference" / "run_summary.json").read_text())
    # 10% broken rows: the run ends, and says what it skipped (the missing file up front, the rest
    # when first decoded; one epoch reads every row).
    assert expected["steps"] == MAX_STEPS
    assert expected["skipped_rows"] == {"missing image": 1, "unreadable image": 2, "unreadable audio": 1}

    out = tmp_path / "interrupted"
    kills = []
    # 1. SIGKILL while computing step 5: checkpoint-4 is the last one, and (save_total_limit 1) the only one.
    run = train_process(work, out, "--resume_from_checkpoint", "auto", fault="step:5")
    kills.append(("mid-step 5", run.returncode, checkpoints(out)))
    assert run.returncode == -signal.SIGKILL and checkpoints(out) == {"checkpoint-4": True}

    # 2. Resumed, then SIGKILL half-way through writing checkpoint-6's weights. checkpoint-4 is still
    # there (an incomplete save never rotates the last good one away), and it is the one to resume
    # from, though transformers' own get_last_checkpoint would pick the broken folder.
    run = train_process(work, out, "--resume_from_checkpoint", "auto", fault="weights:6")
    kills.append(("mid-save of weights 6", run.returncode, checkpoints(out)))
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert checkpoints(out) == {"checkpoint-4": True, "checkpoint-6": False}
    assert get_last_checkpoint(out) == str(out / "checkpoint-6")
    assert last_complete_checkpoint(out) == str(out / "checkpoint-4")
    with pytest.raises(ValueError, match="checkpoint-6 is incomplete.*checkpoint-4"):
        resolve_resume(str(out / "checkpoint-6"), out)

    # 3. Resumed again, then SIGKILL half-way through checkpoint-6's trainer_state.json, the last file.
    run = train_process(work, out, "--resume_from_checkpoint", "auto", fault="state:6")
    kills.append(("mid-save of trainer_state 6", run.returncode, checkpoints(out)))
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert checkpoints(out) == {"checkpoint-4": True, "checkpoint-6": False}
    assert (out / "checkpoint-6" / "optimizer.pt").is_file()  # all but the state file was written

    # 4. Resumed with the same command line: from checkpoint-4, to the end.
    run = train_process(work, out, "--resume_from_checkpoint", "auto")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipping" in run.stderr and "checkpoint-6: incomplete" in run.stderr
    resumed = json.loads((out / "run_summary.json").read_text())
    assert resumed["steps"] == MAX_STEPS
    loss_gap = abs(resumed["last_logged_loss"] - expected["last_logged_loss"])
    final = load_file(out / "model" / "model.safetensors")
    reference_weights = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    weight_gap = max((final[k] - reference_weights[k]).abs().max().item() for k in reference_weights)
    assert loss_gap <= LOSS_TOLERANCE, (resumed, expected)
    assert weight_gap <= 1e-5
    assert checkpoints(out) == {f"checkpoint-{MAX_STEPS}": True}

    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps({
        "kills": [{"at": at, "returncode": rc, "checkpoints_after": cks} for at, rc, cks in kills],
        "reference_last_loss": expected["last_logged_loss"], "resumed_last_loss": resumed["last_logged_loss"],
        "loss_gap": loss_gap, "max_weight_gap": weight_gap, "loss_tolerance": LOSS_TOLERANCE,
        "rows": 40, "broken_rows": expected["skipped_total"], "skipped_rows": expected["skipped_rows"],
    }, indent=2))  # fmt: skip
    print(f"\nfaults: {len(kills)} kills survived; final loss {resumed['last_logged_loss']:.6f} vs "
          f"{expected['last_logged_loss']:.6f} uninterrupted (gap {loss_gap:.1e}); weights gap {weight_gap:.1e}")


def test_completeness_and_resume_choices(tmp_path):
    out = tmp_path / "run"
    for step, state in [(2, {"global_step": 2}), (4, {"global_step": 4}), (6, None), (8, "{\"global_st")]:
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if state is not None:
            (folder / "trainer_state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    (out / "checkpoint-5").mkdir()  # a state file from another step does not count
    (out / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (out / "checkpoint-x").mkdir()

    assert checkpoints(out) == {
        "checkpoint-2": True, "checkpoint-4": True, "checkpoint-5": False, "checkpoint-6": False,
        "checkpoint-8": False, "checkpoint-x": False,
    }  # fmt: skip
    assert last_complete_checkpoint(out) == str(out / "checkpoint-4")
    for value in ("auto", "true", "last", "TRUE"):
        assert resolve_resume(value, out) == str(out / "checkpoint-4")
    assert resolve_resume(str(out / "checkpoint-2"), out) == str(out / "checkpoint-2")
    for value in (None, "", "false"):
        assert resolve_resume(value, out) is None
    with pytest.raises(ValueError, match="checkpoint-8 is incomplete"):
        resolve_resume(str(out / "checkpoint-8"), out)

    empty = tmp_path / "fresh"
    empty.mkdir()
    assert resolve_resume("auto", empty) is None  # a first start with the restart command line
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume("true", empty)
