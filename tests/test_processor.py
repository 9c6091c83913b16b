"""The processor: placeholder expansion, chat format, every kind of image and audio, clear errors."""

import io

import numpy as np
import pytest
import torch
import soundfile
from PIL import Image

from conftest import shape_image, tone
import processing_multimodal
from processing_multimodal import load_audio, load_image, resample, resample_fft


def test_chat_template_is_phi_3_5_with_content_parts(tiny):
    _, processor = tiny
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": "red."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "audio"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\n<image>\nWhat color?<|end|>\n"
        "<|assistant|>\nred.<|end|>\n<|user|>\nAnd this?\n<audio><|end|>\n<|assistant|>\n"
    )


def test_placeholders_expand_to_the_models_token_counts(tiny):
    model, processor = tiny
    clip = tone(seconds=1.3)
    inputs = processor(text="<|user|>\n<audio><image> and <image><|end|>\n", images=[shape_image()] * 2, audio=[clip])
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == 2 * model.config.image_seq_length
    mel_frames = int(inputs["input_features_mask"].sum())
    assert mel_frames == int(np.ceil(len(clip) / 160))
    assert int((ids == model.config.audio_token_id).sum()) == int(model.model.audio_token_counts(torch.tensor(mel_frames)))
    assert int((ids == model.config.audio_token_id).sum()) == 13  # 1.3 s at 50 / 5 tokens per second


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16", "I", "F"])
def test_every_pil_mode_becomes_rgb(mode):
    image = Image.fromarray(shape_image()).convert(mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        image = Image.fromarray((np.asarray(image).astype(np.float64) * (257 if mode == "I;16" else 1)).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == (64, 64)
    assert np.asarray(rgb)[0, 0].min() >= 250, "white stays white"


def test_transparent_pixels_become_white_not_black():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(load_image(image)).min() == 255


def test_images_from_paths_bytes_and_arrays_agree(tiny, tmp_path):
    _, processor = tiny
    path = tmp_path / "shape.png"
    Image.fromarray(shape_image()).save(path)
    variants = [str(path), path.read_bytes(), shape_image(), shape_image().astype(np.float32) / 255, Image.open(path)]
    pixels = [processor.process_images([v]) for v in variants]
    for other in pixels[1:]:
        np.testing.assert_allclose(other, pixels[0], atol=1e-6)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_audio_files_decode(tmp_path, fmt):
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, tone(440, 1.0, 16_000), 16_000, format=fmt)
    wave = load_audio(str(path))
    assert wave.dtype == np.float32 and abs(len(wave) - 16_000) < 2_000
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16_000 / len(wave) - 440) < 5


def test_gradio_pair_int16_stereo_at_44k1_is_resampled_to_16k_mono():
    left = (tone(1000, 1.0, 44_100) * 32767).astype(np.int16)
    stereo = np.stack([left, left], axis=1)
    wave = load_audio((44_100, stereo))
    assert len(wave) == 16_000 and np.abs(wave).max() == pytest.approx(0.5, abs=0.02)
    assert abs(np.argmax(np.abs(np.fft.rfft(wave))) - 1000) <= 1  # 1 s clip: bin = Hz


@pytest.mark.parametrize("resampler", [resample, resample_fft], ids=["librosa-soxr", "numpy-fft"])
def test_resample_removes_content_above_the_new_nyquist(resampler):
    high = tone(7000, 1.0, 48_000) + tone(11_000, 1.0, 48_000)  # 11 kHz cannot exist at 16 kHz
    spectrum = np.abs(np.fft.rfft(resampler(high, 48_000, 16_000)))
    assert spectrum[7000] > 100 * spectrum[np.r_[0:6900, 7100:8001]].max()


def test_resampling_goes_through_librosa_soxr_where_installed():
    import librosa

    wave = tone(440, 0.5, 44_100)
    expected = librosa.resample(wave, orig_sr=44_100, target_sr=16_000, res_type="soxr_hq")
    assert processing_multimodal.librosa is librosa
    np.testing.assert_array_equal(resample(wave, 44_100, 16_000), expected.astype(np.float32))
    assert np.abs(resample_fft(wave, 44_100, 16_000)[: len(expected)] - expected).max() > 0  # another method


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text": "<image><image>", "images": [shape_image()]}, "2 <image> placeholders but 1 images"),
        ({"text": "no placeholder", "images": [shape_image()]}, "0 <image> placeholders but 1 images"),
        ({"text": "<audio>", "audio": []}, "1 <audio> placeholders but 0 audio"),
        ({"text": "<image>", "images": [b"not an image at all"]}, "image 0: not a readable image"),
        ({"text": "<image>", "images": ["/no/such/file.png"]}, "image 0: no such file"),
        ({"text": "<audio>", "audio": [np.zeros(0, np.float32)]}, "audio 0: the clip is empty"),
        ({"text": "<audio>", "audio": [np.full(100, np.nan, np.float32)]}, "audio 0: the clip contains NaN"),
        ({"text": "<audio>", "audio": [b"RIFF garbage"]}, "audio 0: not a readable audio file"),
        ({"text": "<audio>", "audio": [(0, tone())]}, "sampling rate"),
        ({"text": "hi " * 5000}, "more than the model's context of 4096 tokens"),
    ],
)
def test_bad_input_gets_a_value_error_that_names_the_problem(tiny, kwargs, message):
    _, processor = tiny
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_a_wav_with_no_frames_is_reported_as_empty(tmp_path):
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 2), np.float32), 16_000)
    with pytest.raises(ValueError, match="the clip is empty"):
        load_audio(str(tmp_path / "empty.wav"))


def test_truncated_png_is_a_value_error(tmp_path):
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # does not compress
    Image.fromarray(noise).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(path)


def test_pooling_set_in_the_checkpoint_config_reaches_the_processor(tmp_path):
    """Editing image_token_pooling in config.json alone: the processor takes its token count from
    the model's config, so prompts and features still agree."""
    import json

    from transformers import AutoModelForCausalLM, AutoProcessor

    from phi3mm.build import build_tiny_model, save_checkpoint

    model, processor = build_tiny_model(tmp_path / "components", with_audio=False)
    folder = save_checkpoint(model, processor, tmp_path / "checkpoint")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_token_pooling": 2}))
    assert json.loads((folder / "processor_config.json").read_text())["image_seq_length"] == 16  # unchanged file
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert processor.image_seq_length == model.config.image_seq_length == 4
    inputs = processor(text="<|user|>\n<image>\nWhat?<|end|>\n<|assistant|>\n", images=[shape_image()])
    with torch.no_grad():
        assert model(**inputs).image_hidden_states.shape[0] == 4
