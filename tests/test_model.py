"""The model: media merging, feature paths, loss, generation with the KV cache, checkpointing."""

import copy
from threading import Thread

import numpy as np
import pytest
import torch
from transformers import TextIteratorStreamer

from conftest import shape_image, tone

USER = "<|user|>\n{}<|end|>\n<|assistant|>\n"


def encode(processor, text, images=None, audio=None, **kwargs):
    return processor(text=text, images=images, audio=audio, return_tensors="pt", **kwargs)


def test_image_and_audio_tokens_are_replaced_by_their_features(tiny):
    model, processor = tiny
    prompt = USER.format("<image>\n<audio>\nWhat is it?")
    red = encode(processor, prompt, [shape_image((255, 0, 0))], [tone(300)])
    blue = encode(processor, prompt, [shape_image((0, 0, 255))], [tone(300)])
    high = encode(processor, prompt, [shape_image((255, 0, 0))], [tone(2500)])
    with torch.no_grad():
        out = model(**red)
        assert out.image_hidden_states.shape == (processor.image_seq_length, model.config.text_config.hidden_size)
        assert out.audio_hidden_states.shape[0] == int((red["input_ids"] == model.config.audio_token_id).sum())
        last = out.logits[0, -1]
        assert not torch.allclose(last, model(**blue).logits[0, -1]), "the image does not reach the output"
        assert not torch.allclose(last, model(**high).logits[0, -1]), "the audio does not reach the output"


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_token_feature_mismatch_is_a_clear_value_error(tiny, modality):
    model, processor = tiny
    inputs = encode(processor, USER.format("<image>\n<audio>\nHi"), [shape_image()], [tone()])
    token_id = getattr(model.config, f"{modality}_token_id")
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == token_id).nonzero()[0]] = processor.tokenizer.pad_token_id  # one token fewer
    with pytest.raises(ValueError, match=f"{modality} tokens and {modality} features do not match"):
        model(**{**inputs, "input_ids": ids})


def test_precomputed_vision_features_match_the_tower(tiny):
    model, processor = tiny
    inputs = encode(processor, USER.format("<image>\nWhat color?"), [shape_image()])
    with torch.no_grad():
        features = model.model.select_vision_features(inputs["pixel_values"])
        from_pixels = model(**inputs).logits
        cached = {k: v for k, v in inputs.items() if k != "pixel_values"}
        from_cache = model(**cached, vision_features=features).logits
    assert torch.equal(from_pixels, from_cache)


def test_vision_features_skip_the_tower_layers_after_the_feature_layer(tiny):
    """The penultimate layer's features equal a full forward's, without running the last layer."""
    model, processor = tiny
    pixels = encode(processor, USER.format("<image>\nWhat?"), [shape_image()])["pixel_values"]
    tower = model.model.vision_tower
    calls = []
    hook = tower.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            features = model.model.select_vision_features(pixels)
            assert not calls, "the last layer ran although the features are the penultimate layer's"
            full = tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
            assert calls
    finally:
        hook.remove()
    assert torch.equal(features, full[:, 1:])
    unused = model.model.unused_vision_modules()
    assert unused == [tower.encoder.layers[-1], tower.post_layernorm]
    last = copy.deepcopy(model.model)
    last.config.vision_feature_layer = -1
    assert last.unused_vision_modules() == [last.vision_tower.post_layernorm]


def test_several_images_and_clips_over_several_turns_in_a_left_padded_batch(tiny):
    model, processor = tiny
    long_prompt = (
        "<|user|>\n<image>\nFirst?<|end|>\n<|assistant|>\nred.<|end|>\n"
        "<|user|>\nNow this <audio> and <image> and <audio><|end|>\n<|assistant|>\n"
    )
    short_prompt = USER.format("<image>\nWhat?")
    media = [shape_image((255, 0, 0)), shape_image((0, 255, 0), left=False)], [tone(300), tone(2000, 2.5)]
    batch = encode(processor, [long_prompt, short_prompt], images=[*media[0], shape_image((0, 0, 255))], audio=media[1])
    assert batch["attention_mask"][1, 0] == 0, "the shorter prompt is left-padded"
    alone = [encode(processor, long_prompt, media[0], media[1]), encode(processor, short_prompt, [shape_image((0, 0, 255))])]
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(**batch, position_ids=position_ids).logits
        for row, single in enumerate(alone):
            n = single["input_ids"].shape[1]
            torch.testing.assert_close(batched[row, -n:], model(**single).logits[0], atol=1e-4, rtol=1e-4)


