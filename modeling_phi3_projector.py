"""Phi-3 language model that sees images (CLIP + projector) and hears audio (Whisper encoder + projector).

LLaVA-1.5's recipe with an audio branch: the processor expands every `<image>` placeholder to
`config.image_seq_length` copies and every `<audio>` placeholder to one copy per audio token; the
model encodes the media, projects them to the language model's width and writes them over those
positions with one `masked_scatter` per modality. The module layout (`model.vision_tower`,
`model.multi_modal_projector`, `model.language_model`, `lm_head`) is transformers' own
`LlavaForConditionalGeneration`'s, so the vision-and-text part exports to it key for key.

    >>> from transformers import AutoModelForCausalLM, AutoProcessor
    >>> model = AutoModelForCausalLM.from_pretrained("outputs/demo/model", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("outputs/demo/model", trust_remote_code=True)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_outputs import ModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder

try:  # loaded as Hub remote code (a package)
    from .configuration_phi3_projector import Phi3ProjectorConfig, audio_token_count
except ImportError:  # imported from the repository root
    from configuration_phi3_projector import Phi3ProjectorConfig, audio_token_count

IGNORE_INDEX = -100  # the label of a position no loss is taken at (PyTorch's cross-entropy default)


@dataclass
class Phi3ProjectorModelOutput(ModelOutput):
    """Output of `Phi3ProjectorModel`: the language model's output plus the projected media features."""

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    audio_hidden_states: torch.FloatTensor | None = None


