"""SigLIP vision towers beside CLIP: no CLS token to drop, pooling on an odd grid, a training step,
the feature cache's shape, and the LLaVA export's logits parity. Tiny towers, built offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    LlavaForConditionalGeneration,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from phi3mm.build import build_model_and_processor, make_tiny_components, save_checkpoint

PROMPT = "<|user|>\n<image>\nWhat color is the shape?<|end|>\n<|assistant|>\n"


def siglip_folder(folder: Path, image_size: int, patch_size: int) -> Path:
    """A tiny random SigLIP vision tower and its image processor, saved as a checkpoint folder."""
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=image_size, patch_size=patch_size)  # fmt: skip
    SiglipVisionModel(config).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("siglip")
    paths = make_tiny_components(work / "tiny")
    paths["siglip"] = siglip_folder(work / "siglip", image_size=64, patch_size=16)  # 4 x 4 patches
    paths["siglip27"] = siglip_folder(work / "siglip27", image_size=108, patch_size=4)  # 27 x 27, as so400m/384
    return paths


def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    pixels[20:50, 30:60] = (220, 30, 30)
    return Image.fromarray(pixels)


def test_siglip_keeps_every_patch_and_runs_only_the_layers_it_needs(components):
    model, processor = build_model_and_processor(components["text"], components["siglip"], components["audio"])
    config = model.config
    assert config.vision_feature_select_strategy == "full" and config.vision_cls_tokens == 0
    assert processor.image_seq_length == config.image_seq_length == 16  # 4 x 4 patches, none dropped
    inputs = processor(text=PROMPT, images=[image()])
    seen = []
    hook = model.model.vision_tower.encoder.layers[-1].register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        features = model.model.select_vision_features(inputs["pixel_values"])
        full = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    hook.remove()
    assert seen == [1]  # only the full forward ran the last layer: the feature layer is -2
    torch.testing.assert_close(features, full[-2])
    assert features.shape == (1, 16, 32)

    model.train()
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    model(**inputs, labels=labels).loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    unused = {id(p) for m in model.model.unused_vision_modules() for p in m.parameters()}
    assert {id(p) for p in model.model.vision_tower.head.parameters()} <= unused  # SigLIP's pooling head


def test_pooling_a_27_by_27_grid_keeps_its_edge(components):
    """27 is odd: pooling 2 gives 14 x 14, the last row and column of blocks averaging what they hold."""
    model, processor = build_model_and_processor(components["text"], components["siglip27"], None, image_token_pooling=2)
    assert model.config.patches_per_side == 27 and processor.image_seq_length == model.config.image_seq_length == 196
    inputs = processor(text=PROMPT, images=[image()])
    with torch.no_grad():
        features = model.model.select_vision_features(inputs["pixel_values"])  # (1, 729, 32)
        pooled = model.get_image_features(vision_features=features)
        grid = features[0].reshape(27, 27, 32)
        corner = grid[26, 26]  # the last block holds one patch
        edge = grid[0:2, 26].mean(0)  # the last column's blocks hold two
        expected = model.model.multi_modal_projector(torch.stack([corner, edge]))
        assert model(**inputs).image_hidden_states.shape[0] == 196
    torch.testing.assert_close(pooled[0, 14 * 14 - 1], expected[0])
    torch.testing.assert_close(pooled[0, 13], expected[1])


def test_siglip_checkpoint_exports_to_llava_with_the_same_logits(components, tmp_path):
    from phi3mm import export_llava
    from phi3mm.vision_cache import feature_shape

    model, processor = build_model_and_processor(components["text"], components["siglip"], components["audio"])
    assert feature_shape(model.config) == [16, 32]  # what a vision feature cache of this tower stores
    src = save_checkpoint(model, processor, tmp_path / "ours")
    dst = export_llava.export_llava(src, tmp_path / "llava", log=lambda line: None)
    ours = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=torch.float32).eval()
    llava = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
    a = AutoProcessor.from_pretrained(src, trust_remote_code=True)(text=PROMPT, images=[image()], return_tensors="pt")
    b = AutoProcessor.from_pretrained(dst)(text=PROMPT, images=[image()], return_tensors="pt")
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(llava(**b).logits, ours(**a).logits, atol=1e-5, rtol=1e-5)


def test_a_siglip2_naflex_checkpoint_is_refused_with_a_message(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2)).save_pretrained(tmp_path / "naflex")  # fmt: skip
    paths = make_tiny_components(tmp_path / "tiny", with_audio=False)
    with pytest.raises(ValueError, match="NaFlex"):
        build_model_and_processor(paths["text"], tmp_path / "naflex")
