"""Assemble the multimodal model from pretrained components, and build tiny offline components.

    python -m phi3mm.build outputs/tiny [--no-audio] [--image_token_pooling 2]   # a tiny random checkpoint, no network

`build_model_and_processor` is the one road to a model, for real and tiny components alike: it
loads a Phi-3 causal LM, a CLIP vision tower and (optionally) a Whisper encoder by hub id or local
folder, adds the `<image>` / `<audio>` tokens, and initialises the projectors. The tiny builders
below only write small random components to folders, which then take that same road.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionModel,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    SiglipVisionModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperModel,
)
from transformers.utils import logging as transformers_logging

from configuration_phi3_projector import Phi3ProjectorConfig
from modeling_phi3_projector import (
    Phi3ProjectorAudioProjector,
    Phi3ProjectorForConditionalGeneration,
    Phi3ProjectorMultiModalProjector,
)
from processing_multimodal import CHAT_TEMPLATE, MultimodalProcessor

IMAGE_TOKEN, AUDIO_TOKEN = "<image>", "<audio>"

# Phi-3.5-mini's added tokens, in its order (ids 32000..32010 there).
PHI3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
]  # fmt: skip


def build_model_and_processor(
    text_model: str | os.PathLike,
    vision_model: str | os.PathLike,
    audio_model: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config_options,
) -> tuple[Phi3ProjectorForConditionalGeneration, MultimodalProcessor]:
    """Load the three components (hub ids or folders), join them, and return model and processor.

    `config_options` go to `Phi3ProjectorConfig` (vision_feature_layer, image_token_pooling, ...).
    """
    tokenizer = AutoTokenizer.from_pretrained(text_model)
    language_model = AutoModelForCausalLM.from_pretrained(text_model, dtype=dtype)
    vision_class = _vision_tower_class(vision_model)
    with _quiet_loading():  # a full CLIP / SigLIP checkpoint's text half is "unexpected" by design
        vision_tower = vision_class.from_pretrained(vision_model, dtype=dtype)
    if vision_class is SiglipVisionModel:  # no CLS token: every patch is a feature
        config_options.setdefault("vision_feature_select_strategy", "full")
    image_processor = AutoImageProcessor.from_pretrained(vision_model)
    audio_tower = feature_extractor = None
    if audio_model is not None:
        with _quiet_loading():
            audio_tower = WhisperModel.from_pretrained(audio_model, dtype=dtype).get_encoder()
        feature_extractor = WhisperFeatureExtractor.from_pretrained(audio_model)

    # The placeholders reuse spare embedding rows where the vocabulary has them (Phi-3.5: 32011
    # tokens, 32064 rows); otherwise the embedding grows to the next multiple of 64.
    tokenizer.add_tokens([IMAGE_TOKEN, AUDIO_TOKEN], special_tokens=True)
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    tokenizer.padding_side = "left"  # batched generation appends on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    text_eos_id = tokenizer.eos_token_id
    if "<|end|>" in tokenizer.get_vocab():
        # An answer ends with <|end|>: tools that stop at tokenizer.eos_token_id alone (lmms-eval,
        # simple generate loops) must stop there too, as Microsoft set for Phi-3-mini-instruct.
        tokenizer.eos_token = "<|end|>"
    tokenizer.model_max_length = language_model.config.max_position_embeddings

    config = Phi3ProjectorConfig(
        text_config=language_model.config,
        vision_config=vision_tower.config,
        audio_config=audio_tower.config if audio_tower is not None else None,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        # new projectors learn on real-length encoding; the card's metadata names the components
        **{"audio_real_length": True, "component_models": _component_names(text_model, vision_model, audio_model),
           **config_options},
    )
    # Build the shell on the meta device (no memory, no random init of billions of weights), then
    # put the loaded components in and create the projectors for real.
    with torch.device("meta"):
        model = Phi3ProjectorForConditionalGeneration(config)
    model.model.language_model = language_model.model
    model.lm_head = language_model.lm_head
    model.model.vision_tower = vision_tower
    torch.manual_seed(seed)
    model.model.multi_modal_projector = Phi3ProjectorMultiModalProjector(config)
    model._init_weights(model.model.multi_modal_projector)
    if audio_tower is not None:
        model.model.audio_tower = audio_tower
        model.model.audio_projector = Phi3ProjectorAudioProjector(config)
        model._init_weights(model.model.audio_projector)
    model.to(dtype)

    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    model.generation_config = language_model.generation_config
    # The language model's published stop ids (Phi-3.5: <|end|>, <|assistant|>, <|endoftext|>),
    # with <|end|> and the end of text added where missing.
    published = model.generation_config.eos_token_id
    published = [published] if isinstance(published, int) else list(published or [])
    model.generation_config.eos_token_id = [*published, *(i for i in (end_id, text_eos_id) if i not in published)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # transformers' default max_length of 20 cuts answers off (with a warning) when a caller sets no length.
    model.generation_config.max_new_tokens = 512

    processor = MultimodalProcessor(
        image_processor=image_processor,
        feature_extractor=feature_extractor if feature_extractor is not None else WhisperFeatureExtractor(),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
        audio_stack_factor=config.audio_stack_factor,
        audio_max_frames=audio_tower.config.max_source_positions if audio_tower is not None else 1500,
    )
    return model, processor


def _vision_tower_class(vision_model):
    """CLIPVisionModel or SiglipVisionModel (SigLIP, and SigLIP2 at a fixed resolution), from the
    checkpoint's config; a clear error for the others."""
    model_type = AutoConfig.from_pretrained(vision_model).model_type
    if model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel
    if model_type in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel
    if model_type.startswith("siglip2"):
        raise ValueError(
            f"{vision_model} is a SigLIP2 NaFlex checkpoint (variable resolution and aspect ratio), which needs a "
            "patch mask this model does not pass; use a fixed-resolution SigLIP2 checkpoint (such as "
            "google/siglip2-so400m-patch14-384, which loads as SigLIP) or a SigLIP / CLIP one"
        )
    raise ValueError(f"{vision_model}: vision towers of type {model_type!r} are not supported (CLIP or SigLIP)")


