"""python -m phi3mm.export_llava SRC DST [--overwrite]

Export the vision-and-text part of a checkpoint written by `phi3mm.build.save_checkpoint` (SRC)
as transformers' own `LlavaForConditionalGeneration` checkpoint plus a `LlavaProcessor` (DST),
which transformers loads without `trust_remote_code` and vLLM / SGLang serve as a LLaVA model.

The module layout of our model is LLaVA's, so the weights map one to one (see `KEY_MAP`); the
audio tower, the audio projector and the Whisper feature extractor are dropped (LLaVA has no
audio), and the script says so. A model with `image_token_pooling > 1` averages the patch grid
before the projector, and one with `image_token_order="columns"` reads the grid column by column;
LLaVA can express neither, so they are refused (exit status 1, nothing written).

    >>> from phi3mm.export_llava import export_llava   # or run the module
    >>> export_llava("outputs/demo/model", "outputs/demo/llava")
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

# The key mapping, by prefix. Column 1: our model's names. Column 2: the same weight's name in
# transformers' LlavaForConditionalGeneration in memory (the module layouts agree, so this is the
# identity; it is checked with a strict load). Column 3: the name written to disk, in the layout of
# the llava-hf checkpoints, which transformers (through its LLaVA and CLIPVisionModel conversion
# mappings), vLLM and SGLang all read: note CLIP's `vision_model.` level, which transformers 5's
# CLIPVisionModel no longer has in memory but vLLM's and SGLang's CLIP still have.
KEY_MAP = (
    # ours                            LLaVA in memory                   LLaVA on disk
    ("model.vision_tower.",           "model.vision_tower.",            "vision_tower.vision_model."),
    ("model.multi_modal_projector.",  "model.multi_modal_projector.",   "multi_modal_projector."),
    ("model.language_model.",         "model.language_model.",          "language_model.model."),
    ("lm_head.",                      "lm_head.",                       "language_model.lm_head."),
)  # fmt: skip
# Our key prefixes deliberately left out of the export (LLaVA has no audio).
DROPPED_PREFIXES = ("model.audio_tower.", "model.audio_projector.")

# What in a saved file would make transformers look for our remote code.
_REMOTE_CODE_KEYS = ("auto_map", "processor_class")


class ExportError(ValueError):
    """The checkpoint cannot be exported exactly as LLaVA."""


def check_exportable(config) -> None:
    """Raise ExportError when LLaVA cannot compute what this model computes."""
    if config.image_token_pooling != 1:
        raise ExportError(
            f"cannot export exactly to LLaVA: this model has image_token_pooling={config.image_token_pooling} "
            f"(it average-pools the {config.patches_per_side}x{config.patches_per_side} patch grid to "
            f"{config.image_seq_length} image tokens before the projector), and LlavaForConditionalGeneration "
            "has no pooling step. Only models with image_token_pooling=1 can be exported."
        )
    if config.image_token_order != "rows":
        raise ExportError(
            f"cannot export exactly to LLaVA: this model has image_token_order={config.image_token_order!r} (the "
            "language model reads the patch grid column by column), and LlavaForConditionalGeneration reads it row "
            "by row. Only models with image_token_order='rows' can be exported."
        )
    if config.vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ExportError(f"expected a CLIP or SigLIP vision tower, got {config.vision_config.model_type!r}")
    if not config.vision_cls_tokens and config.vision_feature_select_strategy == "default":
        # LLaVA's "default" drops the first token, which for a tower without CLS is a patch
        raise ExportError("a SigLIP tower must use vision_feature_select_strategy='full' for LLaVA to compute the same")
    if not isinstance(config.vision_feature_layer, int):
        raise ExportError(f"vision_feature_layer must be one int, got {config.vision_feature_layer!r}")


def map_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """Rename our weights by `KEY_MAP`: {LLaVA in-memory name: (on-disk name, tensor)}, and the dropped keys.

    Every source key must be either mapped by `KEY_MAP` or dropped by `DROPPED_PREFIXES`.
    """
    mapped, dropped, unknown = {}, [], []
    for key, tensor in state_dict.items():
        if key.startswith(DROPPED_PREFIXES):
            dropped.append(key)
            continue
        row = next((row for row in KEY_MAP if key.startswith(row[0])), None)
        if row is None:
            unknown.append(key)
            continue
        rest = key[len(row[0]) :]
        mapped[row[1] + rest] = (row[2] + rest, tensor)
    if unknown:
        raise ExportError(f"{len(unknown)} source weights have no place in LLaVA: {unknown[:10]}")
    return mapped, dropped


def llava_config(config) -> LlavaConfig:
    """LLaVA's config from ours: the same Phi-3 text config and CLIP vision config, the same glue."""
    text_config = config.text_config.to_dict()
    vision_config = config.vision_config.to_dict()
    for sub in (text_config, vision_config):
        sub.pop("_name_or_path", None)
        sub.pop("auto_map", None)
    # vLLM and SGLang build the language model from text_config.architectures.
    text_config["architectures"] = ["Phi3ForCausalLM"]
    vision_config.pop("architectures", None)
    return LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=config.image_token_id,
        image_seq_length=config.image_seq_length,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=config.tie_word_embeddings,
        dtype=config.dtype,
    )


