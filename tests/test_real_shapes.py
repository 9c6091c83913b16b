"""The real component shapes, 2 layers deep: Phi-3.5-mini, CLIP-L/336 and whisper-small at their
published widths (random weights), through build, a QLoRA step, the merge, the LLaVA export and
generation across LongRoPE's switch at 4096 positions.

    .venv/bin/python -m pytest tests/test_real_shapes.py -s   # -s prints the times, memory and 32-layer estimates

The tiny configs (width 64) never meet Phi-3.5's head dim 96, its 32,064-row embedding with spare
rows, LongRoPE, CLIP's 577 positions or Whisper's 768 width. Each component here is built from its
published config with only the depth cut to 2, saved with `save_pretrained`, and assembled by
`build_model_and_processor` exactly as the hub ids would be. The real Phi-3.5 tokenizer comes from
`phi3mm.real_parts`; the image processor takes CLIP-L/336's published preprocessor settings.

Two checks here found library bugs, fixed with them: the build dropped Phi-3.5's published stop id
<|assistant|> (32001), and cached generation past 4096 positions kept keys encoded with LongRoPE's
short factors, which a full forward past the switch re-encodes with the long ones (the model now
drops its cache at that step, as transformers' Phi3ForCausalLM does).

Where tests/configs/ came from (no Hub access here; values verbatim):
- phi-3.5-mini-instruct.json: microsoft/Phi-3.5-mini-instruct config.json as transformers 4.46.3
  re-saves it, copied byte for byte from kevinstephano/thunder_model_blocks hf_phi3/phi3_rope.py
  @ d84dd5ccba375ee539abc702629d048f56c3852b (the string `phi35_cfg_str`). The re-save adds
  `attention_bias` and repo-prefixes `auto_map`; every architecture value, both 48-entry factor lists
  included, equals the Hub file as quoted in sdpython/experimental-experiment
  _doc/recipes/plot_exporter_exporter_phi35_piece.py @ 04563406686fc03231d8a51ccc49daf975df2e93.
- phi-3.5-mini-instruct.generation_config.json: microsoft/Phi-3.5-mini-instruct generation_config.json
  at Hub commit 7a1ac0d ("Upload initial files"), its values as the Hub's file view shows them,
  written in transformers' layout.
- clip-vit-large-patch14-336.json: openai/clip-vit-large-patch14-336 config.json as mirrored by
  Xenova (HF staff) in sheldonrobinson/clip-vit-large-patch14-336 @ 90223e6, byte for byte (721
  bytes: transformers' diff form of the original, Hub revision ce19dc912ca5cd21c8a653c79e251e808ccabcd1).
- clip-vit-large-patch14-336.preprocessor_config.json: the published preprocessor_config.json, byte
  for byte (316 bytes), as duplicated in Q-MM/clip-vit-large-patch14-336 @ c71fd13e9ffb2e2c89e2987108371a000b19f20b.
- whisper-small.json: openai/whisper-small config.json at Hub revision
  973afd24965f72e36ca33b3055d56a652f456b4d, as a public article on the Whisper pipeline quotes it in
  full from its local Hub cache (found in the code search index; its repository was not identified).
See docs/real_shapes.md for the measured figures.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    GenerationConfig,
    LlavaForConditionalGeneration,
    Phi3Config,
    Phi3ForCausalLM,
    TrainingArguments,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from phi3mm.build import build_model_and_processor, save_checkpoint
from phi3mm.data import LlavaDataset, MultimodalCollator
from phi3mm.export_llava import export_llava
from phi3mm.real_parts import phi35_tokenizer_path
from phi3mm.training import (
    LORA_TARGETS,
    ModelArguments,
    load_base,
    merge_and_save,
    prepare_for_training,
    quantized_linears,
)

CONFIGS = Path(__file__).resolve().parent / "configs"
LAYERS = 2
PHI35_LAYERS, CLIP_LAYERS, WHISPER_ENCODER_LAYERS = 32, 24, 12  # the published depths the estimates scale to
AUDIO_SECONDS = 3
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]

pytestmark = pytest.mark.slow  # 0.4B-parameter models: minutes of CPU, still run in CI

FIGURES: dict = {}  # measured here, written to docs/real_shapes.md at the end of the module


def published(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


# ---------------------------------------------------------------------------------------------
# Memory: the peak resident set of one phase
# ---------------------------------------------------------------------------------------------


def reset_peak_rss() -> None:
    """Start a new peak: Linux resets VmHWM to the current RSS on "5" (ru_maxrss cannot be reset)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peaks below are the process's since it started: an upper bound


