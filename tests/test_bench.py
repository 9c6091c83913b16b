"""phi3mm.bench: padding efficiency, the FLOP estimator, and a one-repeat run on the tiny size."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, Phi3Config

from configuration_phi3_projector import Phi3ProjectorConfig
from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration
from phi3mm.bench import (
    batch_indices,
    llava_instruct_lengths,
    main,
    padding_efficiency,
    render_markdown,
    text_matmul_params,
    training_step_flops,
    vision_matmul_params,
)


def test_padding_efficiency_by_hand():
    assert padding_efficiency([1, 2, 3, 4], [[0, 1], [2, 3]]) == pytest.approx(10 / 12)
    assert padding_efficiency([5, 5, 5], [[0, 1, 2]]) == 1.0


def test_length_grouping_pads_less_than_random_batching():
    lengths = llava_instruct_lengths(4000, seed=0)
    assert lengths.min() >= 16 and lengths.max() <= 2048
    grouped = padding_efficiency(lengths, batch_indices(lengths, 16, grouped=True))
    random = padding_efficiency(lengths, batch_indices(lengths, 16, grouped=False))
    assert 0 < random < grouped <= 1
    batches = batch_indices(lengths, 16, grouped=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row once


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
    assert training_step_flops(config, 2, 20, lm_trainable=False)["language_model"] == 2 * lm_forward
    head_on_5 = 2 * (2 * (24576 - 4096) * 20 + 2 * 4096 * 5 + 4 * 2 * 32 * 20**2)  # the head on 5 tokens per row
    assert training_step_flops(config, 2, 20, head_tokens=5)["language_model"] == 3 * head_on_5


def test_phi35_is_refused_on_the_cpu(tmp_path):
    with pytest.raises(SystemExit, match="GPU"):
        main(["--size", "phi35", "--out", str(tmp_path / "b.json"), "--md", str(tmp_path / "b.md")])
    assert not (tmp_path / "b.json").exists()


def test_tiny_run_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "BENCHMARKS.json", tmp_path / "BENCHMARKS.md"
    threads = torch.get_num_threads()
    main(["--size", "tiny", "--repeats", "1", "--threads", "1", "--out", str(out), "--md", str(md),
          "--work-dir", str(tmp_path / "work")])  # fmt: skip
    assert torch.get_num_threads() == threads  # restored for the tests after this one
    results = json.loads(out.read_text())
    tiny = results["sizes"]["tiny"]
    for section in ("train", "prefill", "generation", "no_cache", "qlora"):
        assert section in tiny, section
    assert set(tiny["generation"]["precisions"]) == {"fp32", "bf16", "4bit"}
    runs = tiny["train"]["runs"]
    for name in ("ours", "llava", "ours_features", "ours_pool2", "vision_tower_forward"):
        assert runs[name]["seconds"] > 0, name
    assert runs["ours"]["loss"] == pytest.approx(runs["llava"]["loss"], rel=1e-5)  # same weights, same batch
    assert tiny["train"]["vision_features"]["tower_calls_with_pixels"] == 1  # one round
    assert tiny["train"]["vision_features"]["tower_calls_with_features"] == 0
    assert 0 < runs["ours"]["mfu"] < 1
    assert 0 < results["padding"]["random"] < results["padding"]["grouped"] <= 1
    assert all(isinstance(g["met"], bool) for g in results["goals"]) and len(results["goals"]) >= 7

    text = md.read_text()
    assert text == render_markdown(results)  # the Markdown is made from the JSON, nothing typed in
    for heading in ("## Run", "## Goals", "## Size `tiny`", "### Training step", "### Prefill", "### Generation",
                    "### KV cache", "### QLoRA step", "## Padding efficiency", "## GPU", "## What the figures mean"):  # fmt: skip
        assert heading in text, heading
    assert "No GPU was available" in text and "--size phi35 --device cuda" in text