def llava_processor(processor, config) -> LlavaProcessor:
    """A LlavaProcessor with our tokenizer (with <image>), image processor and chat template."""
    vision = config.vision_config
    image_processor, tokenizer = processor.image_processor, processor.tokenizer
    crop = getattr(image_processor, "crop_size", None) or {}
    if crop and (crop.get("height"), crop.get("width")) != (vision.image_size, vision.image_size):
        raise ExportError(
            f"the image processor crops to {crop} but the vision tower takes {vision.image_size} px images; "
            "LlavaProcessor counts image tokens from the pixel size, so they must agree"
        )
    for name in _REMOTE_CODE_KEYS:  # saved with our processor; must not follow into the export
        tokenizer.init_kwargs.pop(name, None)
        if hasattr(image_processor, name):
            delattr(image_processor, name)
    llava = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=config.vision_cls_tokens,  # CLIP's CLS ("default" drops it again); SigLIP: 0
    )
    n_tokens = (vision.image_size // vision.patch_size) ** 2 + config.vision_cls_tokens
    n_tokens -= config.vision_feature_select_strategy == "default"
    if n_tokens != config.image_seq_length or llava.image_token_id != config.image_token_id:
        raise ExportError(
            f"LlavaProcessor would give {n_tokens} tokens of id {llava.image_token_id} per image, the model expects "
            f"{config.image_seq_length} of id {config.image_token_id}"
        )
    return llava


def _strip_remote_code(dst: Path) -> None:
    """Remove auto_map / our processor_class from every saved json (LlavaProcessor sets its own)."""
    for path in dst.glob("*.json"):
        if path.name in ("tokenizer.json", "model.safetensors.index.json"):
            continue
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        changed = False
        for section in [data, *[v for v in data.values() if isinstance(v, dict)]]:
            if section.pop("auto_map", None) is not None:
                changed = True
            if section.get("processor_class") not in (None, "LlavaProcessor"):
                section["processor_class"] = "LlavaProcessor"
                changed = True
        if changed:
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_llava(src: str | Path, dst: str | Path, overwrite: bool = False, log=print) -> Path:
    """Write SRC's vision-and-text model as a LlavaForConditionalGeneration + LlavaProcessor in DST.

    Raises ExportError when the model cannot be exported exactly (nothing written), when DST
    exists and is not empty (unless `overwrite`), or when transformers does not read back from
    DST exactly the weights of SRC.
    """
    src, dst = Path(src), Path(dst)
    config = AutoConfig.from_pretrained(src, trust_remote_code=True)
    check_exportable(config)  # before loading weights or touching DST
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ExportError(f"{dst} exists and is not empty (pass --overwrite to replace it)")

    model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype="auto")
    processor = AutoProcessor.from_pretrained(src, trust_remote_code=True)
    source_state = model.state_dict()
    mapped, dropped = map_state_dict(source_state)

    new_config = llava_config(model.config)
    new_config.architectures = ["LlavaForConditionalGeneration"]
    # Every LLaVA weight filled, no mapped weight left over, every shape right (on the meta device:
    # no memory, no random init).
    with torch.device("meta"):
        shell = LlavaForConditionalGeneration(new_config)
    shell.load_state_dict({name: tensor for name, (_, tensor) in mapped.items()}, strict=True, assign=True)
    del shell
    new_processor = llava_processor(processor, model.config)

    if dst.exists() and overwrite:
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict({disk: tensor for disk, tensor in mapped.values()}, dst, metadata={"format": "pt"})
    new_config.save_pretrained(dst)
    generation_config = copy.deepcopy(model.generation_config)
    generation_config._from_model_config = False  # its own file now: eos ids (<|end|> too) and pad id as set
    generation_config.save_pretrained(dst)
    new_processor.save_pretrained(dst)
    _strip_remote_code(dst)

    # Read it back as transformers' own LLaVA: strict, and bit for bit the source weights.
    llava, info = LlavaForConditionalGeneration.from_pretrained(dst, dtype="auto", output_loading_info=True)
    problems = {k: sorted(v)[:10] for k, v in info.items() if v}
    loaded = llava.state_dict()
    if set(loaded) != set(mapped):
        problems["key sets differ"] = sorted(set(loaded) ^ set(mapped))[:10]
    if differ := [name for name in mapped if name in loaded and not torch.equal(loaded[name], mapped[name][1])]:
        problems["weights differ"] = differ[:10]
    if problems:
        raise ExportError(f"LlavaForConditionalGeneration does not load the export exactly: {problems}")

    log(f"exported {len(mapped)} weights to {dst} as LlavaForConditionalGeneration + LlavaProcessor (checked by reloading)")
    if dropped:
        n_audio = sum(source_state[k].numel() for k in dropped)
        log(
            f"dropped the audio branch: {len(dropped)} weights ({n_audio:,} parameters) of model.audio_tower / "
            "model.audio_projector, and the Whisper feature extractor; the export takes images and text only"
        )
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2], prog="python -m phi3mm.export_llava")
    parser.add_argument("src", help="checkpoint folder written by phi3mm.build.save_checkpoint")
    parser.add_argument("dst", help="output folder for the LLaVA checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it is not empty")
    args = parser.parse_args(argv)
    try:
        export_llava(args.src, args.dst, overwrite=args.overwrite)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
