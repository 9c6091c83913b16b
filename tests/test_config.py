import pytest

from configuration_phi3_projector import Phi3ProjectorConfig


def test_defaults_are_llava_1_5():
    config = Phi3ProjectorConfig()
    assert config.vision_config.image_size == 336 and config.vision_feature_layer == -2
    assert config.image_seq_length == 576  # 24 x 24 patches, CLS dropped
    assert config.audio_config is None and config.audio_tokens_per_window == 0


@pytest.mark.parametrize(
    "options, expected",
    [({"image_token_pooling": 2}, 144), ({"image_token_pooling": 3}, 64), ({"image_token_pooling": 5}, 25),
     ({"vision_feature_select_strategy": "full"}, 577)],
)
def test_image_seq_length_is_derived(options, expected):
    assert Phi3ProjectorConfig(**options).image_seq_length == expected


def test_audio_tokens_follow_stack_factor():
    config = Phi3ProjectorConfig(audio_config={"model_type": "whisper"}, audio_stack_factor=4)
    assert config.audio_tokens_per_window == 375  # 1500 frames / 4


@pytest.mark.parametrize(
    "options, field",
    [
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy"),
        ({"vision_feature_layer": 30}, "vision_feature_layer"),
        ({"image_token_pooling": 25}, "image_token_pooling"),  # more than the 24 x 24 grid's side
        ({"image_token_pooling": 0}, "image_token_pooling"),
        ({"image_token_pooling": 2, "vision_feature_select_strategy": "full"}, "image_token_pooling"),
        ({"image_token_order": "diagonal"}, "image_token_order"),
        ({"image_token_order": "columns", "vision_feature_select_strategy": "full"}, "image_token_order"),
        ({"audio_stack_factor": 0}, "audio_stack_factor"),
        ({"projector_hidden_act": "nope"}, "projector_hidden_act"),
        ({"image_token_id": 10**6}, "image_token_id"),
        ({"audio_token_id": -1}, "audio_token_id"),
        ({"audio_real_length": "yes"}, "audio_real_length"),
        ({"speech_aligned": 1}, "speech_aligned"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        Phi3ProjectorConfig(**options)


def test_round_trip_keeps_sub_configs_and_auto_map(tmp_path):
    config = Phi3ProjectorConfig(audio_config={"model_type": "whisper", "d_model": 64}, image_token_pooling=2)
    config.save_pretrained(tmp_path)
    loaded = Phi3ProjectorConfig.from_pretrained(tmp_path)
    assert loaded.audio_config.d_model == 64 and loaded.image_token_pooling == 2
    assert loaded.image_seq_length == 144
    assert set(loaded.auto_map) >= {"AutoConfig", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoProcessor"}
