"""Assembling from components, saving, and loading as Hub remote code in a clean process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import shape_image, tone
from phi3mm.build import build_model_and_processor, make_tiny_components, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_placeholders_reuse_spare_embedding_rows(tmp_path):
    paths = make_tiny_components(tmp_path, spare_embedding_rows=True)
    rows_before = json.loads((paths["text"] / "config.json").read_text())["vocab_size"]
    model, processor = build_model_and_processor(paths["text"], paths["vision"], paths["audio"])
    assert model.config.text_config.vocab_size == rows_before
    assert model.config.image_token_id < rows_before and model.config.audio_token_id < rows_before
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<image>"


def test_full_vocabulary_is_resized_to_a_multiple_of_64(tmp_path):
    paths = make_tiny_components(tmp_path, spare_embedding_rows=False)
    model, processor = build_model_and_processor(paths["text"], paths["vision"], paths["audio"])
    rows = model.get_input_embeddings().num_embeddings
    assert rows % 64 == 0 and rows >= len(processor.tokenizer)
    assert model.lm_head.weight.shape[0] == rows == model.config.text_config.vocab_size
    inputs = processor(text="<|user|>\n<image><audio><|end|>\n", images=[shape_image()], audio=[tone()])
    assert model(**inputs).logits.shape[-1] == rows


def test_generation_stops_at_end_of_turn(tiny):
    model, processor = tiny
    assert processor.tokenizer.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
    assert processor.tokenizer.padding_side == "left"


# Loads a saved checkpoint with nothing of this repository importable and the optional packages
# blocked, as a user of the published Hub repo would, and prints the max logit difference.
LOADER = r"""
import sys
# None in sys.modules makes `import x` fail and find_spec report the package as absent.
for name in ["soundfile", "librosa", "peft", "bitsandbytes", "gradio", "datasets", "phi3mm",
             "configuration_phi3_projector", "modeling_phi3_projector", "processing_multimodal"]:
    sys.modules[name] = None
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)) is type(model)
inputs = torch.load(sys.argv[2])
again = processor(text=sys.argv[3], images=[inputs.pop("image").numpy()], audio=[inputs.pop("audio").numpy()], return_tensors="pt")
assert all(torch.equal(again[k], inputs[k]) for k in inputs), "processor output differs"
with torch.no_grad():
    print((model(**again).logits - torch.load(sys.argv[4])).abs().max().item())
"""


def test_saved_checkpoint_loads_as_remote_code_in_a_clean_process(tiny, tmp_path):
    model, processor = tiny
    folder = save_checkpoint(model, processor, tmp_path / "checkpoint")
    files = set(os.listdir(folder))
    assert {"configuration_phi3_projector.py", "modeling_phi3_projector.py", "processing_multimodal.py"} <= files
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoProcessor"}

    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "published")  # no repository next to it
    prompt = "<|user|>\n<image>\n<audio>\nWhat?<|end|>\n<|assistant|>\n"
    image, audio = shape_image(), tone(2000)
    inputs = dict(processor(text=prompt, images=[image], audio=[audio], return_tensors="pt"))
    with torch.no_grad():
        torch.save(model(**inputs).logits, tmp_path / "logits.pt")
    torch.save({**inputs, "image": torch.from_numpy(image), "audio": torch.from_numpy(audio)}, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(copy), str(tmp_path / "inputs.pt"), prompt, str(tmp_path / "logits.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) == 0.0


def test_make_tiny_checkpoint_script(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "phi3mm.build", str(tmp_path / "tiny"), "--no-audio"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["audio_config"] is None and config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default" and config["image_token_pooling"] == 1
