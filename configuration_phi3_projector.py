"""Configuration of the Phi-3 + CLIP + Whisper multimodal model.

One composed config: a Phi-3 `text_config`, a CLIP `vision_config` and an optional Whisper
`audio_config` (no audio tower when it is absent), plus the few numbers that glue them together.
Everything derived from those numbers (tokens per image, tokens per 30 s of audio) is a property,
so it can never disagree with the towers.

    >>> from configuration_phi3_projector import Phi3ProjectorConfig
    >>> Phi3ProjectorConfig().image_seq_length  # CLIP-L/336: 24 x 24 patches, CLS dropped
    576
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Phi-3.5-mini's tokenizer holds 32011 tokens but its embedding has 32064 rows: the two placeholders
# take the first spare rows, so adding them needs no resize of the embedding or the head.
DEFAULT_IMAGE_TOKEN_ID = 32011
DEFAULT_AUDIO_TOKEN_ID = 32012

SAMPLING_RATE = 16_000  # Whisper's, and so every audio input's after loading
HOP_LENGTH = 160  # samples per mel frame at 16 kHz; Whisper's encoder halves the frames again


def audio_token_count(mel_frames, stack_factor: int, max_frames: int):
    """Audio tokens for one window of `mel_frames` real mel frames: the one formula the processor
    (placeholder expansion), the data set (length grouping) and the model (trimming) all use.

    The encoder halves the mel frames (50 per second), at most `max_frames` of them fill a window,
    and `stack_factor` of them make one token. Works on ints and on integer tensors alike.
    """
    encoder_frames = (mel_frames + 1) // 2
    if isinstance(encoder_frames, int):
        encoder_frames = min(max(encoder_frames, 1), max_frames)
    else:
        encoder_frames = encoder_frames.clamp(1, max_frames)
    return -(-encoder_frames // stack_factor)


AUTO_MAP = {
    "AutoConfig": "configuration_phi3_projector.Phi3ProjectorConfig",
    # AutoModel gives the generating model, as many remote-code VLMs do: tools that load unknown
    # model types through AutoModel (lmms-eval's generic Hugging Face model) must get one that generates.
    "AutoModel": "modeling_phi3_projector.Phi3ProjectorForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_phi3_projector.Phi3ProjectorForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_phi3_projector.Phi3ProjectorForConditionalGeneration",
    "AutoProcessor": "processing_multimodal.MultimodalProcessor",
}


class Phi3ProjectorConfig(PretrainedConfig):
    r"""
    Args:
        text_config: Phi-3 config of the language model (dict or config).
        vision_config: CLIP, SigLIP or SigLIP2 vision config (dict or config); defaults to CLIP-L/336.
        audio_config: Whisper config whose encoder is the audio tower; `None` means no audio.
        image_token_id: id of the `<image>` placeholder that the processor expands.
        audio_token_id: id of the `<audio>` placeholder that the processor expands.
        vision_feature_layer: hidden layer of the vision tower whose patch features are used
            (-2, the penultimate layer, as LLaVA-1.5).
        vision_feature_select_strategy: `"default"` drops CLIP's CLS token, `"full"` keeps it (SigLIP
            has no CLS token: it takes `"full"`, every patch).
        projector_hidden_act: activation between the two linears of both projectors.
        multimodal_projector_bias: whether the projector linears have biases (LLaVA's layout).
        image_token_pooling: average-pool the patch grid by this factor per side before the
            projector (1: 576 tokens at 336 px, 2: 144). A grid side it does not divide keeps its
            edge: the last, partial blocks average the patches they hold (SigLIP's 27 x 27 -> 14 x 14).
        image_token_order: `"rows"` hands the LM the (pooled) patch grid row by row, as LLaVA does;
            `"columns"` column by column, left half first, so that left and right are the first and
            the second half of the image tokens rather than every other pair of them.
        audio_stack_factor: Whisper encoder frames (50 per second) stacked into one audio token,
            so audio costs 50 / k tokens per second.
        component_models: the checkpoints the model was assembled from (`{"text", "vision", "audio"}`
            hub ids or folders), for the model card's metadata; recorded by the builder.
        audio_real_length: run the Whisper encoder on the real length of the audio (masked, with
            sliced position embeddings) instead of on windows padded to 30 s. The two give different
            features, so this records how the audio projector was trained. The builder sets it for
            new models; a checkpoint without the field was trained on padded windows.
        speech_aligned: the audio projector was aligned to speech (`--stage audio_align` sets it), so
            the model understands spoken questions through its own ears; the chat app says so, and
            without it suggests transcribing speech with Whisper first.
    """

    model_type = "phi3_projector"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="phi3"),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
            },
        ),
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", optional=True),
    }

    text_config: dict | PretrainedConfig | None = None
    vision_config: dict | PretrainedConfig | None = None
    audio_config: dict | PretrainedConfig | None = None
    image_token_id: int = DEFAULT_IMAGE_TOKEN_ID
    audio_token_id: int = DEFAULT_AUDIO_TOKEN_ID
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_token_pooling: int = 1
    image_token_order: str = "rows"
    audio_stack_factor: int = 5
    audio_real_length: bool = False
    speech_aligned: bool = False
    component_models: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_values()
        if getattr(self, "auto_map", None) is None:
            # One class serves several Auto classes, and save_pretrained records only one of them.
            self.auto_map = dict(AUTO_MAP)

    def _check_values(self) -> None:
        # Plain checks with ValueError (not only type hints): a bad value must fail here, with the
        # field's name, rather than as a shape error deep inside the first forward pass.
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' (drop CLS) or 'full' (keep CLS), "
                f"got {self.vision_feature_select_strategy!r}"
            )
        n_layers = self.vision_config.num_hidden_layers
        if not isinstance(self.vision_feature_layer, int) or not -(n_layers + 1) <= self.vision_feature_layer <= n_layers:
            raise ValueError(
                f"vision_feature_layer must be an int in [-{n_layers + 1}, {n_layers}] (the vision tower has "
                f"{n_layers} layers), got {self.vision_feature_layer!r}"
            )
        from transformers.activations import ACT2FN

        if self.projector_hidden_act not in ACT2FN:
            raise ValueError(f"projector_hidden_act {self.projector_hidden_act!r} is not a known activation")
        pooling = self.image_token_pooling
        if not isinstance(pooling, int) or pooling < 1:
            raise ValueError(f"image_token_pooling must be a positive int, got {pooling!r}")
        if pooling > 1 and self.vision_cls_tokens and self.vision_feature_select_strategy != "default":
            raise ValueError("image_token_pooling > 1 pools the patch grid, so it needs vision_feature_select_strategy='default'")
        if pooling > self.patches_per_side:
            raise ValueError(
                f"image_token_pooling={pooling} is larger than the patch grid side ({self.patches_per_side} = "
                f"image_size {self.vision_config.image_size} / patch_size {self.vision_config.patch_size})"
            )
        if self.image_token_order not in ("rows", "columns"):
            raise ValueError(f"image_token_order must be 'rows' or 'columns', got {self.image_token_order!r}")
        if self.image_token_order == "columns" and self.vision_cls_tokens and self.vision_feature_select_strategy != "default":
            raise ValueError("image_token_order='columns' reorders the patch grid, so it needs vision_feature_select_strategy='default'")
        for name in ("audio_real_length", "speech_aligned"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.audio_stack_factor, int) or self.audio_stack_factor < 1:
            raise ValueError(f"audio_stack_factor must be a positive int, got {self.audio_stack_factor!r}")
        vocab = self.text_config.vocab_size
        for name in ("image_token_id", "audio_token_id"):
            token_id = getattr(self, name)
            if not isinstance(token_id, int) or not 0 <= token_id < vocab:
                raise ValueError(f"{name} must be an id inside the vocabulary [0, {vocab}), got {token_id!r}")
        if self.image_token_id == self.audio_token_id:
            raise ValueError("image_token_id and audio_token_id must differ")

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def vision_layers_used(self) -> int:
        """Vision tower layers the features depend on: `vision_feature_layer` as an index into the
        tower's hidden states (0 = the embeddings), so -2 on a 24-layer tower is 23."""
        return self.vision_feature_layer % (self.vision_config.num_hidden_layers + 1)

    @property
    def vision_cls_tokens(self) -> int:
        """Tokens before the patches in the tower's output: CLIP's CLS; SigLIP has none."""
        return 1 if self.vision_config.model_type == "clip_vision_model" else 0

    @property
    def vision_feature_tokens(self) -> int:
        """Features per image as the tower gives them (before pooling): the patches, and CLIP's CLS
        with strategy "full"."""
        cls = self.vision_cls_tokens if self.vision_feature_select_strategy == "full" else 0
        return self.patches_per_side**2 + cls

    @property
    def image_seq_length(self) -> int:
        """Tokens one image takes in the language model's input."""
        if self.image_token_pooling == 1:
            return self.vision_feature_tokens
        side = -(-self.patches_per_side // self.image_token_pooling)  # partial edge blocks count
        return side * side

    @property
    def audio_tokens_per_window(self) -> int:
        """Tokens a full 30 s window of audio takes (the encoder gives 50 frames per second)."""
        if self.audio_config is None:
            return 0
        max_frames = self.audio_config.max_source_positions
        return audio_token_count(2 * max_frames, self.audio_stack_factor, max_frames)


__all__ = ["Phi3ProjectorConfig", "DEFAULT_IMAGE_TOKEN_ID", "DEFAULT_AUDIO_TOKEN_ID", "SAMPLING_RATE", "audio_token_count"]

Phi3ProjectorConfig.register_for_auto_class()