def _component_names(*names) -> dict[str, str | None]:
    """{"text", "vision", "audio"}: hub ids as given, local folders by their resolved path."""
    return {kind: (str(name) if name is not None else None) for kind, name in zip(("text", "vision", "audio"), names)}


@contextlib.contextmanager
def _quiet_loading():
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def save_checkpoint(model, processor, out_dir: str | os.PathLike) -> Path:
    """Write weights (safetensors), the three model files, the processor and the auto_map."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Tiny offline components (random weights) for tests, the demo and benchmarks.
# ---------------------------------------------------------------------------------------------

TOKENIZER_CORPUS = """
What color is the shape? What shape is this? Is the shape on the left or the right?
Is the tone high or low? How many beeps are there? Describe the image. Transcribe the audio.
red green blue yellow circle square triangle left right high low one two three four five
The image shows a small red circle on the left side of a white background.
The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine, thank you.
You are a helpful assistant that answers questions about images and sounds in one word.
0 1 2 3 4 5 6 7 8 9 10 100 yes no maybe a an the of to in on at is are was were be it this that
"""


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Phi-3.5's special tokens and chat format, trained locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TOKENIZER_CORPUS.split("\n") * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens=None,
    )
    tokenizer.add_tokens(PHI3_SPECIAL_TOKENS, special_tokens=True)
    return tokenizer


def make_tiny_components(
    out_dir: str | os.PathLike,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 64,
    patch_size: int = 16,
    with_audio: bool = True,
    audio_window_seconds: int = 30,
    spare_embedding_rows: bool = True,
    seed: int = 0,
    intermediate_size: int | None = None,
    num_attention_heads: int = 4,
    vision_hidden_size: int | None = None,
    vision_intermediate_size: int | None = None,
    vision_layers: int | None = None,
    vision_attention_heads: int = 2,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write a tiny Phi-3 LM + tokenizer, a tiny CLIP and a tiny Whisper to `out_dir/{text,vision,audio}`.

    They are saved as the Hub's checkpoints are (a full CLIPModel, a Whisper seq2seq model), so
    loading them exercises the real path. `spare_embedding_rows=False` makes the embedding exactly
    as large as the tokenizer, so adding the placeholders has to resize it. `audio_window_seconds`
    below Whisper's 30 makes a tower that encodes shorter windows (the demo's clips are under 2 s).
    The shape options (MLP widths default to twice the width, the vision tower to the LM's width
    and depth, `vocab_size` to the tokenizer's rows) let `phi3mm.bench` build its larger sizes up
    to Phi-3.5-mini + CLIP-L/336, initialised on `device` in `dtype` (a GPU initialises billions of
    weights in seconds; bf16 halves the memory). `tokenizer` (a folder or hub id) replaces the
    locally trained byte-level one, e.g. the real Phi-3.5 tokenizer of `phi3mm.real_parts`
    (32,011 tokens: the embedding gets Phi-3.5's 32,064 rows).
    """
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer) if tokenizer is not None else build_tiny_tokenizer()
    n_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = (n_tokens + 2 + 63) // 64 * 64 if spare_embedding_rows else n_tokens
    vision_width = vision_hidden_size or hidden_size  # half the LM's width learnt shapes more slowly
    text_config = Phi3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"),
        tie_word_embeddings=False,
        # At width 64, the usual 0.02 leaves every block close to the identity and LoRA building
        # attention from nothing (left/right stayed at chance); 0.5/sqrt(width) gives it something to adapt.
        initializer_range=0.5 / hidden_size**0.5,
    )
    width = hidden_size // 2
    clip_config = CLIPConfig(
        text_config=dict(hidden_size=width, intermediate_size=width * 2, num_hidden_layers=1, num_attention_heads=2, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=vision_intermediate_size or vision_width * 2,
            num_hidden_layers=vision_layers or num_layers,
            num_attention_heads=vision_attention_heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=vision_width,
    )
    paths = {"text": out_dir / "text", "vision": out_dir / "vision"}
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            language_model = Phi3ForCausalLM(text_config)
            # A trained LM's head can express a confident next token; one initialised at std 0.02 caps
            # every logit near zero (|logit| <= 0.02 * width after the final norm), which no adapter on the
            # body can undo. Rows of norm 1.5 give the tiny LM a head a trained model would have.
            torch.nn.init.normal_(language_model.lm_head.weight, std=1.5 / hidden_size**0.5)
            language_model.save_pretrained(paths["text"])
            del language_model
            clip = CLIPModel(clip_config)
            # CLIP initialises position embeddings at std 0.02, ~28x below what a 16x16 patch's content
            # embedding carries (std ~0.56 for unit-variance pixels), so a random tower all but erases where
            # a patch is; a trained CLIP's position embeddings are on the scale of its patch embeddings.
            torch.nn.init.normal_(clip.vision_model.embeddings.position_embedding.weight, std=0.5)
            clip.save_pretrained(paths["vision"])
            del clip
    finally:
        torch.set_default_dtype(previous_dtype)
    tokenizer.save_pretrained(paths["text"])
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(paths["vision"])

    if with_audio:
        paths["audio"] = out_dir / "audio"
        whisper_config = WhisperConfig(
            d_model=width,
            encoder_layers=num_layers,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=width * 2,
            decoder_ffn_dim=width * 2,
            num_mel_bins=80,
            max_source_positions=audio_window_seconds * 50,
            max_target_positions=64,
        )
        WhisperForConditionalGeneration(whisper_config).save_pretrained(paths["audio"])
        WhisperFeatureExtractor(feature_size=80, chunk_length=audio_window_seconds).save_pretrained(paths["audio"])
    return paths


def build_tiny_model(work_dir: str | os.PathLike, with_audio: bool = True, audio_model=None, **options):
    """Tiny components in `work_dir`, then the same `build_model_and_processor` a real run uses.

    Options named in `make_tiny_components` shape the components (`dtype` goes to both); the rest
    go to `build_model_and_processor` (`image_token_pooling`, ...). `audio_model` (a folder or hub
    id) puts a pretrained Whisper in place of the tiny random one.
    """
    component_keys = set(inspect.signature(make_tiny_components).parameters) - {"dtype"}
    component_options = {k: options.pop(k) for k in list(options) if k in component_keys}
    if "dtype" in options:
        component_options["dtype"] = options["dtype"]
    paths = make_tiny_components(work_dir, with_audio=with_audio and audio_model is None, **component_options)
    audio = (audio_model or paths.get("audio")) if with_audio else None
    return build_model_and_processor(paths["text"], paths["vision"], audio, **options)


def main(argv: list[str] | None = None) -> None:
    """Write a tiny random checkpoint that loads like the real one (Auto classes, remote code)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m phi3mm.build", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--no-audio", dest="with_audio", action="store_false", help="no Whisper tower")
    parser.add_argument("--image_token_pooling", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as components:
        model, processor = build_tiny_model(
            components, with_audio=args.with_audio, image_token_pooling=args.image_token_pooling, seed=args.seed
        )
        save_checkpoint(model, processor, args.out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out_dir} ({n_params / 1e6:.2f}M parameters, audio tower: {args.with_audio})")


__all__ = ["build_model_and_processor", "build_tiny_model", "build_tiny_tokenizer", "make_tiny_components", "save_checkpoint"]


if __name__ == "__main__":
    main()