@dataclass
class Phi3ProjectorCausalLMOutput(ModelOutput):
    """Output of `Phi3ProjectorForConditionalGeneration`; `loss` is set when `labels` are given."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    audio_hidden_states: torch.FloatTensor | None = None


class Phi3ProjectorMultiModalProjector(nn.Module):
    """`mlp2x_gelu`: vision width -> text width -> text width (LLaVA-1.5; same names as LLaVA's)."""

    def __init__(self, config: Phi3ProjectorConfig):
        super().__init__()
        text_width = config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, text_width, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_width, text_width, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class Phi3ProjectorAudioProjector(nn.Module):
    """Stacks `audio_stack_factor` encoder frames into one vector, then an MLP to the text width.

    Stacking (not averaging) keeps the fine timing inside each group of frames, which pooling
    would blur, at no extra cost in language-model tokens.
    """

    def __init__(self, config: Phi3ProjectorConfig):
        super().__init__()
        text_width = config.text_config.hidden_size
        self.stack_factor = config.audio_stack_factor
        self.linear_1 = nn.Linear(config.audio_config.d_model * self.stack_factor, text_width)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_width, text_width)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(windows, frames, d_model) -> (windows, ceil(frames / k), text width)."""
        windows, n_frames, width = frames.shape
        pad = -n_frames % self.stack_factor
        if pad:
            frames = nn.functional.pad(frames, (0, 0, 0, pad))
        stacked = frames.reshape(windows, -1, width * self.stack_factor)
        return self.linear_2(self.act(self.linear_1(stacked)))


class Phi3ProjectorPreTrainedModel(PreTrainedModel):
    config_class = Phi3ProjectorConfig
    config: Phi3ProjectorConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "audio", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer", "WhisperEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only the projectors are ours: the towers and the language model initialise themselves.
        if isinstance(module, (Phi3ProjectorMultiModalProjector, Phi3ProjectorAudioProjector)):
            std = self.config.text_config.initializer_range
            for linear in (module.linear_1, module.linear_2):
                linear.weight.normal_(mean=0.0, std=std)
                if linear.bias is not None:
                    linear.bias.zero_()


class Phi3ProjectorModel(Phi3ProjectorPreTrainedModel):
    """Towers, projectors and the Phi-3 body, without the language-model head."""

    def __init__(self, config: Phi3ProjectorConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = Phi3ProjectorMultiModalProjector(config)
        if config.audio_config is not None:
            self.audio_tower = WhisperEncoder(config.audio_config)
            self.audio_projector = Phi3ProjectorAudioProjector(config)
        else:
            self.audio_tower = None
            self.audio_projector = None
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def select_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's features as the projector takes them (what a feature cache stores).

        (images, 3, H, W) -> (images, patches [+1 CLS with strategy "full"], vision width)
        """
        channels = self.config.vision_config.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[0] == 0 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must have shape (images >= 1, {channels}, height, width), got {tuple(pixel_values.shape)}"
            )
        features = self._vision_hidden_state(pixel_values.to(dtype=self.vision_tower.dtype))
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, self.config.vision_cls_tokens :]  # CLIP's CLS dropped; SigLIP has none
        return features

    @property
    def _tower_kind(self) -> str:
        # From the config, not isinstance: PEFT's modules_to_save wraps the tower in a module that
        # is no CLIPVisionModel but hands attribute lookups (embeddings, encoder) to the trained copy.
        return self.config.vision_config.model_type

    def _vision_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's hidden state at `vision_feature_layer`, running only the layers it depends on.

        LLaVA runs the whole tower and keeps the penultimate layer, so CLIP-L's last layer (1/24 of
        the tower) is computed and thrown away; here, as in vLLM, it is not run at all. The result is
        the same tensor as `hidden_states[vision_feature_layer]` of a full forward.
        """
        tower, n_layers = self.vision_tower, self.config.vision_layers_used
        if self._tower_kind == "clip_vision_model":
            hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
        elif self._tower_kind == "siglip_vision_model":  # SigLIP and fixed-resolution SigLIP2
            hidden = tower.embeddings(pixel_values)
        else:  # another tower: its own forward, all layers
            return tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states[n_layers]
        for layer in tower.encoder.layers[:n_layers]:
            hidden = layer(hidden, None)  # no attention mask: every patch sees every patch
        return hidden

    def unused_vision_modules(self) -> list[nn.Module]:
        """Parts of the vision tower no feature depends on: the layers after `vision_feature_layer`,
        the post-layernorm (and SigLIP's pooling head). They get no gradient, so training freezes
        them (DDP requires every trainable parameter to receive one)."""
        tower = self.vision_tower
        if self._tower_kind not in ("clip_vision_model", "siglip_vision_model"):
            return []
        unused = [*tower.encoder.layers[self.config.vision_layers_used :], tower.post_layernorm]
        return unused + ([tower.head] if getattr(tower, "head", None) is not None else [])

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected image tokens, from pixels or from precomputed `select_vision_features` output.

        Returns (images, config.image_seq_length, text width).
        """
        if vision_features is None:
            vision_features = self.select_vision_features(pixel_values)
        expected = self.config.vision_feature_tokens
        if vision_features.ndim != 3 or vision_features.shape[1] != expected:
            raise ValueError(
                f"vision features must have shape (images, {expected}, {self.config.vision_config.hidden_size}), "
                f"got {tuple(vision_features.shape)}"
            )
        pooling, by_columns = self.config.image_token_pooling, self.config.image_token_order == "columns"
        if pooling > 1 or by_columns:
            images, patches, width = vision_features.shape
            side = self.config.patches_per_side
            grid = vision_features.transpose(1, 2).reshape(images, width, side, side)  # (images, width, rows, columns)
            if pooling > 1:  # average each pooling x pooling block of the patch grid
                # ceil_mode: a grid side that pooling does not divide keeps its edge, each partial
                # block averaged over the patches it holds (SigLIP's 27 x 27 -> 14 x 14)
                grid = nn.functional.avg_pool2d(grid, pooling, ceil_mode=True)
            if by_columns:
                grid = grid.transpose(2, 3)
            vision_features = grid.flatten(2).transpose(1, 2)
        projector_dtype = self.multi_modal_projector.linear_1.weight.dtype
        return self.multi_modal_projector(vision_features.to(projector_dtype))

    def get_audio_features(
        self,
        input_features: torch.Tensor | None,
        input_features_mask: torch.Tensor,
        audio_encoder_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected audio tokens of every 30 s window, trimmed to the real audio, concatenated.

        input_features: (windows, mel bins, 3000) log-mel windows, zero-padded to 30 s as Whisper expects.
        input_features_mask: (windows, mel frames), 1 on the real mel frames of each window.
        audio_encoder_states: (windows, frames, audio width) instead of input_features: the Whisper
            encoder's output, precomputed (phi3mm.audio_cache) so that a frozen encoder runs once per
            clip rather than once per epoch; at least the frames the window's tokens stack.
        Returns (total audio tokens, text width), in window order.
        """
        if self.audio_tower is None:
            raise ValueError("this model has no audio tower (config.audio_config is None), so it cannot take audio")
        if (input_features is None) == (audio_encoder_states is None):
            raise ValueError("pass input_features or audio_encoder_states (precomputed encoder output), exactly one")
        windows = (input_features if input_features is not None else audio_encoder_states).shape[0]
        if input_features_mask.ndim != 2 or input_features_mask.shape[0] != windows:
            raise ValueError(
                f"input_features_mask must have shape (windows, mel frames) with {windows} windows, "
                f"got {tuple(input_features_mask.shape)}"
            )
        mel_lengths = input_features_mask.long().sum(-1)
        n_tokens = self.audio_token_counts(mel_lengths)
        if audio_encoder_states is not None:
            width, needed = self.config.audio_config.d_model, int(self.audio_frames_used(mel_lengths).max())
            if audio_encoder_states.ndim != 3 or windows == 0 or audio_encoder_states.shape[2] != width:
                raise ValueError(
                    f"audio_encoder_states must have shape (windows >= 1, frames, {width}), got {tuple(audio_encoder_states.shape)}"
                )
            if audio_encoder_states.shape[1] < needed:
                raise ValueError(f"audio_encoder_states hold {audio_encoder_states.shape[1]} frames; the audio needs {needed}")
            frames = audio_encoder_states.to(self.audio_projector.linear_1.weight.dtype)
        else:
            mel_bins = self.config.audio_config.num_mel_bins
            if input_features.ndim != 3 or windows == 0 or input_features.shape[1] != mel_bins:
                raise ValueError(
                    f"input_features must have shape (windows >= 1, {mel_bins}, frames), got {tuple(input_features.shape)}"
                )
            if input_features_mask.shape[1] != input_features.shape[2]:
                raise ValueError(
                    f"input_features_mask must have shape (windows, frames) = {(windows, input_features.shape[2])}, "
                    f"got {tuple(input_features_mask.shape)}"
                )
            frames = self.encode_audio(input_features, mel_lengths)
        if self.config.audio_real_length:
            # The last token of a window stacks frames past its real audio too: zeros, not the encoder's
            # output at padded positions (which depends on how far the batch was padded), so a clip gives
            # the same tokens alone, beside a longer one, or from the feature cache.
            real_frames = self.audio_frames_used(mel_lengths).to(frames.device)
            padded = torch.arange(frames.shape[1], device=frames.device)[None, :] >= real_frames[:, None]
            frames = frames.masked_fill(padded[..., None], 0.0)
        tokens = self.audio_projector(frames)
        return torch.cat([window[:n] for window, n in zip(tokens, n_tokens.tolist())])

    def encode_audio(self, input_features: torch.Tensor, mel_lengths: torch.Tensor) -> torch.Tensor:
        """The Whisper encoder's output (windows, frames, audio width), as the projector takes it."""
        input_features = input_features.to(dtype=self.audio_tower.dtype)
        if self.config.audio_real_length:
            return self._encode_real_length(input_features, mel_lengths)
        # every window padded to 30 s, as checkpoints from before `audio_real_length` were trained
        return self.audio_tower(input_features, return_dict=True).last_hidden_state

    def _encode_real_length(self, input_features: torch.Tensor, mel_lengths: torch.Tensor) -> torch.Tensor:
        """Whisper's encoder over the real audio only, as Ultravox runs it: the windows are cut to the
        longest one's length (rounded up to a multiple of 16 encoder frames), the position embeddings
        sliced to match, and padded frames masked out of attention, so a clip encodes the same alone
        or beside a longer one. A 3 s question costs 3 s of encoding, not 30.

        Returns (windows, frames, audio width); frames past a window's real length are padding.
        """
        encoder = self.audio_tower
        max_frames = self.config.audio_config.max_source_positions
        real_frames = ((mel_lengths + 1) // 2).clamp(1, max_frames)
        n_frames = min(-(-int(real_frames.max()) // 16) * 16, max_frames, input_features.shape[-1] // 2)
        # Two mel frames past the cut: the convolutions at the last kept frame then read the window's
        # own (silence) frames rather than their zero padding, whatever length the batch was cut to.
        hidden = nn.functional.gelu(encoder.conv1(input_features[..., : 2 * n_frames + 2]))
        hidden = nn.functional.gelu(encoder.conv2(hidden))[..., :n_frames].transpose(1, 2)
        hidden = hidden + encoder.embed_positions.weight[:n_frames].to(hidden.dtype)
        hidden = nn.functional.dropout(hidden, p=encoder.dropout, training=encoder.training)
        padded = torch.arange(n_frames, device=hidden.device)[None, :] >= real_frames.to(hidden.device)[:, None]
        mask = torch.zeros(padded.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(padded, torch.finfo(hidden.dtype).min)[:, None, None, :]  # (windows, 1, 1, keys)
        for layer in encoder.layers:
            hidden = layer(hidden, mask)
        return encoder.layer_norm(hidden)

    def audio_frames_used(self, mel_lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames per window that its tokens read: the real ones when encoding at the real
        length (the frames after them are zeros), else all the last token stacks."""
        if self.config.audio_real_length:
            return ((mel_lengths + 1) // 2).clamp(1, self.config.audio_config.max_source_positions)
        return self.audio_token_counts(mel_lengths) * self.config.audio_stack_factor

    def audio_token_counts(self, mel_lengths: torch.Tensor) -> torch.Tensor:
        """Audio tokens per window for windows of `mel_lengths` real mel frames (the encoder halves them)."""
        return audio_token_count(mel_lengths, self.config.audio_stack_factor, self.config.audio_config.max_source_positions)

    def _scatter(self, input_ids, inputs_embeds, features, token_id, modality):
        mask = input_ids == token_id
        n_tokens, n_features = int(mask.sum()), features.shape[0]
        if n_tokens != n_features:
            raise ValueError(
                f"{modality} tokens and {modality} features do not match: the input has {n_tokens} <{modality}> "
                f"tokens but the {modality} inputs give {n_features} features. Build inputs with the processor, "
                f"which expands each <{modality}> placeholder to the right number of tokens."
            )
        mask = mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.device, inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.LongTensor | None = None,
        audio_encoder_states: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> Phi3ProjectorModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens.ndim != (2 if input_ids is not None else 3) or tokens.shape[1] == 0:
            raise ValueError(f"expected a (batch, sequence >= 1) input, got one of shape {tuple(tokens.shape)}")
        has_images = pixel_values is not None or vision_features is not None
        has_audio = input_features is not None or audio_encoder_states is not None
        if (has_images or has_audio) and input_ids is None:
            raise ValueError("images and audio need input_ids: their placeholder tokens mark where they go")
        if pixel_values is not None and vision_features is not None:
            raise ValueError("pass pixel_values or vision_features, not both")

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = audio_features = None
        if has_images:
            image_features = self.get_image_features(pixel_values, vision_features).flatten(0, 1)
            inputs_embeds = self._scatter(input_ids, inputs_embeds, image_features, self.config.image_token_id, "image")
        if has_audio:
            if input_features_mask is None:
                raise ValueError("input_features_mask is needed with the audio: it says how much of each window is real audio")
            audio_features = self.get_audio_features(input_features, input_features_mask, audio_encoder_states)
            inputs_embeds = self._scatter(input_ids, inputs_embeds, audio_features, self.config.audio_token_id, "audio")

        return_dict = kwargs.pop("return_dict", None)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        output = Phi3ProjectorModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            audio_hidden_states=audio_features,
        )
        return output if return_dict is not False else output.to_tuple()


class Phi3ProjectorForConditionalGeneration(Phi3ProjectorPreTrainedModel, GenerationMixin):
    """The full model: `Phi3ProjectorModel` plus the language-model head and the loss."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: Phi3ProjectorConfig):
        super().__init__(config)
        self.model = Phi3ProjectorModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values=None, vision_features=None) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, vision_features)

    def get_audio_features(self, input_features, input_features_mask, audio_encoder_states=None) -> torch.Tensor:
        return self.model.get_audio_features(input_features, input_features_mask, audio_encoder_states)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.LongTensor | None = None,
        audio_encoder_states: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        **kwargs,
    ) -> Phi3ProjectorCausalLMOutput:
        r"""
        Shapes: input_ids (batch, seq); pixel_values (images, 3, H, W) in the order the `<image>`
        blocks appear, row by row; vision_features (images, patches, vision width) instead of
        pixel_values; input_features (windows, mel bins, 3000) and input_features_mask
        (windows, 3000) for the audio, or audio_encoder_states (windows, frames, audio width) with
        the same mask instead of input_features; labels (batch, seq) with -100 where no loss is taken
        (shifted here, once).

        `skip_logits=True` with labels runs the head only at the supervised positions and returns
        `logits=None`: the loss is the same, without the (batch, seq, vocab) logits of every image
        and prompt token (Liger's option of the same name). This project's trainer turns it on;
        by default the full logits come back, in training mode too.

        Example:

        ```python
        >>> inputs = processor(text="<|user|>\n<image>\nWhat color is the shape?<|end|>\n<|assistant|>\n",
        ...                    images=image, return_tensors="pt")
        >>> processor.decode(model.generate(**inputs, max_new_tokens=8)[0, inputs["input_ids"].shape[1]:])
        ```
        """
        return_dict = kwargs.pop("return_dict", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            vision_features=vision_features,
            input_features=input_features,
            input_features_mask=input_features_mask,
            audio_encoder_states=audio_encoder_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        if skip_logits and labels is not None and isinstance(logits_to_keep, int) and logits_to_keep == 0:
            loss = self._supervised_loss(hidden_states, labels, **kwargs)
        else:
            if isinstance(logits_to_keep, int):
                hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
            else:
                hidden_states = hidden_states[:, logits_to_keep]
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
                )
        output = Phi3ProjectorCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            audio_hidden_states=outputs.audio_hidden_states,
        )
        return output if return_dict is not False else output.to_tuple()

    def _supervised_loss(self, hidden_states, labels, num_items_in_batch=None, shift_labels=None, **_) -> torch.Tensor:
        """transformers' causal-LM loss (same shift, -100 ignored, same reduction with and without
        `num_items_in_batch`) with the head applied only where a label supervises. LLaVA's rows
        are mostly unsupervised (576 image tokens and the question), and at Phi-3.5's 32k
        vocabulary the skipped logits are the largest activation of the step."""
        if shift_labels is None:  # tokens < n predict n; the last one predicts nothing
            shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        shift_labels = shift_labels.to(hidden_states.device)
        supervised = shift_labels != IGNORE_INDEX
        logits = self.lm_head(hidden_states[supervised]).float()
        return fixed_cross_entropy(logits, shift_labels[supervised], num_items_in_batch)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, is_first_iteration: bool = False, **kwargs):
        # LongRoPE (Phi-3.5: short factors up to 4096 positions, long ones past it) re-encodes every
        # position with the long factors once the sequence passes the switch, so the keys cached
        # with the short ones are stale: as Phi3ForCausalLM does, drop the cache at the first step
        # past it and re-encode everything, media included (hence a first iteration again).
        rope = getattr(self.config.text_config, "rope_parameters", None) or {}
        switch = rope.get("original_max_position_embeddings") if rope.get("rope_type") == "longrope" else None
        if switch and past_key_values is not None and input_ids.shape[1] > switch and past_key_values.get_seq_length() <= switch:
            past_key_values, is_first_iteration = None, True
            kwargs["next_sequence_length"] = None
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, is_first_iteration=is_first_iteration, **kwargs
        )
        # GenerationMixin already keeps pixel_values and input_features to the prefill; cached
        # features must follow them, since later steps carry no <image> or <audio> tokens.
        if not is_first_iteration and kwargs.get("use_cache", True):
            model_inputs.pop("vision_features", None)
            model_inputs.pop("audio_encoder_states", None)
        return model_inputs


__all__ = [
    "IGNORE_INDEX",
    "Phi3ProjectorAudioProjector",
    "Phi3ProjectorForConditionalGeneration",
    "Phi3ProjectorModel",
    "Phi3ProjectorMultiModalProjector",
    "Phi3ProjectorPreTrainedModel",
]

Phi3ProjectorForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
# For remote-code models, generate() inspects the forward's signature at every decode step (to see
# whether it takes `cache_position`). Building it took ~22 us a step, the whole gap between the
# tiny model's decode step and LLaVA's; inspect returns a stored one in ~6 us.
Phi3ProjectorForConditionalGeneration.forward.__signature__ = inspect.signature(Phi3ProjectorForConditionalGeneration.forward)