def rss_mib(field: str = "VmHWM") -> float:
    """VmHWM (peak since the last reset) or VmRSS (now) in MiB; ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Components: the published configs at depth 2, random weights, saved as the Hub's are
# ---------------------------------------------------------------------------------------------


def write_components(out: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    paths = {"text": out / "text", "vision": out / "vision", "audio": out / "audio"}

    text = published("phi-3.5-mini-instruct.json")
    text["num_hidden_layers"] = LAYERS
    language_model = Phi3ForCausalLM(Phi3Config.from_dict(text))
    language_model.generation_config = GenerationConfig.from_dict(
        published("phi-3.5-mini-instruct.generation_config.json")
    )
    language_model.to(torch.bfloat16).save_pretrained(paths["text"])  # as published (torch_dtype bfloat16)
    del language_model
    AutoTokenizer.from_pretrained(phi35_tokenizer_path()).save_pretrained(paths["text"])

    clip = published("clip-vit-large-patch14-336.json")
    clip["vision_config"]["num_hidden_layers"] = LAYERS
    clip["text_config"]["num_hidden_layers"] = 1  # the text tower is never loaded; keep it small
    CLIPModel(CLIPConfig.from_dict(clip)).save_pretrained(paths["vision"])
    preprocessor = published("clip-vit-large-patch14-336.preprocessor_config.json")
    preprocessor.pop("feature_extractor_type")
    CLIPImageProcessorPil(**preprocessor).save_pretrained(paths["vision"])

    whisper = published("whisper-small.json")
    whisper.update(encoder_layers=LAYERS, decoder_layers=1)
    WhisperForConditionalGeneration(WhisperConfig.from_dict(whisper)).save_pretrained(paths["audio"])
    WhisperFeatureExtractor(feature_size=whisper["num_mel_bins"]).save_pretrained(paths["audio"])
    return paths


def write_media(folder: Path) -> dict[str, Path]:
    """A 400x300 picture (resized and cropped to 336 by the processor) and a 3 s tone as a WAV file."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    pixels[100:200, 50:150] = (220, 30, 30)
    Image.fromarray(pixels).save(folder / "shape.png")
    t = np.arange(AUDIO_SECONDS * 16_000) / 16_000
    samples = (0.5 * np.sin(2 * np.pi * 300.0 * t) * 32767).astype("<i2")
    with wave.open(str(folder / "tone.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(samples.tobytes())
    return {"image": folder / "shape.png", "audio": folder / "tone.wav"}


def parameter_counts(model) -> dict[str, dict[str, int]]:
    """Per-layer and depth-independent parameter counts of each part, from the modules themselves."""

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    def linears(module) -> int:  # the weights QLoRA stores in NF4 (biases and norms stay in float)
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    parts = {
        "language model": (model.model.language_model, model.model.language_model.layers, PHI35_LAYERS),
        "CLIP vision tower": (model.model.vision_tower, model.model.vision_tower.encoder.layers, CLIP_LAYERS),
        "Whisper encoder": (model.model.audio_tower, model.model.audio_tower.layers, WHISPER_ENCODER_LAYERS),
    }
    counts = {}
    for name, (module, layers, depth) in parts.items():
        per_layer = count(layers[0])
        assert all(count(layer) == per_layer for layer in layers)
        counts[name] = {"per_layer": per_layer, "rest": count(module) - len(layers) * per_layer, "layers": depth,
                        "linear_per_layer": linears(layers[0])}  # fmt: skip
    counts["lm_head"] = {"per_layer": 0, "rest": count(model.lm_head), "layers": 0, "linear_per_layer": 0}
    projectors = count(model.model.multi_modal_projector) + count(model.model.audio_projector)
    counts["projectors"] = {"per_layer": 0, "rest": projectors, "layers": 0, "linear_per_layer": 0}
    return counts


# NF4 with double quantization: 4 bits a weight, an 8-bit absmax per block of 64, and an fp32
# absmax per 256 of those (bitsandbytes' defaults, as `phi3mm.training.quantization_config` sets them).
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
ADAMW_BYTES = 16  # fp32 weight, gradient and two moments per trained parameter


def estimates(figures: dict) -> dict[str, float]:
    """Memory at the published depths from the counted parameters (bytes; formulas in the report)."""
    params = figures["params"]
    full = {name: c["rest"] + c["layers"] * c["per_layer"] for name, c in params.items()}
    total = sum(full.values())
    nf4 = PHI35_LAYERS * params["language model"]["linear_per_layer"]
    qlora = figures.get("qlora", {})
    lora = qlora.get("LoRA parameters", 0) * PHI35_LAYERS // LAYERS
    projectors = params["projectors"]["rest"]
    out = {"parameters": total, "language model + head": full["language model"] + full["lm_head"],
           "bf16 weights": 2 * total, "QLoRA weights": NF4_BYTES * nf4 + 4 * (total - nf4),
           "LoRA parameters": lora, "trained-parameter state": ADAMW_BYTES * (lora + projectors) + 4 * projectors}  # fmt: skip
    if qlora:
        # the step's increment over the loaded model, less the gradients and AdamW moments it created
        step = (qlora["peak RSS (MiB)"] - qlora["RSS after loading (MiB)"]) * 2**20
        out["step activations"] = step - (ADAMW_BYTES - 4) * qlora["trainable parameters"]
    return out


def shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_report(figures: dict) -> str:
    """docs/real_shapes.md: the measured figures of this run, then the estimates with their formulas."""
    gib = 2**30
    lines = [
        "# Real shapes: measured figures and estimates",
        "",
        "Written by `REAL_SHAPES_REPORT=docs/real_shapes.md .venv/bin/python -m pytest tests/test_real_shapes.py -s`",
        (
            f"on {time.strftime('%Y-%m-%d')} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, float32): Phi-3.5-mini, CLIP-L/336 and whisper-small from their published"
        ),
        f"configs (tests/configs/) with {LAYERS} layers each and random weights, and the real Phi-3.5 tokenizer.",
        "",
        "## Measured in this run",
        "",
        "| phase | figure | value |",
        "|---|---|---|",
    ]
    for phase in ("build", "qlora", "merge", "export", "longrope"):
        lines += [f"| {phase} | {key} | {shown(value)} |" for key, value in figures.get(phase, {}).items()]
    lines += [
        "",
        "RSS is the process's resident set (VmHWM, reset at the start of each phase), its baseline included.",
        "",
        "## Parameters, counted from the built modules",
        "",
        "| part | per layer | outside the layers | published depth | at that depth |",
        "|---|---|---|---|---|",
    ]
    for name, c in figures["params"].items():
        full = c["rest"] + c["layers"] * c["per_layer"]
        lines.append(f"| {name} | {c['per_layer']:,} | {c['rest']:,} | {c['layers'] or '-'} | {full:,} |")
    e = estimates(figures)
    lines += [
        "",
        "## Estimates for the published depths (computed, not measured)",
        "",
        (
            "- parameters = outside the layers + depth x per layer, summed over the parts: "
            f"**{e['parameters'] / 1e9:.3f} B** (language model and head: {e['language model + head'] / 1e9:.3f} B)."
        ),
        f"- bf16 weights = 2 B x parameters = **{e['bf16 weights'] / gib:.2f} GiB**.",
        (
            f"- QLoRA weights = {NF4_BYTES:.4f} B (NF4, double-quantized) x the {PHI35_LAYERS} layers' fused linears "
            f"+ 4 B (float32, as `load_base` loads the rest) x everything else = **{e['QLoRA weights'] / gib:.2f} GiB**."
        ),
    ]
    if e["LoRA parameters"]:
        lora, rank = e["LoRA parameters"], figures["qlora"]["LoRA rank"]
        projectors = figures["params"]["projectors"]["rest"]
        lines += [
            (
                f"- trained-parameter state = {ADAMW_BYTES} B (AdamW: fp32 weight, gradient, 2 moments) x (LoRA "
                f"{lora / 1e6:,.0f} M at rank {rank} on {PHI35_LAYERS} layers + projectors {projectors / 1e6:,.1f} M) "
                f"+ 4 B x the projectors' frozen originals = **{e['trained-parameter state'] / gib:.2f} GiB**."
            ),
            (
                f"- activations, crude: the measured step's RSS increment over the loaded model, less 12 B x its "
                f"{figures['qlora']['trainable parameters'] / 1e6:,.1f} M trained parameters (gradient and moments), "
                f"was {e['step activations'] / 2**20:,.0f} MiB at {LAYERS} layers (float32, rows of "
                f"{figures['qlora']['tokens']} tokens); x {PHI35_LAYERS}/{LAYERS} = "
                f"**{e['step activations'] * PHI35_LAYERS / LAYERS / gib:.1f} GiB** for rows of that length (bf16 "
                "compute and activation checkpointing shrink it)."
            ),
        ]
    conclusions = []
    if "merge" in figures:
        m = figures["merge"]
        conclusions.append(
            f"The merge into the dequantized NF4 weights moved the logits by at most {m['max_abs_logit_diff']:.2g} "
            f"(top-1 agreement {m['top1_agreement']:.0%})."
        )
    if "export" in figures:
        diff = figures["export"]["max abs logit diff"]
        same = "the same logits, bit for bit," if diff == 0 else f"logits within {diff:.2g} of ours"
        conclusions.append(f"transformers' LlavaForConditionalGeneration gave {same} on the image prompt.")
    if "longrope" in figures:
        r = figures["longrope"]
        conclusions.append(
            f"Past the LongRoPE switch, cached generation agreed with the no-cache forward on "
            f"{r['argmax agreement after the switch']} steps (max logit difference "
            f"{r['max abs logit diff after the switch']:.2g})."
        )
    if conclusions:
        lines += ["", "## What this run shows", "", *[f"- {c}" for c in conclusions]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Fixtures: one build, one QLoRA step, one merge, shared by the tests in file order
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real_shapes")


@pytest.fixture(scope="module")
def media(work) -> dict[str, Path]:
    return write_media(work / "media")


@pytest.fixture(scope="module")
def built(work):
    """{"model", "processor", "base"}: assembled from the 2-layer components, saved to `base`.

    The in-memory model serves the assembly test only (it runs first); the QLoRA fixture drops it so
    its memory figures are its own, and later tests load `base` again.
    """
    reset_peak_rss()
    before, start = rss_mib("VmRSS"), time.perf_counter()
    paths = write_components(work / "components")
    components_done = time.perf_counter()
    model, processor = build_model_and_processor(paths["text"], paths["vision"], paths["audio"])
    base = save_checkpoint(model, processor, work / "base")
    FIGURES["build"] = {
        "write components (s)": components_done - start,
        "build_model_and_processor + save_checkpoint (s)": time.perf_counter() - components_done,
        "RSS before (MiB)": before,
        "peak RSS (MiB)": rss_mib(),
    }
    FIGURES["params"] = parameter_counts(model)
    return {"model": model.eval(), "processor": processor, "base": base}


@pytest.fixture(scope="module")
def qlora(work, built, media):
    """One QLoRA step (the library's loading, quantization and LoRA) on an image row and an audio row."""
    built.pop("model", None)  # the QLoRA figures below are the 4-bit model's, not the full-precision copy's
    rows = [
        {"image": media["image"].name,
         "conversations": [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "Red."}]},
        {"audio": media["audio"].name,
         "conversations": [{"from": "human", "value": "<audio>\nIs the tone high or low?"}, {"from": "gpt", "value": "Low."}]},
    ]  # fmt: skip
    model_args = ModelArguments(
        model_name_or_path=str(built["base"]), stage="finetune", tuning="qlora", bnb_compute_dtype="float32"
    )
    training_args = TrainingArguments(output_dir=str(work / "qlora"), report_to="none", use_cpu=True)

    reset_peak_rss()
    before, start = rss_mib("VmRSS"), time.perf_counter()
    model, processor, base = load_base(model_args, work / "qlora")
    model = prepare_for_training(model, model_args, training_args)
    loaded = time.perf_counter()
    after_load = rss_mib("VmRSS")
    dataset = LlavaDataset(rows, processor, image_folder=media["image"].parent, audio_folder=media["audio"].parent)
    collator = MultimodalCollator(processor.tokenizer.pad_token_id)
    batches = [collator([dataset[i]]) for i in range(len(dataset))]
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for batch in batches:  # one optimizer step over both rows (gradient accumulation)
        loss = model(**batch, skip_logits=True).loss
        (loss / len(batches)).backward()
        losses.append(loss.item())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    FIGURES["qlora"] = {
        "load 4-bit + LoRA (s)": loaded - start,
        "one step, 2 rows (s)": time.perf_counter() - loaded,
        "tokens": [int(b["attention_mask"].sum()) for b in batches],
        "RSS before (MiB)": before,
        "RSS after loading (MiB)": after_load,
        "peak RSS (MiB)": rss_mib(),
        "trainable parameters": sum(p.numel() for p in trainable),
        "LoRA parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
        "LoRA rank": model_args.lora_r,
    }
    changed = {n: (p.detach() - lora_b[n]).abs().max().item() for n, p in model.named_parameters() if n in lora_b}
    adapter = work / "adapter"
    model.save_pretrained(adapter)
    return {"model": model, "processor": processor, "base": base, "batches": batches, "losses": losses,
            "lora_b_change": changed, "adapter": adapter}  # fmt: skip


@pytest.fixture(scope="module")
def merged(work, qlora):
    """The library's merge: the adapter into the dequantized NF4 weights; returns (folder, report).

    The logits are compared on the audio row: the adapters and dequantized weights act the same at
    every position, and the image row's 589 tokens would add two forwards of the 4-bit and merged
    models (the LLaVA test runs the merged model on an image prompt).
    """
    start = time.perf_counter()
    audio_row = [batch for batch in qlora["batches"] if "input_features" in batch]
    report = merge_and_save(qlora["model"], qlora["base"], qlora["adapter"], qlora["processor"], work / "merged",
                            audio_row, torch.float32)  # fmt: skip
    FIGURES["merge"] = {"merge + compare + save (s)": time.perf_counter() - start, **report}
    qlora["model"] = None  # the 4-bit model is done with
    return work / "merged", report


@pytest.fixture(scope="module", autouse=True)
def report():
    """Print the figures (and, with REAL_SHAPES_REPORT=path, write them as Markdown) after the module."""
    yield
    if "params" in FIGURES:
        text = render_report(FIGURES)
        print("\n" + text)
        target = os.environ.get("REAL_SHAPES_REPORT")
        if target:
            Path(target).write_text(text)


@pytest.fixture(scope="module")
def one_layer(built):
    """The assembled base checkpoint in full precision, cut to its first decoder layer, for generation.

    LongRoPE picks its factors once per forward, the same for every layer, so one layer shows the
    switch as two would; the generation test runs two forwards of ~4100 tokens (three once generate
    re-encodes at the switch), and a second layer of Phi-3.5's width doubles their minutes of CPU.
    """
    from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration

    model = Phi3ProjectorForConditionalGeneration.from_pretrained(
        built["base"], dtype=torch.float32, use_safetensors=True
    )
    model.model.language_model.layers = model.model.language_model.layers[:1]
    model.config.text_config.num_hidden_layers = 1
    return model.eval()


# ---------------------------------------------------------------------------------------------
# 1. Assembly
# ---------------------------------------------------------------------------------------------


def test_the_published_configs_load_with_their_real_shapes():
    text = Phi3Config.from_dict(published("phi-3.5-mini-instruct.json"))
    # transformers 5 reads the published `rope_scaling` (type "longrope") into `rope_parameters`
    # (rope_type "longrope", with rope_theta and original_max_position_embeddings folded in).
    rope = text.rope_parameters
    assert rope["rope_type"] == "longrope" and rope["rope_theta"] == 10000.0
    assert rope["original_max_position_embeddings"] == text.original_max_position_embeddings == 4096
    head_dim = text.hidden_size // text.num_attention_heads
    assert (text.hidden_size, text.num_attention_heads, head_dim, text.intermediate_size) == (3072, 32, 96, 8192)
    assert len(rope["short_factor"]) == len(rope["long_factor"]) == head_dim // 2 == 48
    assert (text.vocab_size, text.max_position_embeddings) == (32064, 131072)
    generation = GenerationConfig.from_dict(published("phi-3.5-mini-instruct.generation_config.json"))
    assert generation.eos_token_id == [32007, 32001, 32000]  # <|end|>, <|assistant|>, <|endoftext|>

    vision = CLIPConfig.from_dict(published("clip-vit-large-patch14-336.json")).vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.image_size, vision.patch_size, (vision.image_size // vision.patch_size) ** 2 + 1) == (336, 14, 577)

    audio = WhisperConfig.from_dict(published("whisper-small.json"))
    assert (audio.d_model, audio.encoder_attention_heads, audio.encoder_layers) == (768, 12, 12)
    assert (audio.num_mel_bins, audio.max_source_positions) == (80, 1500)


def test_assembly_takes_the_spare_rows_and_the_real_token_counts(built, media):
    model, processor, base = built["model"], built["processor"], built["base"]
    tokenizer = processor.tokenizer
    # Phi-3.5's tokenizer has 32011 tokens and its embedding 32064 rows: the placeholders take
    # rows 32011 and 32012, and nothing is resized.
    assert (model.config.image_token_id, model.config.audio_token_id) == (32011, 32012)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<audio>"]) == [32011, 32012] and len(tokenizer) == 32013
    assert model.get_input_embeddings().weight.shape == (32064, 3072)
    assert model.lm_head.weight.shape == (32064, 3072) and model.config.text_config.vocab_size == 32064

    # the composite's saved config spells LongRoPE the transformers-5 way and loads back as it was
    saved = json.loads((base / "config.json").read_text())["text_config"]
    assert saved["rope_parameters"]["rope_type"] == "longrope" and len(saved["rope_parameters"]["long_factor"]) == 48
    attention = model.model.language_model.layers[0].self_attn
    assert attention.qkv_proj.weight.shape == (3 * 3072, 3072) and attention.head_dim == 96

    # CLIP-L/336: 24 x 24 patches + CLS = 577 positions; CLS dropped, 576 image tokens
    assert model.model.vision_tower.embeddings.position_embedding.num_embeddings == 577
    assert model.config.image_seq_length == processor.image_seq_length == 576
    prompt = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Describe both."}],
            }
        ],
        add_generation_prompt=True,
    )
    inputs = processor(text=prompt, images=[str(media["image"])], audio=[str(media["audio"])], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)  # a 400x300 picture, resized and center-cropped
    assert int((inputs["input_ids"] == 32011).sum()) == 576

    # a 3 s clip: 300 mel frames, 150 encoder frames, 30 tokens of 5 stacked frames
    n_audio = processor.audio_token_count(AUDIO_SECONDS * 16_000)
    assert n_audio == 30 == int((inputs["input_ids"] == 32012).sum())
    assert inputs["input_features"].shape == (1, 80, 3000)
    with torch.no_grad():
        image_features = model.get_image_features(inputs["pixel_values"])
        audio_features = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
    assert image_features.shape == (1, 576, 3072) and audio_features.shape == (n_audio, 3072)
    assert torch.isfinite(image_features).all() and torch.isfinite(audio_features).all()

    # the counted shapes, scaled to the published depths: Phi-3.5-mini's 3,821,079,552 parameters (its
    # model card's 3.8 B), CLIP-L/336's vision tower at 24 layers, whisper-small's encoder at 12
    counts = {name: c["rest"] + c["layers"] * c["per_layer"] for name, c in FIGURES["params"].items()}
    assert counts["language model"] + counts["lm_head"] == 3_821_079_552
    assert (counts["CLIP vision tower"], counts["Whisper encoder"]) == (303_507_456, 88_154_112)

    # stopping: <|end|> and <|endoftext|> end a reply
    assert {32007, 32000} <= set(model.generation_config.eos_token_id)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 32000


