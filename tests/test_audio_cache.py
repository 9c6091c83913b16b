"""Precomputed Whisper encoder output: the loss of raw audio, multi-window clips, failures counted,
stale caches and trained towers refused."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import TrainingArguments

import phi3mm.audio_cache as ac
from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration
from phi3mm.build import build_tiny_model, save_checkpoint
from phi3mm.data import LlavaDataset, MultimodalCollator
from processing_multimodal import MultimodalProcessor

pytestmark = pytest.mark.usefixtures("one_thread")
SR = 16_000


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint whose Whisper windows are 2 s (so a 3.1 s clip has two windows), clips of
    several lengths, and their cache in float32."""
    root = tmp_path_factory.mktemp("audio_cache")
    model, processor = build_tiny_model(root / "components", audio_window_seconds=2)
    checkpoint = save_checkpoint(model, processor, root / "checkpoint")
    rng = np.random.default_rng(0)
    (root / "audio").mkdir()
    rows = []
    for i, seconds in enumerate((0.3, 0.95, 1.7, 3.1, 0.5)):
        t = np.arange(int(seconds * SR)) / SR
        sf.write(root / "audio" / f"clip{i}.wav", (0.5 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)).astype(np.float32), SR)
        rows.append({"id": f"r{i}", "audio": f"audio/clip{i}.wav",
                     "conversations": [{"from": "human", "value": "<audio>\nIs the tone high or low?"},
                                       {"from": "gpt", "value": "high."}]})  # fmt: skip
    (root / "rows.json").write_text(json.dumps(rows))
    summary = ac.main(["--model", str(checkpoint), "--data_path", str(root / "rows.json"), "--audio_folder", str(root),
                       "--cache_dir", str(root / "cache"), "--dtype", "float32", "--batch_size", "3", "--device", "cpu"])  # fmt: skip
    model = Phi3ProjectorForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = MultimodalProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    return dict(root=root, checkpoint=checkpoint, rows=rows, summary=summary, model=model, processor=processor)


def collated(setup, cache=None):
    dataset = LlavaDataset(setup["rows"], setup["processor"], audio_folder=setup["root"], audio_cache=cache)
    return MultimodalCollator(setup["processor"].tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def test_cached_encoder_output_gives_the_loss_and_logits_of_raw_audio(setup):
    model, summary = setup["model"], setup["summary"]
    assert (summary["computed"], summary["failed"]) == (5, 0)
    raw = collated(setup)
    cache = ac.AudioFeatureCache(setup["root"] / "cache", model.config, fingerprint=ac.tower_fingerprint(model))
    cached = collated(setup, cache)
    assert "input_features" not in cached and cached["audio_encoder_states"].shape[0] == 6  # the 3.1 s clip: 2 windows
    # Only the real frames are kept: the longest window holds 2 s = 100 encoder frames, the 0.3 s clip 15.
    assert cached["audio_encoder_states"].shape[1] == 100
    assert ac.AudioFeatureCache(setup["root"] / "cache").load("audio/clip0.wav")["states"].shape[1] == 15
    assert torch.equal(cached["input_ids"], raw["input_ids"])
    assert torch.equal(cached["input_features_mask"], raw["input_features_mask"])
    with torch.no_grad():
        reference, from_cache = model(**raw), model(**cached)
    torch.testing.assert_close(from_cache.logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_cache.loss, reference.loss)


def test_rerun_reuses_and_failures_are_counted(setup, tmp_path):
    rows = setup["rows"] + [
        {"id": "gone", "audio": "audio/gone.wav", "conversations": setup["rows"][0]["conversations"]},
        {"id": "bad", "audio": "audio/bad.wav", "conversations": setup["rows"][0]["conversations"]},
    ]
    (setup["root"] / "audio" / "bad.wav").write_bytes(b"RIFF....WAVE not audio")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    summary = ac.main(["--model", str(setup["checkpoint"]), "--data_path", str(tmp_path / "rows.json"), "--audio_folder",
                       str(setup["root"]), "--cache_dir", str(setup["root"] / "cache"), "--dtype", "float32"])  # fmt: skip
    assert (summary["reused"], summary["computed"], summary["missing"], summary["unreadable"]) == (5, 0, 1, 1)
    with pytest.raises(ValueError, match="dtype is 'float32' in the cache but 'float16'"):
        ac.main(["--model", str(setup["checkpoint"]), "--data_path", str(tmp_path / "rows.json"),
                 "--audio_folder", str(setup["root"]), "--cache_dir", str(setup["root"] / "cache")])  # fmt: skip


def test_model_takes_audio_one_way(setup):
    model, batch = setup["model"], collated(setup)
    with pytest.raises(ValueError, match="exactly one"):
        model.get_audio_features(batch["input_features"], batch["input_features_mask"], torch.zeros(6, 10, 32))
    with pytest.raises(ValueError, match="hold 3 frames; the audio needs 15"):
        model.get_audio_features(None, batch["input_features_mask"][:1], torch.zeros(1, 3, model.config.audio_config.d_model))


def test_training_refuses_a_stale_cache_and_a_trained_tower(setup, tmp_path):
    from phi3mm.training import DataArguments, ModelArguments, train

    other, processor = build_tiny_model(tmp_path / "components", audio_window_seconds=2, seed=1)
    other_checkpoint = save_checkpoint(other, processor, tmp_path / "other")

    def run(checkpoint, **model_options):
        model_args = ModelArguments(model_name_or_path=str(checkpoint), stage="pretrain", **model_options)
        data_args = DataArguments(data_path=str(setup["root"] / "rows.json"), audio_folder=str(setup["root"]),
                                  audio_cache_dir=str(setup["root"] / "cache"))  # fmt: skip
        training_args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, report_to="none",
                                          per_device_train_batch_size=2, save_strategy="no", use_cpu=True)  # fmt: skip
        return train(model_args, data_args, training_args)

    with pytest.raises(ValueError, match="fingerprint.*python -m phi3mm.audio_cache"):
        run(other_checkpoint)
    with pytest.raises(ValueError, match="--audio_cache_dir holds features of a fixed tower, but --train_audio_tower"):
        run(setup["checkpoint"], train_audio_tower=True)
    summary = run(setup["checkpoint"])  # the cache of this very tower trains
    assert summary["steps"] == 2 and summary["skipped_total"] == 0
