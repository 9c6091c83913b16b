"""The audio alignment stage: distillation from the text path (phi3mm.align) through train_trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from conftest import shape_image, tone
from modeling_phi3_projector import IGNORE_INDEX
from phi3mm.align import AlignmentCollator, AlignmentDataset, distillation_loss, response_logits, teacher_messages
from phi3mm.build import build_tiny_model, save_checkpoint
from train_trainer import main

QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--save_strategy", "no"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls on one thread


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Spoken-question rows (an image, an <audio> question, its transcript, an answer) and ASR rows."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("align_data")
    Image.fromarray(shape_image()).save(folder / "red.png")
    rows, asr = [], []
    for i, (freq, words) in enumerate([(300, "what color is the shape"), (2000, "is the shape on the left"),
                                       (600, "what shape is this"), (1200, "how many shapes are there")] * 4):  # fmt: skip
        sf.write(folder / f"q{i}.wav", tone(freq + 10 * i, seconds=0.6), 16_000)
        rows.append({"id": i, "image": "red.png", "audio": f"q{i}.wav", "transcripts": [words],
                     "conversations": [{"from": "human", "value": "<image>\n<audio>"},
                                       {"from": "gpt", "value": "red."}]})  # fmt: skip
        asr.append({"audio": f"q{i}.wav", "text": words})
    rows.append({"id": "no transcript", "audio": "q0.wav", "conversations": rows[0]["conversations"]})
    (folder / "spoken.json").write_text(json.dumps(rows))
    sounds = [{"id": f"sound{i}", "audio": f"q{i}.wav", "conversations": [
        {"from": "human", "value": "<audio>\nIs the tone high or low?"}, {"from": "gpt", "value": "high." if i % 2 else "low."}]}
        for i in range(6)]  # fmt: skip
    (folder / "sounds.json").write_text(json.dumps(sounds))  # rehearsal rows: no transcript needed
    (folder / "asr.jsonl").write_text("\n".join(json.dumps(r) for r in asr))
    return folder


def test_teacher_reads_each_transcript_where_its_audio_was():
    messages = [{"role": "user", "content": "<image>\n<audio> and <audio>"}, {"role": "assistant", "content": "ok"}]
    assert teacher_messages(messages, ["one", "two"], "<audio>")[0]["content"] == "<image>\none and two"


def test_student_and_teacher_supervise_the_same_answer(base, data):
    from processing_multimodal import MultimodalProcessor

    processor = MultimodalProcessor.from_pretrained(base, trust_remote_code=True)
    dataset = AlignmentDataset(json.loads((data / "spoken.json").read_text()), processor, data, data)
    assert dataset.skipped == {"no transcript": 1} and len(dataset) == 16
    item = dataset[0]
    answer = lambda ids, labels: ids[labels != IGNORE_INDEX].tolist()  # noqa: E731
    assert answer(item["input_ids"], item["labels"]) == answer(item["teacher_input_ids"], item["teacher_labels"])
    teacher_text = processor.tokenizer.decode(item["teacher_input_ids"])
    assert "what color is the shape" in teacher_text and processor.audio_token not in teacher_text
    assert (item["input_ids"] == processor.audio_token_id).sum() > 0 and "teacher_input_features" not in item
    assert torch.equal(item["pixel_values"], item["teacher_pixel_values"])  # the teacher sees the image too
    batch = AlignmentCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["teacher_input_ids"].shape[0] == batch["input_ids"].shape[0] == 2


def test_distillation_loss_is_zero_for_identical_inputs_and_trains_only_the_audio_path(base, data):
    from phi3mm.training import ModelArguments, prepare_for_training
    from processing_multimodal import MultimodalProcessor
    from transformers import AutoModelForCausalLM, TrainingArguments

    processor = MultimodalProcessor.from_pretrained(base, trust_remote_code=True)
    dataset = AlignmentDataset(json.loads((data / "spoken.json").read_text()), processor, data, data)
    batch = AlignmentCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True)
    model = prepare_for_training(model, ModelArguments(stage="audio_align", tuning="full"), TrainingArguments("unused"))
    model.train()
    same = {**{k: v for k, v in batch.items() if not k.startswith("teacher_")},
            **{f"teacher_{k}": v for k, v in batch.items() if not k.startswith("teacher_")}}  # fmt: skip
    assert distillation_loss(model, same).item() == pytest.approx(0.0, abs=1e-6)
    loss = distillation_loss(model, batch, temperature=2.0)
    loss.backward()
    assert loss.item() > 0
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(name.startswith("model.audio_projector.") for name in trained)


@pytest.mark.parametrize("tuning", [["--tuning", "full"], ["--tuning", "qlora", "--audio_lora_r", "4"]], ids=["full", "qlora"])
def test_audio_align_stage_learns_and_keeps_the_language_model(base, data, tmp_path, tuning):
    out = tmp_path / "aligned"
    summary = main([
        "--model_name_or_path", str(base), "--stage", "audio_align", *tuning, "--bnb_compute_dtype", "float32",
        "--data_path", str(data / "spoken.json"), "--image_folder", str(data), "--audio_folder", str(data),
        "--output_dir", str(out), "--learning_rate", "1e-2", "--per_device_train_batch_size", "4", "--max_steps", "24",
        "--logging_steps", "4", "--align_temperature", "1.0", *QUIET,
    ])  # fmt: skip
    assert summary["skipped_rows"] == {"no transcript": 1} and summary["tuning"] == "audio projector"
    assert summary["last_logged_loss"] < 0.5 * summary["first_logged_loss"], summary
    before, after = load_file(base / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    for name, weight in before.items():
        if name.startswith(("model.audio_projector.", "model.audio_tower.")):
            continue
        # the saved LM is the original full-precision one, not the 4-bit copy the qlora run held
        assert torch.equal(weight, after[name]), f"{name} changed: only the audio path trains"
    assert not torch.equal(before["model.audio_projector.linear_1.weight"], after["model.audio_projector.linear_1.weight"])
    # the chat app reads this to send spoken questions to the model's own ears
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["speech_aligned"] is True and json.loads((base / "config.json").read_text())["speech_aligned"] is False


def test_rehearsal_rows_add_their_cross_entropy_to_the_distillation(base, data):
    """A batch mixing a spoken-question row and a rehearsal row (a sound question, no transcript): the
    teacher reads only the first; the loss is the first's KL plus the second's cross-entropy, summed
    over their response tokens and divided by their number."""
    from phi3mm.training import ModelArguments, prepare_for_training
    from processing_multimodal import MultimodalProcessor
    from transformers import AutoModelForCausalLM, TrainingArguments

    processor = MultimodalProcessor.from_pretrained(base, trust_remote_code=True)
    rows, sounds = (json.loads((data / name).read_text()) for name in ("spoken.json", "sounds.json"))
    dataset = AlignmentDataset(rows, processor, data, data, rehearsal_rows=sounds)
    assert len(dataset) == 16 + 6 and dataset.skipped == {"no transcript": 1}  # rehearsal rows are not skipped
    spoken, sound = dataset[0], dataset[16]
    assert "teacher_input_ids" in spoken and not any(key.startswith("teacher_") for key in sound)
    collate = AlignmentCollator(processor.tokenizer.pad_token_id)
    mixed = collate([spoken, sound])
    assert mixed["rehearsal"].tolist() == [False, True] and mixed["teacher_input_ids"].shape[0] == 1
    assert "rehearsal" not in collate([sound, sound])  # a batch of one kind needs no flags

    model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True)
    model = prepare_for_training(model, ModelArguments(stage="audio_align", tuning="full"), TrainingArguments("unused"))
    tokens = lambda item: int((item["labels"][1:] != IGNORE_INDEX).sum())  # noqa: E731
    with torch.no_grad():
        kl = distillation_loss(model, collate([spoken])) * tokens(spoken)
        ce = model(**collate([sound])).loss * tokens(sound)
        assert distillation_loss(model, collate([sound])).item() == pytest.approx(ce.item() / tokens(sound), rel=1e-5)
        both = distillation_loss(model, mixed)
    assert kl > 0 and both.item() == pytest.approx((kl + ce).item() / (tokens(spoken) + tokens(sound)), rel=1e-4)

    # The head ran only where a row supervises: the same logits as the full ones at those positions.
    inputs = {k: v for k, v in mixed.items() if not k.startswith("teacher_") and k not in ("labels", "rehearsal")}
    labels = mixed["labels"]
    with torch.no_grad():
        logits, supervised, targets = response_logits(model, inputs, labels)
        full = model(**inputs).logits[:, :-1]
    assert logits.shape[1] < full.shape[1]
    assert torch.allclose(logits[supervised], full[labels[:, 1:] != IGNORE_INDEX], atol=1e-5)
    assert torch.equal(targets[supervised], labels[:, 1:][labels[:, 1:] != IGNORE_INDEX])


def test_rehearsal_rows_train_beside_the_alignment_rows(base, data, tmp_path):
    arguments = ["--model_name_or_path", str(base), "--data_path", str(data / "spoken.json"), "--image_folder", str(data),
                 "--audio_folder", str(data), "--rehearsal_data_path", str(data / "sounds.json"), "--tuning", "full",
                 "--per_device_train_batch_size", "4", "--max_steps", "3", *QUIET]  # fmt: skip
    summary = main([*arguments, "--stage", "audio_align", "--output_dir", str(tmp_path / "aligned")])
    assert summary["rows"] == 16 + 6 and summary["rehearsal_rows"] == 6 and summary["steps"] == 3
    assert summary["skipped_rows"] == {"no transcript": 1}
    with pytest.raises(ValueError, match="--rehearsal_data_path belongs to --stage audio_align"):
        main([*arguments, "--stage", "finetune", "--output_dir", str(tmp_path / "finetune")])


def test_asr_rows_get_the_teachers_continuation_and_train(base, data, tmp_path):
    out = tmp_path / "asr"
    summary = main([
        "--model_name_or_path", str(base), "--stage", "audio_align", "--tuning", "full", "--audio_lora_r", "4",
        "--data_path", str(data / "asr.jsonl"), "--audio_folder", str(data), "--output_dir", str(out),
        "--learning_rate", "1e-2", "--per_device_train_batch_size", "4", "--max_steps", "4", *QUIET,
    ])  # fmt: skip
    continuations = json.loads((out / "continuations.json").read_text())
    assert len(continuations) == 4 and all(isinstance(text, str) for text in continuations.values())
    assert summary["steps"] == 4 and (out / "model" / "model.safetensors").is_file()
    before, after = load_file(base / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(n.startswith(("model.audio_tower.", "model.audio_projector.")) for n in changed)
    assert any(n.startswith("model.audio_tower.") for n in changed)  # the encoder's LoRA, merged


def test_ce_transcription_option_and_a_model_without_ears(base, data, tmp_path):
    summary = main([
        "--model_name_or_path", str(base), "--stage", "audio_align", "--tuning", "full", "--align_loss", "ce",
        "--data_path", str(data / "asr.jsonl"), "--audio_folder", str(data), "--output_dir", str(tmp_path / "ce"),
        "--per_device_train_batch_size", "4", "--max_steps", "2", *QUIET,
    ])  # fmt: skip
    assert summary["steps"] == 2 and not (tmp_path / "ce" / "continuations.json").exists()
    deaf, processor = build_tiny_model(tmp_path / "components", with_audio=False)
    deaf_base = save_checkpoint(deaf, processor, tmp_path / "deaf")
    with pytest.raises(ValueError, match="needs a model with an audio tower"):
        main(["--model_name_or_path", str(deaf_base), "--stage", "audio_align", "--data_path", str(data / "asr.jsonl"),
              "--output_dir", str(tmp_path / "deaf_out"), *QUIET])  # fmt: skip


def test_qlora_alignment_without_an_adapter_says_what_to_do(base, data, tmp_path):
    with pytest.raises(ValueError, match="--audio_lora_r 8"):
        main(["--model_name_or_path", str(base), "--stage", "audio_align", "--tuning", "qlora", "--data_path",
              str(data / "asr.jsonl"), "--audio_folder", str(data), "--output_dir", str(tmp_path / "q"), *QUIET])  # fmt: skip


@pytest.mark.slow
def test_audio_align_under_two_process_ddp_on_cpu(base, data, tmp_path):
    """The teacher's no-grad forward and the student's forward in one DDP step; the ASR rows'
    continuations generated by rank 0 and read from its cache by rank 1."""
    import os
    import subprocess
    import sys

    from phi3mm.load_test import free_port

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "configs/accelerate/ddp.yaml"),
        "--num_processes", "2", "--main_process_port", str(free_port()), str(root / "train_trainer.py"),
        "--model_name_or_path", str(base), "--stage", "audio_align", "--tuning", "full",
        "--data_path", str(data / "asr.jsonl"), "--audio_folder", str(data), "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--max_steps", "3", "--logging_steps", "1", "--use_cpu", "true", *QUIET,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and (out / "model" / "model.safetensors").is_file()