def test_the_build_keeps_the_published_eos_ids(built):
    saved = GenerationConfig.from_pretrained(built["base"])  # what the assembled checkpoint ships
    assert set(saved.eos_token_id) >= {32007, 32001, 32000}


# ---------------------------------------------------------------------------------------------
# 2-3. QLoRA step and merge
# ---------------------------------------------------------------------------------------------


def test_one_qlora_step_is_finite_and_reaches_every_layer(qlora):
    model = qlora["model"]
    assert all(math.isfinite(loss) for loss in qlora["losses"]), qlora["losses"]
    assert qlora["batches"][0]["input_ids"].eq(32011).sum() == 576  # the image row carries all its tokens
    # exactly the language model's fused linears are NF4, each with a LoRA adapter that the step moved
    expected = {f"model.language_model.layers.{i}.{part}.{target}"
                for i in range(LAYERS) for part, targets in (("self_attn", LORA_TARGETS[:2]), ("mlp", LORA_TARGETS[2:]))
                for target in targets}  # fmt: skip
    quantized = {
        name.removeprefix("base_model.model.").removesuffix(".base_layer") for name, _ in quantized_linears(model)
    }
    assert quantized == expected and len(expected) == 4 * LAYERS
    with_lora = {name.removeprefix("base_model.model.").removesuffix(".lora_A") for name, _ in model.named_modules()
                 if name.endswith(".lora_A")}  # fmt: skip
    assert with_lora == expected
    assert len(qlora["lora_b_change"]) == 4 * LAYERS and min(qlora["lora_b_change"].values()) > 0


