"""The model card (README.md) of a trained checkpoint: Hub metadata true to the run, how to load and
use it with an image and a clip, the recipe, the run's own figures, and what it cannot do.

`write_model_card(out_dir, summary, model_args, data_args, training_args)` is called by
`phi3mm.training.train` with the run summary it also writes to `run_summary.json`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

# Licences of the public components this project builds on, by hub id prefix.
LICENSES = {
    "microsoft/Phi-3": "mit",
    "openai/clip-": "mit",
    "google/siglip": "apache-2.0",
    "openai/whisper-": "apache-2.0",
}
# LLaVA's data files, as users download them, and the Hub data sets they come from.
KNOWN_DATASETS = {
    "blip_laion_cc_sbu_558k.json": "liuhaotian/LLaVA-Pretrain",
    "llava_instruct_150k.json": "liuhaotian/LLaVA-Instruct-150K",
    "llava_v1_5_mix665k.json": "liuhaotian/LLaVA-Instruct-150K",
}


def _hub_id(name) -> str | None:
    """`name` when it looks like a hub id (owner/name, not a local path), else None."""
    if not name or Path(str(name)).exists():
        return None
    parts = str(name).split("/")
    return str(name) if len(parts) == 2 and all(parts) and not str(name).startswith((".", "/")) else None


def card_metadata(summary: dict, components: dict, data_paths: list[str]) -> dict:
    """The card's YAML header: base models, licence, data sets, task and tags, all from the run."""
    base_models = [hub for hub in (_hub_id(components.get(k)) for k in ("text", "vision", "audio")) if hub]
    licenses = sorted({lic for hub in base_models for prefix, lic in LICENSES.items() if hub.startswith(prefix)})
    datasets = []
    for path in data_paths:
        hub = KNOWN_DATASETS.get(Path(str(path)).name) or _hub_id(path)
        if hub and hub not in datasets:
            datasets.append(hub)
    tags = ["phi3", "llava", "multimodal", "image-text-to-text"]
    tags += ["whisper", "audio"] if components.get("audio") else []
    tags += {"qlora": ["qlora", "lora", "peft"], "lora": ["lora", "peft"], "full": ["full-fine-tuning"]}.get(summary["tuning"], [])
    tags.append(f"stage-{summary['stage']}")
    metadata = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": tags}
    if base_models:
        metadata["base_model"] = base_models
    if len(licenses) == 1:
        metadata["license"] = licenses[0]
    elif licenses:  # the components' licences differ: the card says which applies to which
        metadata.update(license="other", license_name=" and ".join(licenses))
    if datasets:
        metadata["datasets"] = datasets
    return metadata


def render_model_card(summary: dict, components: dict, data_paths: list[str], recipe: dict, repo: str) -> str:
    metadata = card_metadata(summary, components, data_paths)
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "", "# Phi-3.5 that sees and hears", ""]
    described = {k: v for k, v in components.items() if v}
    lines += [
        "A multimodal chat model: " + ", ".join(f"{k} `{v}`" for k, v in described.items())
        + ", joined by trained projectors (LLaVA-1.5's `mlp2x_gelu` for images, stacked Whisper frames for audio).",
        "",
    ]
    if metadata.get("license") == "other":
        per_component = ", ".join(f"`{v}`: {lic}" for v in described.values() for p, lic in LICENSES.items() if str(v).startswith(p))
        lines += [f"Licences: the components keep their own ({per_component}).", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoProcessor",
        "",
        f'repo = "{repo}"',
        "# trust_remote_code runs the repository's Python files: pin revision=\"<commit sha>\" to the code you read.",
        'model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype="auto")',
        "processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)",
        "messages = [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"audio\"},",
        "                                            {\"type\": \"text\", \"text\": \"Answer the spoken question about the picture.\"}]}]",
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(text=prompt, images=["photo.jpg"], audio=["question.wav"], return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=128)",
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "## Training recipe",
        "",
        f"Trained with this project's `train_trainer.py`: stage `{summary['stage']}`, tuning `{summary['tuning']}`, "
        f"{summary['steps']} steps on {summary['rows']} rows ({summary['skipped_total']} skipped).",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in recipe.items()],
        "",
        "## This run's figures",
        "",
        f"- training loss: {_fmt(summary.get('first_logged_loss'))} at the first log, {_fmt(summary.get('last_logged_loss'))} at the last",
    ]
    if "merge" in summary:
        merge = summary["merge"]
        lines.append(
            f"- merged (full precision) vs trained (4-bit + LoRA) logits: max difference {merge['max_abs_logit_diff']:.2g}, "
            f"top-1 agreement {100 * merge['top1_agreement']:.1f}%"
        )
    evaluation = summary.get("eval", {}).get("by_type", {})
    if evaluation:
        blank = summary.get("eval_blank_media", {}).get("by_type", {})
        lines += ["", "| question type | n | held-out score | media blanked |", "|---|---|---|---|"]
        for kind, stat in evaluation.items():
            floor = f"{100 * blank[kind]['score']:.1f}%" if kind in blank else "-"
            lines.append(f"| {kind} | {stat['n']} | {100 * stat['score']:.1f}% | {floor} |")
    lines += [
        "",
        "## Limitations",
        "",
        "- The figures above come from this run's own held-out data only; no public benchmark was run.",
        "- Audio: up to 30 s is encoded at once (longer clips are cut into 30 s windows); the model answers in text only.",
        "- The vision path sees one fixed-size crop per image (no tiling): small text and fine detail can be missed.",
        "- It inherits the biases and failure modes of its components and training data, and can state wrong things fluently.",
    ]
    if summary["stage"] == "audio_align":
        lines.append(
            "- Speech: this run aligned the audio projector to spoken questions by distillation from the text path "
            "(`speech_aligned: true` in config.json, so the chat app sends them to the model's own ears); how well "
            "it hears voices and accents beyond its alignment data is untested here."
        )
    if not metadata.get("base_model"):
        lines.append("- The components were built locally (not public checkpoints): this is a test or demo model.")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def write_model_card(out_dir: Path, summary: dict, model_args, data_args, training_args, components: dict) -> Path:
    recipe = {
        "learning rate": training_args.learning_rate,
        "projector learning rate": model_args.projector_lr or training_args.learning_rate,
        "epochs": training_args.num_train_epochs if training_args.max_steps <= 0 else f"{training_args.max_steps} steps",
        "batch per device x accumulation x processes": f"{training_args.per_device_train_batch_size} x "
        f"{training_args.gradient_accumulation_steps} x {training_args.world_size}",
        "max length": data_args.max_length,
        "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
    }
    if summary["tuning"] in ("qlora", "lora"):
        recipe.update({"LoRA r / alpha / dropout": f"{model_args.lora_r} / {model_args.lora_alpha} / {model_args.lora_dropout}"})
    if summary["tuning"] == "qlora":
        recipe["quantization"] = f"NF4, double quantization, {model_args.bnb_compute_dtype} compute"
    data_paths = [p for p in (data_args.data_path, data_args.eval_data_path) if isinstance(p, (str, Path))]
    repo = training_args.hub_model_id or str(out_dir)
    path = Path(out_dir) / "README.md"
    path.write_text(render_model_card(summary, components, data_paths, recipe, repo))
    return path


__all__ = ["card_metadata", "render_model_card", "write_model_card"]
