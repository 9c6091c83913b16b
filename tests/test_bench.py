"""phi3mm.bench: padding on a LlavaDataset, the FLOP estimator, the report's verdicts, a one-repeat tiny run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, Phi3Config

from configuration_phi3_projector import Phi3ProjectorConfig
from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration
from phi3mm.bench import SIZES, main
from phi3mm.bench.flops import text_matmul_params, training_step_flops, vision_matmul_params
from phi3mm.bench.padding import KINDS, batch_indices, padding_benchmark, padding_efficiency
from phi3mm.bench.report import compare, render_markdown, speedup
from phi3mm.build import make_tiny_components


def test_padding_efficiency_by_hand():
    assert padding_efficiency([1, 2, 3, 4], [[0, 1], [2, 3]]) == pytest.approx(10 / 12)
    assert padding_efficiency([5, 5, 5], [[0, 1, 2]]) == 1.0
    lengths = list(range(1, 101))
    for grouped in (True, False):
        batches = batch_indices(lengths, 16, grouped)
        assert sorted(i for b in batches for i in b) == list(range(100))  # every row once


def test_length_grouping_on_a_llava_dataset():
    pad = padding_benchmark(n_rows=1000)
    assert pad["rows"] == 1000 and pad["image_tokens"] == 576  # every row kept, LLaVA-1.5's image block
    medians = {name: k["median_length"] for name, k in pad["kinds"].items()}
    assert set(medians) == set(KINDS)
    assert min(medians[name] for name, kind in KINDS.items() if kind[-1]) > 576  # each image counts 576 tokens
    assert medians["conversation"] > medians["detailed description"]  # every turn counted, not just the first
    assert 0 < pad["random"] < 0.8 and 0.9 < pad["grouped"] <= 1


def small_config() -> Phi3ProjectorConfig:
    text = Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14)  # fmt: skip
    return Phi3ProjectorConfig(text_config=text, vision_config=vision, image_token_id=100, audio_token_id=101)


def test_flop_estimator_on_a_known_config():
    config = small_config()
    # Matmul weights by hand: per Phi-3 layer qkv 32x96 + o 32x32 + gate_up 32x128 + down 64x32, two
    # layers, head 32x128; CLIP: patch conv 3x14x14x16, per layer 4x16x16 + 2x16x32, two layers.
    assert text_matmul_params(config.text_config) == 2 * (3072 + 1024 + 4096 + 2048) + 4096 == 24576
    assert vision_matmul_params(config.vision_config) == 9408 + 2 * 2048 == 13504
    # ... which are the real model's: every weight of a Linear or Conv2d, biases and embeddings aside.
    model = Phi3ProjectorForConditionalGeneration(config)

    def matmul_weights(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))

    assert matmul_weights(model.model.language_model) + model.lm_head.weight.numel() == 24576
    assert matmul_weights(model.model.vision_tower) == 13504

    # Batch 2 x 20 tokens, one 4-patch image per row (5 tower tokens with CLS). The features are
    # the penultimate layer's, so the tower runs one of its two layers; LLaVA runs both.
    lm_forward = 2 * (2 * 24576 * 20 + 4 * 2 * 32 * 20**2)
    projector = 2 * (2 * (16 * 32 + 32 * 32) * 4)
    tower = 2 * (2 * (9408 + 2048) * 5 + 4 * 1 * 16 * 5**2)
    flops = training_step_flops(config, batch_size=2, seq_len=20)
    assert flops == {"language_model": 3 * lm_forward, "projector": 3 * projector, "vision_tower": tower,
                     "total": 3 * lm_forward + 3 * projector + tower}  # fmt: skip
    assert training_step_flops(config, 2, 20, vision="features")["vision_tower"] == 0
    assert training_step_flops(config, 2, 20, tower_layers=2)["vision_tower"] == 2 * (2 * 13504 * 5 + 4 * 2 * 16 * 5**2)
    head_on_5 = 2 * (2 * (24576 - 4096) * 20 + 2 * 4096 * 5 + 4 * 2 * 32 * 20**2)  # the head on 5 tokens per row
    assert training_step_flops(config, 2, 20, head_tokens=5)["language_model"] == 3 * head_on_5


def ratio(values: list[float], cpu: list[float] | None = None) -> dict:
    def spread(xs):
        return {"median": sorted(xs)[len(xs) // 2], "min": min(xs), "max": max(xs), "rounds": len(xs)}

    return spread(values) | {"cpu": spread(cpu or values)}


def test_verdicts_follow_the_figures():
    assert "ours takes 10.0% less time than LLaVA in every one of 3 rounds" in compare(ratio([0.85, 0.9, 0.95]), "x")
    assert "ours takes 10.0% more time" in compare(ratio([1.05, 1.1, 1.2]), "x")
    assert "no difference beyond noise (rounds on both sides" in compare(ratio([0.8, 0.9, 1.05]), "x")
    # The wall clock alone is not enough: the CPU-time rounds must agree.
    assert "both sides of 1.0 by CPU time" in compare(ratio([0.8, 0.9, 0.95], [0.8, 0.9, 1.01]), "x")
    assert "too few to tell" in compare(ratio([0.5]), "x")  # one round never makes a difference
    assert speedup(ratio([3.1, 3.2, 3.4])).startswith("3.20x faster")
    assert speedup(ratio([0.4, 0.5, 0.6])).startswith("2.00x slower")
    assert speedup(ratio([0.9, 1.1, 1.2])).startswith("no faster beyond noise (1.10x")


def test_bench_sizes_shape_the_one_tiny_builder(tmp_path):
    # Each size's shape options, scaled down, reach the configs written by make_tiny_components.
    for size in SIZES.values():
        options = {k: (v if k in ("image_size", "patch_size") or not isinstance(v, int) else max(2, v // 64 * 2))
                   for k, v in size.components.items()}  # fmt: skip
        options = {k: v for k, v in options.items() if k != "vocab_size"} | {"vocab_size": 640}
        paths = make_tiny_components(tmp_path / size.name, with_audio=False, **options)
        text = json.loads((paths["text"] / "config.json").read_text())
        vision = json.loads((paths["vision"] / "config.json").read_text())["vision_config"]
        assert text["vocab_size"] == 640
        for key, value in options.items():
            config_key = {"num_layers": "num_hidden_layers", "vision_hidden_size": "hidden_size",
                          "vision_layers": "num_hidden_layers", "vision_attention_heads": "num_attention_heads",
                          "vision_intermediate_size": "intermediate_size"}.get(key, key)  # fmt: skip
            where = vision if key.startswith(("vision_", "image_", "patch_")) else text
            assert where[config_key] == value, (size.name, key)


def test_phi35_is_refused_on_the_cpu(tmp_path):
    with pytest.raises(SystemExit, match="GPU"):
        main(["--size", "phi35", "--out", str(tmp_path / "b.json"), "--md", str(tmp_path / "b.md")])
    assert not (tmp_path / "b.json").exists()


def test_command_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "phi3mm.bench", "--help"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tiny 15, small 5, phi35 5" in " ".join(result.stdout.split())  # the help states SIZES' own repeats


def test_tiny_run_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "BENCHMARKS.json", tmp_path / "BENCHMARKS.md"
    threads = torch.get_num_threads()
    main(["--size", "tiny", "--repeats", "1", "--threads", "1", "--out", str(out), "--md", str(md),
          "--work-dir", str(tmp_path / "work")])  # fmt: skip
    assert torch.get_num_threads() == threads  # restored for the tests after this one
    results = json.loads(out.read_text())
    assert results["machine"]["torch_threads"] == 1
    tiny = results["sizes"]["tiny"]
    # bf16 generation only where bf16 runs at speed; otherwise the 4-bit layers compute in fp32 too
    assert results["fast_bf16"] == (results["matmul_rates"]["bfloat16"] >= results["matmul_rates"]["float32"] / 2)
    assert set(tiny["generation"]["precisions"]) == {"fp32", "4bit"} | ({"bf16"} if results["fast_bf16"] else set())
    assert tiny["qlora"]["bnb_compute_dtype"] == ("bfloat16" if results["fast_bf16"] else "float32")
    runs = tiny["train"]["runs"]
    for name in ("ours", "llava", "ours_features", "ours_pool2", "vision_tower_forward"):
        assert runs[name]["seconds"] > 0, name
    assert runs["ours"]["loss"] == pytest.approx(runs["llava"]["loss"], rel=1e-5)  # same weights, same batch
    assert tiny["train"]["vision_features"]["tower_calls_with_pixels"] == 1  # one round
    assert tiny["train"]["vision_features"]["tower_calls_with_features"] == 0
    assert runs["ours"]["flops"] < runs["llava"]["flops"]  # ours skips the tower's last layer and most of the head
    assert 0 < runs["ours"]["mfu"] < 1
    assert tiny["qlora"]["trainable_parameters"] > 0 and tiny["qlora"]["runs"]["ours"]["loss"] > 0
    assert 0 < results["padding"]["random"] < results["padding"]["grouped"] <= 1

    text = md.read_text()
    assert text == render_markdown(results)  # the Markdown is made from the JSON, nothing typed in
    assert "$" not in text.replace("$ ", "")  # every placeholder of the template filled
    for heading in ("## Summary", "## Run", "## Size `tiny`", "### Training step", "### Prefill", "### Generation",
                    "### QLoRA step", "## Padding efficiency", "## Audio", "## GPU", "## What the figures mean"):  # fmt: skip
        assert heading in text, heading
    # Conclusions come from the figures: one round is too few to call any difference.
    assert "training step: no difference beyond noise (1 round(s), too few to tell;" in text
    assert f"random batches {100 * results['padding']['random']:.1f}%" in text
    assert "No GPU was available" in text and "--size phi35 --device cuda" in text