def test_the_merge_into_dequantized_nf4_matches_the_trained_model(merged):
    folder, report = merged
    assert report["dequantized_linears"] == 4 * LAYERS
    assert report["top1_agreement"] == 1.0
    assert report["max_abs_logit_diff"] < 1e-3, report
    assert (folder / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# 4. LLaVA export
# ---------------------------------------------------------------------------------------------


def test_the_llava_export_gives_the_same_logits(merged, media, work):
    folder, _ = merged
    start = time.perf_counter()
    lines = []
    dst = export_llava(folder, work / "llava", log=lines.append)
    assert any("dropped the audio branch" in line for line in lines)
    ours = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    llava = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[str(media["image"])], return_tensors="pt")
    with torch.no_grad():
        logits_ours = ours(**inputs).logits
        logits_llava = llava(**inputs).logits
    diff = (logits_ours - logits_llava).abs().max().item()
    FIGURES["export"] = {"export + load both + compare (s)": time.perf_counter() - start, "max abs logit diff": diff,
                         "prompt tokens": int(inputs["input_ids"].shape[1])}  # fmt: skip
    assert llava.config.text_config.rope_parameters["rope_type"] == "longrope"
    assert llava.config.image_seq_length == 576 and llava.config.image_token_index == 32011
    assert logits_ours.shape == logits_llava.shape == (1, inputs["input_ids"].shape[1], 32064)
    assert diff < 1e-4
    assert torch.equal(logits_ours.argmax(-1), logits_llava.argmax(-1))


