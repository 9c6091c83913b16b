"""Precomputed vision features: same logits as pixels, resume, meta checks, dataset use, failures, atomic writes."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phi3mm.feature_cache as feature_cache
import phi3mm.vision_cache as vc
from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration
from phi3mm.build import build_tiny_model, save_checkpoint
from phi3mm.data import LlavaDataset, MultimodalCollator, read_rows
from phi3mm.demo_data import make_demo_dataset
from processing_multimodal import MultimodalProcessor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny checkpoint, a small demo data set, and an fp16 and an fp32 cache of its images."""
    root = tmp_path_factory.mktemp("vision_cache")
    model, processor = build_tiny_model(root / "components", with_audio=False)
    checkpoint = save_checkpoint(model, processor, root / "checkpoint")
    data = make_demo_dataset(root / "data", n_train=15, n_eval=1)
    summaries = {}
    for dtype in ("float16", "float32"):
        summaries[dtype] = vc.main(["--model", str(checkpoint), "--data_path", data["train"], "--image_folder",
                                    data["image_folder"], "--cache_dir", str(root / dtype), "--dtype", dtype,
                                    "--batch_size", "4", "--device", "cpu"])  # fmt: skip
    model = Phi3ProjectorForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    rows = [row for row in read_rows(data["train"]) if "image" in row]
    return dict(root=root, checkpoint=checkpoint, data=data, summaries=summaries, model=model, rows=rows,
                processor=MultimodalProcessor.from_pretrained(checkpoint, trust_remote_code=True))  # fmt: skip


def batch(setup, cache=None):
    dataset = LlavaDataset(setup["rows"], setup["processor"], setup["data"]["image_folder"], vision_cache=cache)
    items = [dataset[i] for i in range(len(dataset))]
    return items, MultimodalCollator(setup["processor"].tokenizer.pad_token_id)(items)


def test_cached_features_give_the_logits_of_pixels(setup):
    model = setup["model"]
    n_images = len({row["image"] for row in setup["rows"]})
    assert setup["summaries"]["float32"]["computed"] == n_images > 3
    _, pixels = batch(setup)
    with torch.no_grad():
        reference = model(**{k: v for k, v in pixels.items() if k != "labels"}).logits
        for dtype, atol in (("float32", 1e-5), ("float16", 2e-3)):  # fp16 storage: measured 1e-4 (logits ~0.7)
            cache = vc.VisionFeatureCache(setup["root"] / dtype, model.config)
            items, cached = batch(setup, cache)
            assert all("vision_features" in item and "pixel_values" not in item for item in items)
            assert cached["vision_features"].dtype == getattr(torch, dtype)
            assert torch.equal(cached["input_ids"], pixels["input_ids"])
            logits = model(input_ids=cached["input_ids"], attention_mask=cached["attention_mask"],
                           vision_features=cached["vision_features"]).logits  # fmt: skip
            torch.testing.assert_close(logits, reference, atol=atol, rtol=0)
        cache.check_model(model)  # the full model's tower has the fingerprint the builder recorded