def test_labels_give_the_shifted_cross_entropy(tiny):
    model, processor = tiny
    inputs = encode(processor, USER.format("<image>\nWhat color?") + "red.<|end|>", [shape_image()])
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = -100
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_generate_cached_equals_uncached_and_batch_equals_alone(tiny):
    model, processor = tiny
    prompts = [USER.format("<image>\nWhat color is the shape?"), USER.format("<audio>\nHigh or low?")]
    kwargs = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    singles = []
    for prompt, images, audio in [(prompts[0], [shape_image()], None), (prompts[1], None, [tone(2500)])]:
        inputs = encode(processor, prompt, images, audio)
        cached = model.generate(**inputs, **kwargs, use_cache=True)
        uncached = model.generate(**inputs, **kwargs, use_cache=False)
        assert torch.equal(cached, uncached)
        singles.append(cached[0, inputs["input_ids"].shape[1] :])
    batch = encode(processor, prompts, [shape_image()], [tone(2500)])
    out = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    for row, single in enumerate(singles):
        assert torch.equal(out[row], single)


def test_text_iterator_streamer_streams_the_generated_text(tiny):
    model, processor = tiny
    inputs = encode(processor, USER.format("<image>\nHi"), [shape_image()])
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=False)
    thread = Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, max_new_tokens=6, min_new_tokens=6, do_sample=False))
    thread.start()
    pieces = list(streamer)
    thread.join()
    expected = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert "".join(pieces) == processor.tokenizer.decode(expected)


def test_gradient_checkpointing_with_a_frozen_base_still_trains_inner_weights(tiny):
    model = copy.deepcopy(tiny[0]).train()
    processor = tiny[1]
    model.requires_grad_(False)
    inner = model.model.language_model.layers[0].self_attn.o_proj.weight  # stands in for a LoRA weight
    inner.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    inputs = encode(processor, USER.format("Text only, no media.") + "ok.<|end|>")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert inner.grad is not None and inner.grad.abs().sum() > 0