# ---------------------------------------------------------------------------------------------
# 5. LongRoPE: the switch at 4096 positions
# ---------------------------------------------------------------------------------------------

SWITCH = 4096  # original_max_position_embeddings
PROMPT, NEW = SWITCH - 6, 12  # prefixes of 4090..4101 tokens: 7 predictions before the switch, 5 after


def test_longrope_re_encodes_every_position_once_the_sequence_passes_4096(one_layer):
    """Phi-3's LongRoPE picks one factor set per forward, from its longest position: short factors up
    to 4096 positions, long ones beyond, and then for every position, the early ones included. So a
    key cached before the switch (short) is not the key a full forward past it computes (long)."""
    rope = one_layer.config.text_config.rope_parameters
    rotary = one_layer.model.language_model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    base = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 96, 2, dtype=torch.float32) / 96))
    cos_short, _ = rotary(x, torch.arange(SWITCH)[None])
    torch.testing.assert_close(rotary.inv_freq, base / torch.tensor(rope["short_factor"]))
    cos_long, _ = rotary(x, torch.arange(SWITCH + 1)[None])
    torch.testing.assert_close(rotary.inv_freq, base / torch.tensor(rope["long_factor"]))
    # attention scaling sqrt(1 + ln(131072 / 4096) / ln(4096)), the same on both sides of the switch
    assert rotary.attention_scaling == pytest.approx(math.sqrt(1 + math.log(32) / math.log(SWITCH)))
    early = slice(1, SWITCH)  # position 0 is cos(0) = 1 either way
    assert (cos_long[0, early] - cos_short[0, early]).abs().max() > 0.5