def test_rerun_reuses_everything_and_resumes_a_deleted_entry(setup):
    args = ["--model", str(setup["checkpoint"]), "--data_path", setup["data"]["train"],
            "--image_folder", setup["data"]["image_folder"], "--cache_dir", str(setup["root"] / "float16")]  # fmt: skip
    n_images = setup["summaries"]["float16"]["total"]
    # The command as a user runs it, in a fresh process.
    run = subprocess.run([sys.executable, "-m", "phi3mm.vision_cache", *args, "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"{n_images} images, 0 computed, {n_images} reused, 0 failed" in run.stdout

    cache = vc.VisionFeatureCache(setup["root"] / "float16", setup["model"].config)
    name = setup["rows"][0]["image"]
    cache.path(name).unlink()
    with pytest.raises(ValueError, match=name):
        cache.load(name)
    dataset = LlavaDataset(setup["rows"][:2], setup["processor"], setup["data"]["image_folder"], vision_cache=cache)
    dataset[0]  # the row without features is skipped (replaced by the next) and counted
    assert dataset.skipped["bad row"] == 1
    summary = vc.main(args)
    assert (summary["computed"], summary["reused"]) == (1, n_images - 1)
    assert cache.load(name).shape == cache.shape


def test_mismatched_model_is_refused_naming_the_field(setup):
    model, root = setup["model"], setup["root"]
    config = copy.deepcopy(model.config)
    config.vision_feature_layer = -1  # the tiny tower's last layer; the cache holds the penultimate
    with pytest.raises(ValueError, match="vision_feature_layer"):
        vc.VisionFeatureCache(root / "float32", config)
    with pytest.raises(ValueError, match="fingerprint"):
        vc.VisionFeatureCache(root / "float32", model.config, fingerprint="0" * 64)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.vision_tower.embeddings.patch_embedding.weight.add_(0.01)
    with pytest.raises(ValueError, match="fingerprint"):
        vc.VisionFeatureCache(root / "float32", model.config).check_model(changed)
    with pytest.raises(ValueError, match="fingerprint"):  # the builder refuses to mix towers in one cache
        vc.build_cache(changed, setup["processor"], setup["data"]["train"], root / "float32")
    with pytest.raises(ValueError, match="dtype"):  # nor storage dtypes
        vc.build_cache(model, setup["processor"], setup["data"]["train"], root / "float32", dtype="float16")
    with pytest.raises(ValueError, match="meta.json"):
        vc.VisionFeatureCache(root / "no_such_cache", model.config)


def test_dataset_with_cache_trains(setup):
    model = Phi3ProjectorForConditionalGeneration.from_pretrained(setup["checkpoint"], dtype=torch.float32)
    model.train()
    cache = vc.VisionFeatureCache(setup["root"] / "float16", model.config)
    _, inputs = batch(setup, cache)
    assert "pixel_values" not in inputs and inputs["vision_features"].shape[1:] == cache.shape
    loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_missing_and_unreadable_images_are_listed_not_fatal(setup, tmp_path, capsys):
    rows = setup["rows"][:2] + [
        {**setup["rows"][0], "id": "gone", "image": "images/gone.png"},
        {**setup["rows"][0], "id": "bad", "image": "broken.png"},
    ]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "images").symlink_to(Path(setup["data"]["image_folder"]) / "images")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    summary = vc.main(["--model", str(setup["checkpoint"]), "--data_path", str(tmp_path / "rows.json"),
                       "--image_folder", str(tmp_path), "--cache_dir", str(tmp_path / "cache")])  # fmt: skip
    assert (summary["computed"], summary["failed"], summary["missing"], summary["unreadable"]) == (2, 2, 1, 1)
    assert set(summary["failures"]) == {"images/gone.png", "broken.png"}
    printed = capsys.readouterr().out
    assert "2 failed (1 missing, 1 unreadable)" in printed and "images/gone.png: missing" in printed
    assert json.loads((tmp_path / "cache" / "summary.json").read_text())["failed"] == 2


def test_interrupted_writes_leave_no_partial_entry(setup, tmp_path, monkeypatch):
    real_open, calls = open, []

    class HalfWriter:
        """A file that writes half of what it is given, then raises `error`."""

        def __init__(self, file, error):
            self.file, self.error = file, error

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            raise self.error

    def open_failing_at(n, error):
        def fake_open(path, *args, **kwargs):
            calls.append(path)
            file = real_open(path, *args, **kwargs)
            return HalfWriter(file, error) if len(calls) == n else file

        return fake_open

    # One entry: a failing write leaves neither the entry nor its temporary file.
    cache = vc.VisionFeatureCache(setup["root"] / "float32")
    monkeypatch.setattr(feature_cache, "open", open_failing_at(1, OSError("disk full")), raising=False)
    with pytest.raises(OSError, match="disk full"):
        cache.save("images/new.png", torch.zeros(cache.shape))
    assert not cache.path("images/new.png").exists() and not list(cache.path("images/new.png").parent.glob("*.tmp"))

    # A build interrupted during its third entry (calls: meta.json, entry 1, entry 2, entry 3): two
    # whole entries, no partial one; the rerun computes the rest.
    calls.clear()
    monkeypatch.setattr(feature_cache, "open", open_failing_at(4, KeyboardInterrupt()), raising=False)
    out = tmp_path / "cache"
    build = (setup["model"], setup["processor"], setup["data"]["train"], out, setup["data"]["image_folder"])
    with pytest.raises(KeyboardInterrupt):
        vc.build_cache(*build)
    assert len(list(out.rglob("*.safetensors"))) == 2 and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    summary = vc.build_cache(*build)
    assert summary["reused"] == 2 and summary["computed"] == summary["total"] - 2
    cache = vc.VisionFeatureCache(out, setup["model"].config)
    assert all(cache.load(row["image"]).shape == cache.shape for row in setup["rows"])


def test_training_refuses_a_cache_of_another_tower_and_a_trained_tower(setup, tmp_path):
    """train_trainer with --vision_cache_dir: a checkpoint whose tower differs from the cache's (here:
    another seed, same shapes) stops before training; so does a run that trains the tower."""
    from phi3mm.training import DataArguments, ModelArguments, train
    from transformers import TrainingArguments

    other, processor = build_tiny_model(tmp_path / "components", with_audio=False, seed=1)
    other_checkpoint = save_checkpoint(other, processor, tmp_path / "other")
    data = setup["data"]

    def run(checkpoint, **model_options):
        model_args = ModelArguments(model_name_or_path=str(checkpoint), stage="pretrain", **model_options)
        data_args = DataArguments(data_path=data["train"], image_folder=data["image_folder"],
                                  vision_cache_dir=str(setup["root"] / "float32"))  # fmt: skip
        training_args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none",
                                          per_device_train_batch_size=2, save_strategy="no")  # fmt: skip
        return train(model_args, data_args, training_args)

    with pytest.raises(ValueError, match="fingerprint.*python -m phi3mm.vision_cache"):
        run(other_checkpoint)
    with pytest.raises(ValueError, match="--train_vision_tower changes the tower"):
        run(setup["checkpoint"], train_vision_tower=True)
    assert run(setup["checkpoint"])["steps"] == 1  # the cache of this very tower trains
