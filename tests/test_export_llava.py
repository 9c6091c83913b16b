"""phi3mm.export_llava: the export is transformers' own LLaVA, and computes what our model computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from phi3mm import export_llava
from phi3mm.real_parts import phi35_tokenizer_path
from phi3mm.build import build_tiny_model, save_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("export")
    # with the audio branch, which the export drops, and the real Phi-3.5 tokenizer LlavaProcessor must carry
    model, processor = build_tiny_model(tmp / "c", tokenizer=phi35_tokenizer_path())
    src = save_checkpoint(model, processor, tmp / "ours")
    lines = []
    dst = export_llava.export_llava(src, tmp / "llava", log=lines.append)
    return src, dst, "\n".join(lines)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    pixels[20:50, 30:60] = (220, 30, 30)
    return Image.fromarray(pixels)


def test_processor_gives_the_same_inputs(exported, image):
    src, dst, _ = exported
    ours = AutoProcessor.from_pretrained(src, trust_remote_code=True)
    llava = AutoProcessor.from_pretrained(dst)
    assert isinstance(llava, LlavaProcessor)
    prompt = ours.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert llava.apply_chat_template(MESSAGES, add_generation_prompt=True) == prompt
    a = ours(text=prompt, images=image, return_tensors="pt")
    b = llava(text=prompt, images=image, return_tensors="pt")
    assert (a["input_ids"] == ours.image_token_id).sum() == ours.image_seq_length
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    torch.testing.assert_close(b["pixel_values"], a["pixel_values"], atol=1e-6, rtol=0)


def test_logits_and_greedy_tokens_match(exported, image):
    src, dst, _ = exported
    ours = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=torch.float32).eval()
    llava = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(src, trust_remote_code=True)
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        logits_ours = ours(**inputs).logits
        logits_llava = llava(**inputs).logits
    diff = (logits_ours - logits_llava).abs().max().item()
    print(f"max abs logit difference: {diff:.3g}")
    assert diff < 1e-4

    kwargs = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        tokens_ours = ours.generate(**inputs, **kwargs)
        tokens_llava = llava.generate(**inputs, **kwargs)
    assert tokens_ours.shape[1] > inputs["input_ids"].shape[1]
    assert tokens_ours.tolist() == tokens_llava.tolist()


def test_export_is_plain_llava_without_audio(exported):
    src, dst, log = exported
    assert "dropped the audio branch" in log
    keys = set()
    for path in dst.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys.update(f.keys())
    assert keys and not [k for k in keys if "audio" in k]
    # the layout of the llava-hf checkpoints, which vLLM and SGLang read
    assert {k.split(".")[0] for k in keys} == {"language_model", "vision_tower", "multi_modal_projector"}
    assert all(k.startswith("vision_tower.vision_model.") for k in keys if k.startswith("vision_tower"))
    config = json.loads((dst / "config.json").read_text())
    ours = json.loads((src / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert "audio_config" not in config and config["text_config"]["architectures"] == ["Phi3ForCausalLM"]
    assert config["image_token_index"] == ours["image_token_id"]
    assert config["image_seq_length"] == 16  # (64 / 16) ** 2 patches, CLS dropped
    for name in ("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act", "multimodal_projector_bias"):
        assert config[name] == ours[name]
    # nothing points at our remote code, and no feature extractor came along
    for path in dst.iterdir():
        text = path.read_text() if path.suffix in (".json", ".jinja") else ""
        assert "auto_map" not in text and "MultimodalProcessor" not in text and "phi3_projector" not in text
        assert not path.name.endswith(".py")
    assert "feature_extractor" not in json.loads((dst / "processor_config.json").read_text())


def test_pooled_model_is_refused(tmp_path):
    model, processor = build_tiny_model(tmp_path / "c", with_audio=False, image_token_pooling=2)
    src = save_checkpoint(model, processor, tmp_path / "ours")
    dst = tmp_path / "llava"
    with pytest.raises(export_llava.ExportError, match="image_token_pooling=2"):
        export_llava.export_llava(src, dst)
    assert not dst.exists()
    # the command line, run from the repository root, says so and exits non-zero
    result = subprocess.run(
        [sys.executable, "-m", "phi3mm.export_llava", str(src), str(dst)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "cannot export exactly to LLaVA" in result.stderr and "image_token_pooling=2" in result.stderr
    assert not dst.exists()


def test_column_ordered_model_is_refused(tmp_path):
    model, processor = build_tiny_model(tmp_path / "c", with_audio=False, image_token_order="columns")
    src = save_checkpoint(model, processor, tmp_path / "ours")
    with pytest.raises(export_llava.ExportError, match="image_token_order='columns'"):
        export_llava.export_llava(src, tmp_path / "llava")
    assert not (tmp_path / "llava").exists()