@pytest.fixture(scope="module")
def longrope_run(one_layer):
    """Greedy generation of 12 tokens after a 4090-token prompt with the KV cache, and the no-cache
    forward over the final sequence (long factors everywhere: it is longer than 4096)."""
    model = one_layer
    ids = torch.randint(3, 32000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)  # fmt: skip
        generated = time.perf_counter()
        # one forward gives the no-cache logits of every prefix longer than 4096 (causal, all long)
        full = model(input_ids=out.sequences[:, :-1], logits_to_keep=NEW).logits[0]
    cached = torch.stack(out.logits, 1)[0]  # raw logits of each step, before min_new_tokens' processing
    after = range(SWITCH - PROMPT + 1, NEW)  # steps whose prefix is longer than 4096
    diffs = [(cached[k] - full[k]).abs().max().item() for k in after]
    agree = [int(cached[k].argmax() == full[k].argmax()) for k in after]
    FIGURES["longrope"] = {"generate, 4090 + 12 tokens, 1 layer (s)": generated - start,
                           "no-cache forward, 4101 tokens, 1 layer (s)": time.perf_counter() - generated,
                           "max abs logit diff after the switch": max(diffs),
                           "argmax agreement after the switch": f"{sum(agree)}/{len(agree)}"}  # fmt: skip
    return cached, full, after


def test_generation_across_the_longrope_switch_matches_the_full_forward(longrope_run):
    """The correct behaviour is transformers' Phi3ForCausalLM's: at the first step past 4096 positions
    the cache is dropped and the whole sequence re-encoded with the long factors, so cached generation
    gives what a no-cache forward over the same tokens gives, step for step. (The 7 steps before the
    switch are ordinary cached decoding; checking them would take another 4096-token forward.)"""
    cached, full, after = longrope_run
    for k in after:
        assert cached[k].argmax() == full[k].argmax(), f"step {k}: prefix of {PROMPT + k} tokens"
        torch.testing.assert_close(cached[k], full[k], atol=1e-3, rtol=1e-3)