@pytest.mark.parametrize("num_items_in_batch", [None, 7])
def test_training_loss_runs_the_head_only_where_labels_supervise_and_matches_the_full_loss(tiny, num_items_in_batch):
    model = copy.deepcopy(tiny[0])
    processor = tiny[1]
    prompts = [USER.format("<image>\nWhat color?") + "red.<|end|>", USER.format("<audio>\nPitch?") + "high tone, long.<|end|>"]
    inputs = encode(processor, prompts, [shape_image()], [tone(2500)], padding=True)
    labels = inputs["input_ids"].clone()
    labels[:, : labels.shape[1] - 5] = -100  # a supervised answer at the end of each row, as the collator makes
    labels[inputs["attention_mask"] == 0] = -100
    loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    head_rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[:-1].numel()))

    def loss_and_grad(skip_logits: bool):
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(**inputs, labels=labels, skip_logits=skip_logits, **loss_kwargs)
        out.loss.backward()
        return out, model.model.multi_modal_projector.linear_1.weight.grad.clone()

    full, full_grad = loss_and_grad(skip_logits=False)  # training mode alone keeps the logits
    supervised, supervised_grad = loss_and_grad(skip_logits=True)
    hook.remove()
    assert full.logits.shape[:2] == labels.shape and supervised.logits is None
    assert head_rows == [labels.numel(), int((labels[:, 1:] != -100).sum())]
    expected = model.loss_function(full.logits, labels, model.config.text_config.vocab_size, **loss_kwargs)
    torch.testing.assert_close(full.loss, expected)
    torch.testing.assert_close(supervised.loss, full.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(supervised_grad, full_grad, atol=1e-6, rtol=1e-5)


def test_return_dict_false_gives_tuples_in_the_order_of_the_output_fields(tiny):
    model, processor = tiny
    inputs = encode(processor, USER.format("<image>\nWhat color?"), [shape_image()])
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        body = model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(body, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits)  # no labels, so no loss: logits come first
    torch.testing.assert_close(body[0], model.model(**inputs).last_hidden_state)


def test_audio_over_30_seconds_is_split_in_windows(tiny):
    model, processor = tiny
    inputs = encode(processor, USER.format("<audio>\nHow long?"), audio=[np.zeros(45 * 16_000, np.float32)])
    assert inputs["input_features"].shape[0] == 2
    per_window = model.config.audio_tokens_per_window
    assert int((inputs["input_ids"] == model.config.audio_token_id).sum()) == per_window + per_window // 2
    with torch.no_grad():
        assert model(**inputs).audio_hidden_states.shape[0] == per_window + per_window // 2


def test_image_token_pooling_gives_a_quarter_of_the_tokens(tmp_path):
    from phi3mm.build import build_tiny_model

    model, processor = build_tiny_model(tmp_path, with_audio=False, image_token_pooling=2)
    inputs = encode(processor, USER.format("<image>\nWhat?"), [shape_image()])
    assert processor.image_seq_length == model.config.image_seq_length == 4  # (64 / 16 / 2) ** 2
    with torch.no_grad():
        features = model.model.select_vision_features(inputs["pixel_values"])
        pooled = model.get_image_features(vision_features=features)
        expected = model.model.multi_modal_projector(features.reshape(1, 2, 2, 2, 2, -1).mean((2, 4)).reshape(1, 4, -1))
    torch.testing.assert_close(pooled, expected)
    assert model.config.audio_config is None
    with pytest.raises(ValueError, match="no audio tower"):
        model.get_audio_features(torch.zeros(1, 80, 3000), torch.ones(1, 3000))


def test_image_token_order_columns_hands_the_grid_over_column_by_column(tmp_path):
    """The same weights, the grid read the other way: token c * 4 + r of the "columns" model is token
    r * 4 + c of the "rows" one, so the left half of the picture is the first 8 of the 16 tokens."""
    from phi3mm.build import build_tiny_model

    model, processor = build_tiny_model(tmp_path, with_audio=False, image_token_order="columns")
    rows = type(model)(copy.deepcopy(model.config)).eval()
    rows.config.image_token_order = "rows"
    rows.load_state_dict(model.state_dict())
    inputs = encode(processor, USER.format("<image>\nWhat?"), [shape_image()])
    with torch.no_grad():
        by_columns = model.get_image_features(inputs["pixel_values"])
        by_rows = rows.get_image_features(inputs["pixel_values"])
    assert not torch.allclose(by_columns, by_rows)
    torch.testing.assert_close(by_columns, by_rows.reshape(1, 4, 4, -1).transpose(1, 2).reshape(1, 16, -1))


def test_whisper_encodes_only_the_real_audio_as_an_encoder_built_for_that_length_would(tiny):
    """0.96 s = 96 mel frames = 48 encoder frames: the real-length path must give what Whisper's own
    encoder gives with 48 positions (the same weights, position embeddings cut to 48), not what the
    30 s padded window gives, and only those 96 mel frames reach the convolutions."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model, processor = tiny
    assert model.config.audio_real_length  # what the builder sets for new models
    inputs = encode(processor, USER.format("<audio>\nPitch?"), audio=[tone(seconds=0.96)])
    seen = []
    hook = model.model.audio_tower.conv1.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
    with torch.no_grad():
        frames = model.model._encode_real_length(inputs["input_features"], inputs["input_features_mask"].sum(-1))
    hook.remove()
    assert seen == [98] and frames.shape[1] == 48  # two mel frames past the cut: see the next test

    short_config = copy.deepcopy(model.config.audio_config)
    short_config.max_source_positions = 48
    reference = WhisperEncoder(short_config).eval()
    state = {k: v[:48] if k == "embed_positions.weight" else v for k, v in model.model.audio_tower.state_dict().items()}
    reference.load_state_dict(state)
    tower = model.model.audio_tower
    with torch.no_grad():
        # The convolutions' output on the kept frames is the whole window's (the last frame reads the
        # silence after the clip, as in the 30 s window), the layers those of a 48-position encoder.
        window_convs = tower.conv2(torch.nn.functional.gelu(tower.conv1(inputs["input_features"])))
        hook = reference.conv2.register_forward_hook(lambda m, args, out: window_convs[..., :48])
        expected = reference(inputs["input_features"][..., :96]).last_hidden_state
        hook.remove()
        padded = model.model.audio_tower(inputs["input_features"]).last_hidden_state[:, :48]
    torch.testing.assert_close(frames, expected, atol=1e-5, rtol=1e-5)
    assert (padded - expected).abs().max() > 1e-3  # the padded window really is another encoding


@pytest.mark.parametrize("seconds", [1.0, 0.95, 0.3])
def test_real_length_audio_features_do_not_depend_on_the_other_clips_in_the_batch(tiny, seconds):
    """0.95 s is 95 mel frames, 48 encoder frames, 10 tokens of 5: the cut falls one mel frame past
    the audio and the last token stacks two frames past it; both once depended on the batch."""
    model, processor = tiny
    alone = encode(processor, USER.format("<audio>\nPitch?"), audio=[tone(seconds=seconds)])
    batch = encode(processor, [USER.format("<audio>\nPitch?")] * 2, audio=[tone(seconds=seconds), tone(500, 7.0)], padding=True)
    with torch.no_grad():
        a = model.get_audio_features(alone["input_features"], alone["input_features_mask"])
        b = model.get_audio_features(batch["input_features"], batch["input_features_mask"])
    torch.testing.assert_close(b[: a.shape[0]], a, atol=1e-5, rtol=1e-5)


def test_checkpoints_trained_on_padded_windows_keep_the_padded_encoding(tiny):
    model, processor = tiny
    padded_model = copy.deepcopy(model)
    padded_model.config.audio_real_length = False  # a config.json written before the field existed
    inputs = encode(processor, USER.format("<audio>\nPitch?"), audio=[tone(seconds=1.0)])
    with torch.no_grad():
        features = padded_model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
        frames = model.model.audio_tower(inputs["input_features"]).last_hidden_state
        expected = model.model.audio_projector(frames)[0, : features.shape[0]]
    torch.testing.assert_close(features, expected)
    from configuration_phi3_projector import Phi3ProjectorConfig

    assert Phi3ProjectorConfig.from_dict({k: v for k, v in model.config.to_dict().items() if k != "audio_real_length"}).audio_real_length is False
