"""Processor: Phi-3.5 tokenizer + CLIP image processor + Whisper feature extractor in one object.

It turns a prompt with `<image>` and `<audio>` placeholders plus the media into model inputs,
expanding each placeholder to exactly as many tokens as the model will write features over, and
says clearly (ValueError, naming the item) when an input cannot be used.

    >>> from transformers import AutoProcessor
    >>> processor = AutoProcessor.from_pretrained("outputs/demo/model", trust_remote_code=True)
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}]
    >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    >>> inputs = processor(text=prompt, images=["shape.png"], return_tensors="pt")

Only numpy and Pillow are needed beyond transformers. Where installed, soundfile decodes audio
files and librosa resamples (soxr) and decodes what soundfile cannot; without librosa a numpy FFT
resamples (arrays and Gradio's `(sampling_rate, array)` pairs need nothing more).
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image
from transformers import BatchFeature, PretrainedConfig, ProcessorMixin

try:  # loaded as Hub remote code (a package)
    from .configuration_phi3_projector import HOP_LENGTH, SAMPLING_RATE, Phi3ProjectorConfig, audio_token_count
except ImportError:  # imported from the repository root
    from configuration_phi3_projector import HOP_LENGTH, SAMPLING_RATE, Phi3ProjectorConfig, audio_token_count

try:
    import soundfile
except ImportError:  # audio files can't be decoded, arrays still work
    soundfile = None
try:  # resampling through soxr, and decoding what soundfile cannot; numpy alone works without it
    import librosa
except ImportError:
    librosa = None
# Bounds on what one upload may cost. A 100 MP image is ~300 MB decoded (a 10 kB PNG can claim far
# more: a decompression bomb); 30 minutes of audio is 29 M samples at 16 kHz. Both are refused with
# a ValueError above these.
MAX_IMAGE_PIXELS = 100_000_000
MAX_AUDIO_SECONDS = 30 * 60
# Samples over all channels, whatever the rate: 30 minutes of 48 kHz stereo. A 20 MB FLAC of silence
# can declare 30 minutes at 655 kHz, which would decode to 4.7 GB.
MAX_AUDIO_SAMPLES = MAX_AUDIO_SECONDS * 48_000 * 2
# CLIP resizes the short side to its input size and keeps the centre square, so a 1 x 100000 strip
# would first become 336 x 33.6 M pixels; strips longer than this are cut to their middle first
# (at 20:1 the resized strip is 336 x 6720 at most, 27 MB of floats).
MAX_ASPECT_RATIO = 20

# Phi-3.5's chat format, with content given as a string or as a list of image / audio / text parts;
# the parts of one message are joined by newlines, in the order given. `{% generation %}` marks what
# an assistant writes (its answer and closing <|end|>) for `apply_chat_template(...,
# return_assistant_tokens_mask=True)`, TRL's `assistant_only_loss`; it renders to nothing.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['system', 'user', 'assistant'] -%}"
    "{%- if message['content'] is string -%}{%- set body = message['content'] -%}"
    "{%- else -%}{%- set parts = namespace(items=[]) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set parts.items = parts.items + ['<image>'] -%}"
    "{%- elif part['type'] == 'audio' -%}{%- set parts.items = parts.items + ['<audio>'] -%}"
    "{%- elif part['type'] == 'text' -%}{%- set parts.items = parts.items + [part['text']] -%}"
    "{%- endif -%}{%- endfor -%}{%- set body = parts.items | join('\n') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\n' -}}{%- generation -%}{{- body + '<|end|>' -}}{%- endgeneration -%}{{- '\n' -}}"
    "{%- elif message['role'] != 'system' or body -%}"
    "{{- '<|' + message['role'] + '|>\n' + body + '<|end|>\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    # A finished conversation ends with the end-of-text token, unless the tokenizer's eos is the
    # <|end|> that already closed the last turn (this model's, so that tools stopping at eos stop there).
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- elif eos_token != '<|end|>' -%}{{- eos_token -}}{%- endif -%}"
)


def load_image(image, index: int = 0) -> Image.Image:
    """A path, bytes, array, PIL image of any mode or `datasets` {"bytes", "path"} dict -> an RGB PIL image.

    ValueError, naming the image, when it is not one or has more than MAX_IMAGE_PIXELS; strips
    longer than MAX_ASPECT_RATIO : 1 come back cut to their middle (see `crop_long_side`).
    """
    if isinstance(image, dict):  # a `datasets` Image column read without decoding: {"bytes", "path"}
        image = image.get("bytes") or image.get("path")
    try:
        if isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise ValueError(f"image {index}: no such file {os.fspath(image)!r}")
            image = Image.open(image)
        elif isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.dtype.kind == "f":  # floats are taken as [0, 1]
                array = (np.clip(np.nan_to_num(array), 0.0, 1.0) * 255).round()
            if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                array = array.transpose(1, 2, 0)  # channels first (a torch tensor) -> last
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
                raise ValueError(f"image {index}: an array image must be (H, W), (H, W, 3|4) or (3|4, H, W), got shape {array.shape}")
            image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
        if image.width * image.height > MAX_IMAGE_PIXELS:  # the header's size, before decoding anything
            raise ValueError(_too_many_pixels(index, image.width * image.height))
        image.load()  # decode now, so a truncated file fails here and not inside the image processor
        if min(image.size) >= 1:
            image = to_rgb(image)
    except ValueError as error:
        if str(error).startswith(f"image {index}: "):
            raise
        raise ValueError(f"image {index}: not a readable image ({error})") from None
    except Image.DecompressionBombError as error:  # Pillow's own check, at twice its MAX_IMAGE_PIXELS
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise ValueError(_too_many_pixels(index, int(pixels.group(1)) if pixels else None)) from None
    except Exception as error:  # a corrupt file makes Pillow's decoders raise nearly anything
        # (OSError, SyntaxError, IndexError, NotImplementedError, struct.error, EOFError, MemoryError...)
        raise ValueError(f"image {index}: not a readable image ({type(error).__name__}: {error})") from None
    if min(image.size) < 1:
        raise ValueError(f"image {index}: empty image of size {image.size}")
    return crop_long_side(image)


def _too_many_pixels(index: int, pixels: int | None) -> str:
    size = f"{pixels:,} pixels" if pixels else "too many pixels"
    return f"image {index}: {size}, more than the {MAX_IMAGE_PIXELS:,} accepted (a decompression bomb, or an image to downscale first)"


def crop_long_side(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Cut the long side of a strip to `max_ratio` times the short side, keeping the middle.

    CLIP's resize-then-centre-crop sees the same middle square either way (give or take a fraction
    of a pixel in where the resize samples); the cut only keeps its resize from allocating
    short_side_px x (ratio x short_side_px) floats for a 1 x 100000 image.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= max_ratio * short:
        return image
    keep = int(max_ratio * short)
    keep += (long - keep) % 2  # same parity as the long side, so the middle stays exactly centred
    start = (long - keep) // 2
    box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
    return image.crop(box)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16/32-bit greys scaled to 8 bits."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(255.0, float(np.nanmax(array)) if array.size else 255.0)
        image = Image.fromarray((np.clip(np.nan_to_num(array), 0, top) / top * 255).astype(np.uint8), "L")
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied alpha: Pillow converts it to LA only
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a clip: librosa's soxr (high quality) where librosa is installed, else `resample_fft`."""
    if orig_rate == new_rate or wave.size == 0:
        return wave
    if librosa is not None:
        return librosa.resample(wave, orig_sr=orig_rate, target_sr=new_rate, res_type="soxr_hq").astype(np.float32)
    return resample_fft(wave, orig_rate, new_rate)


def resample_fft(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling by FFT: any pair of rates, anti-aliased, numpy only (the fallback).

    numpy's FFT is fast at lengths made of small primes and ~10x slower, with gigabytes of scratch
    memory, at lengths with a large prime factor (5 minutes at 44101 Hz: 13,230,300 samples, a
    factor 44101). So the clip is zero-padded at its end to the first length whose FFT and output
    FFT are both fast, and the padding's output cut off again; the output rate is then `new_rate`
    to within half a sample over the whole clip.
    """
    if orig_rate == new_rate or wave.size == 0:
        return wave
    n, ratio = wave.shape[-1], new_rate / orig_rate
    n_out = max(1, round(n * ratio))
    padded = n
    while not (_fft_friendly(padded) and _fft_friendly(max(1, round(padded * ratio)))):
        padded += 1
    padded_out = max(1, round(padded * ratio))
    spectrum = np.fft.rfft(wave, padded)
    kept = np.zeros(padded_out // 2 + 1, dtype=spectrum.dtype)
    n_keep = min(len(spectrum), len(kept))
    kept[:n_keep] = spectrum[:n_keep]
    return (np.fft.irfft(kept, padded_out)[:n_out] * (padded_out / padded)).astype(np.float32)


_SMALL_PRIMES = [p for p in range(2, 100) if all(p % d for d in range(2, p))]


def _fft_friendly(n: int) -> bool:
    """No prime factor above 97: numpy's pocketfft then never falls back to Bluestein's algorithm."""
    for p in _SMALL_PRIMES:
        while n % p == 0:
            n //= p
    return n == 1


def load_audio(audio, index: int = 0, sampling_rate: int | None = None) -> np.ndarray:
    """A path, `(sampling_rate, array)` pair, `{"array", "sampling_rate"}` dict or array -> float32 mono 16 kHz.

    Bare arrays are taken to be at `sampling_rate` (default 16 kHz). Integer samples are scaled to
    [-1, 1]; channels are averaged. ValueError for anything that is not usable audio.
    """
    rate = sampling_rate or SAMPLING_RATE
    if isinstance(audio, dict) and audio.get("array") is None:  # a `datasets` Audio column read without decoding
        audio = audio.get("bytes") or audio.get("path")
    if isinstance(audio, (str, os.PathLike, bytes, bytearray)):
        if soundfile is None:
            raise ValueError(f"audio {index}: decoding audio files needs the soundfile package (pip install soundfile)")
        if isinstance(audio, (str, os.PathLike)) and not os.path.isfile(audio):
            raise ValueError(f"audio {index}: no such file {os.fspath(audio)!r}")
        source = io.BytesIO(audio) if isinstance(audio, (bytes, bytearray)) else audio
        try:
            info = soundfile.info(source)  # the header only: refuse hours of audio before decoding them
            if info.samplerate > 0 and info.frames / info.samplerate > MAX_AUDIO_SECONDS:
                raise ValueError(_too_long(index, info.frames / info.samplerate))
            if info.frames * info.channels > MAX_AUDIO_SAMPLES:
                raise ValueError(_too_many_samples(index, info.frames * info.channels))
            if isinstance(source, io.BytesIO):
                source.seek(0)
            audio, rate = soundfile.read(source, dtype="float32", always_2d=True)
        except ValueError as error:
            if str(error).startswith(f"audio {index}: "):
                raise
            raise ValueError(f"audio {index}: not a readable audio file ({error})") from None
        except Exception as error:  # soundfile raises its own LibsndfileError and RuntimeErrors
            audio, rate = _decode_with_librosa(source, index, error)
        audio = audio.mean(axis=1)  # a file's samples are (frames, channels), however few the frames
    elif isinstance(audio, dict):
        audio, rate = audio.get("array"), audio.get("sampling_rate", rate)
    elif isinstance(audio, tuple) and len(audio) == 2 and np.isscalar(audio[0]):
        rate, audio = audio  # Gradio's microphone and upload components give (rate, samples)
    if hasattr(audio, "detach"):  # a torch tensor
        audio = audio.detach().cpu().numpy()
    try:
        wave = np.asarray(audio)
    except Exception as error:
        raise ValueError(f"audio {index}: not an array of samples ({error})") from None
    if not isinstance(rate, (int, np.integer)) or isinstance(rate, bool) or not 1 <= rate <= 1_000_000:
        raise ValueError(f"audio {index}: sampling rate must be a positive int up to 1 MHz, got {rate!r}")
    if wave.size > MAX_AUDIO_SAMPLES:  # before any copy is made
        raise ValueError(_too_many_samples(index, wave.size))
    if wave.dtype.kind == "i":  # int16 and friends: full scale is 2 ** (bits - 1)
        wave = wave.astype(np.float64) / (np.iinfo(wave.dtype).max + 1)
    elif wave.dtype.kind == "u":  # unsigned (8-bit WAV): silence is mid-scale
        wave = wave.astype(np.float64) / (np.iinfo(wave.dtype).max + 1) * 2 - 1
    elif wave.dtype.kind != "f":
        raise ValueError(f"audio {index}: samples must be ints or floats, got dtype {wave.dtype}")
    if wave.size == 0:
        raise ValueError(f"audio {index}: the clip is empty")
    if wave.ndim == 2:  # channels on the shorter axis
        wave = wave.mean(axis=1 if wave.shape[1] <= wave.shape[0] else 0)
    elif wave.ndim != 1:
        raise ValueError(f"audio {index}: expected (samples,) or (samples, channels), got shape {wave.shape}")
    if len(wave) > MAX_AUDIO_SECONDS * rate:  # bounds the resampling FFT and the feature windows
        raise ValueError(_too_long(index, len(wave) / rate))
    with np.errstate(over="ignore"):  # float64 samples beyond float32's range become inf: refused below
        wave = wave.astype(np.float32)
    if not np.isfinite(wave).all():
        raise ValueError(f"audio {index}: the clip contains NaN or infinite samples (or samples beyond float32's range)")
    peak = float(np.abs(wave).max())
    if peak > 2.0**31:  # Whisper's log-mel overflows float32 (NaN features) from about 1e17
        raise ValueError(
            f"audio {index}: samples reach {peak:.3g}; float samples should lie in [-1, 1] "
            "(at most 2**31: integer PCM passed as floats)"
        )
    return resample(wave, int(rate), SAMPLING_RATE)


def _decode_with_librosa(source, index: int, soundfile_error: Exception) -> tuple[np.ndarray, int]:
    """A file soundfile cannot read, through librosa's other decoders (audioread: ffmpeg, GStreamer,
    Core Audio, where installed); ValueError naming both failures when that fails too."""
    if librosa is None or isinstance(source, io.BytesIO):  # audioread reads files only
        raise ValueError(f"audio {index}: not a readable audio file ({soundfile_error})") from None
    try:
        with warnings.catch_warnings():  # librosa warns before falling back to audioread
            warnings.simplefilter("ignore")
            duration = librosa.get_duration(path=source)
            if duration > MAX_AUDIO_SECONDS:
                raise ValueError(_too_long(index, duration))
            audio, rate = librosa.load(source, sr=None, mono=False)
    except ValueError as error:
        if str(error).startswith(f"audio {index}: "):
            raise
        raise ValueError(f"audio {index}: not a readable audio file ({soundfile_error}; librosa: {error})") from None
    except Exception as error:
        raise ValueError(f"audio {index}: not a readable audio file ({soundfile_error}; librosa: {type(error).__name__})") from None
    return np.atleast_2d(audio).T, int(rate)  # (channels, frames) -> (frames, channels)


def _too_long(index: int, seconds: float) -> str:
    return f"audio {index}: the clip is {seconds:,.0f} s long, more than the {MAX_AUDIO_SECONDS:,} s accepted"


def _too_many_samples(index: int, samples: int) -> str:
    return (
        f"audio {index}: {samples:,} samples over all channels, more than the {MAX_AUDIO_SAMPLES:,} accepted "
        f"({MAX_AUDIO_SECONDS // 60} minutes of 48 kHz stereo)"
    )


def split_windows(wave: np.ndarray, window: int) -> list[np.ndarray]:
    """Cut a clip into windows of `window` samples (30 s for Whisper), the most its encoder takes at once."""
    return [wave[start : start + window] for start in range(0, len(wave), window)]


def _window_lengths(n_samples: int, window: int) -> list[int]:
    """Lengths of `split_windows`' pieces for a clip of `n_samples` (one empty window for no samples)."""
    return [min(window, n_samples - start) for start in range(0, n_samples, window)] or [0]


class MultimodalProcessor(ProcessorMixin):
    """Phi-3.5 tokenizer, CLIP image processor and Whisper feature extractor.

    Args:
        image_seq_length: tokens per image (`config.image_seq_length` of the model).
        audio_stack_factor: encoder frames per audio token (`config.audio_stack_factor`).
        audio_max_frames: encoder frames per 30 s window (`audio_config.max_source_positions`).
    """

    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_seq_length: int = 576,
        audio_stack_factor: int = 5,
        audio_max_frames: int = 1500,
        image_token: str = "<image>",
        audio_token: str = "<audio>",
        **kwargs,
    ):
        self.image_seq_length = image_seq_length
        self.audio_stack_factor = audio_stack_factor
        self.audio_max_frames = audio_max_frames
        self.image_token = image_token
        self.audio_token = audio_token
        super().__init__(image_processor, feature_extractor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        if feature_extractor is not None and feature_extractor.n_samples != self.window_samples:
            raise ValueError(
                f"the feature extractor makes {feature_extractor.n_samples}-sample windows but the audio tower's "
                f"{audio_max_frames} positions cover {self.window_samples}: set its chunk_length to match"
            )
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.audio_token_id = tokenizer.convert_tokens_to_ids(audio_token)
        self._placeholder = re.compile(f"({re.escape(image_token)}|{re.escape(audio_token)})")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The saved processor, with its token counts taken from the model's config.json beside it:
        the model's config is the one place pooling and audio stacking are set, so editing
        `image_token_pooling` there cannot leave the processor expanding the old number of tokens."""
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        try:
            config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
        except (OSError, ValueError):  # a processor saved on its own: its own counts stand
            return processor
        if config_dict.get("model_type") == Phi3ProjectorConfig.model_type:
            processor.follow_config(Phi3ProjectorConfig.from_dict(config_dict))
        return processor

    def follow_config(self, config) -> None:
        """Take the token counts from a model config: tokens per image, audio stacking and window."""
        self.image_seq_length = config.image_seq_length
        self.audio_stack_factor = config.audio_stack_factor
        if config.audio_config is not None:
            self.audio_max_frames = config.audio_config.max_source_positions

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "input_features", "input_features_mask"]

    @property
    def window_samples(self) -> int:
        """Samples per audio window: what the encoder's positions cover (2 mel frames each)."""
        return self.audio_max_frames * 2 * HOP_LENGTH

    def audio_token_count(self, n_samples: int) -> int:
        """Audio tokens for a whole 16 kHz clip of `n_samples`, over all its 30 s windows: what its
        `<audio>` placeholder expands to, and what the model writes over it."""
        return sum(
            audio_token_count(math.ceil(n / HOP_LENGTH), self.audio_stack_factor, self.audio_max_frames)
            for n in _window_lengths(n_samples, self.window_samples)
        )

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        audio=None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        sampling_rate: int | None = None,
        audios=None,
        videos=None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenize `text` (one prompt or a batch) with its images and audio clips.

        `images` / `audio` (or `audios`, the name other processors and lmms-eval use): one item, a
        flat list in placeholder order across the batch, or one list per prompt. Returns input_ids,
        attention_mask, and pixel_values / input_features / input_features_mask when media are
        given. Raises ValueError when a placeholder count does not match the media, a medium cannot
        be read, a prompt is longer than the context, or videos are given (the model takes none).
        """
        if audio is not None and audios is not None:
            raise ValueError("pass the clips as audio= or as audios=, not both")
        audio = audio if audio is not None else audios
        if _flatten(videos):
            raise ValueError("this model takes images and audio, not video: pass frames as images instead")
        if text is None:
            raise ValueError("text is required: a prompt with one <image> / <audio> placeholder per image / clip")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"text must be a string or a non-empty list of strings, got {type(text).__name__} {text!r:.80}")
        for i, t in enumerate(texts):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate: the tokenizer would raise a TypeError
                raise ValueError(f"prompt {i} is not valid Unicode text ({error})") from None
        images, clips = _flatten(images), _flatten(audio)
        n_image_slots = sum(t.count(self.image_token) for t in texts)
        n_audio_slots = sum(t.count(self.audio_token) for t in texts)
        if n_image_slots != len(images):
            raise ValueError(f"the text has {n_image_slots} {self.image_token} placeholders but {len(images)} images were given")
        if n_audio_slots != len(clips):
            raise ValueError(f"the text has {n_audio_slots} {self.audio_token} placeholders but {len(clips)} audio clips were given")

        data = {}
        if images:
            data["pixel_values"] = self.process_images(images)
        audio_tokens = []
        if clips:
            data["input_features"], data["input_features_mask"], audio_tokens = self.process_audio(clips, sampling_rate)

        expanded, replacements = self._expand_placeholders(texts, iter(audio_tokens))
        # Token offsets and where each placeholder went are what `apply_chat_template(...,
        # return_assistant_tokens_mask=True)` maps the template's {% generation %} spans with.
        tokenizer_kwargs = {
            k: v
            for k, v in kwargs.items()
            if k in ("add_special_tokens", "pad_to_multiple_of", "return_attention_mask", "return_offsets_mapping")
        }
        if padding_side is not None:
            tokenizer_kwargs["padding_side"] = padding_side
        encoded = self.tokenizer(expanded, padding=padding, **tokenizer_kwargs)
        limit = max_length or self.tokenizer.model_max_length
        for i, ids in enumerate(encoded["input_ids"]):
            real = sum(encoded["attention_mask"][i]) if "attention_mask" in encoded else len(ids)
            if real == 0:
                raise ValueError(f"prompt {i} is empty: it has no tokens for the model to read")
            if limit and real > limit:
                raise ValueError(
                    f"prompt {i} is {real} tokens long (media included), more than the model's context of {limit} tokens; "
                    "shorten the text or send fewer images / less audio"
                )
        data.update(encoded)
        if kwargs.get("return_text_replacement_offsets"):
            data["text_replacement_offsets"] = replacements
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])

    def process_images(self, images: list) -> np.ndarray:
        """Images (paths, arrays, PIL images) -> pixel_values (images, 3, H, W)."""
        rgb = [load_image(image, i) for i, image in enumerate(images)]
        return self.image_processor(rgb, return_tensors="np")["pixel_values"]

    def process_audio(self, clips: list, sampling_rate: int | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Clips -> (input_features (windows, mel bins, 3000), input_features_mask (windows, 3000), tokens per clip)."""
        windows, lengths, tokens = [], [], []
        for i, clip in enumerate(clips):
            clip_windows = split_windows(load_audio(clip, i, sampling_rate), self.window_samples)
            windows += clip_windows
            lengths += [len(w) for w in clip_windows]
            tokens.append(self.audio_token_count(sum(len(w) for w in clip_windows)))
        features = self.feature_extractor(
            windows, sampling_rate=SAMPLING_RATE, padding="max_length", max_length=self.window_samples, return_tensors="np"
        )["input_features"]
        mask = np.zeros((len(windows), features.shape[-1]), dtype=np.int64)
        for row, n in enumerate(lengths):
            mask[row, : math.ceil(n / HOP_LENGTH)] = 1
        return features, mask, tokens

    def expand_placeholders(self, text: str, audio_tokens: list[int]) -> str:
        """Repeat each <image> image_seq_length times and the i-th <audio> audio_tokens[i] times."""
        return self._expand_placeholders([text], iter(audio_tokens))[0][0]

    def _expand_placeholders(self, texts: list[str], audio_tokens) -> tuple[list[str], list[list[dict]]]:
        """The expanded texts, and per text where each placeholder was and went: transformers'
        `text_replacement_offsets` ({"type", "span", "new_span", "text", "replacement"}, character
        offsets in the text and in its expansion)."""
        expanded, replacements = [], []
        for text in texts:
            pieces, moved, old_end, new_end = [], [], 0, 0
            for piece in self._placeholder.split(text):
                new = piece
                if piece in (self.image_token, self.audio_token):
                    kind = "image" if piece == self.image_token else "audio"
                    new = piece * (self.image_seq_length if kind == "image" else next(audio_tokens))
                    span, new_span = (old_end, old_end + len(piece)), (new_end, new_end + len(new))
                    moved.append({"type": kind, "span": span, "new_span": new_span, "text": piece, "replacement": new})
                old_end, new_end = old_end + len(piece), new_end + len(new)
                pieces.append(new)
            expanded.append("".join(pieces))
            replacements.append(moved)
        return expanded, replacements


def _flatten(items) -> list:
    """None, one item, a flat list, or one list per prompt -> a flat list (tuples are items: Gradio's audio)."""
    if items is None:
        return []
    if not isinstance(items, list):
        return [items]
    flat = []
    for item in items:
        flat.extend(item if isinstance(item, list) else [item])
    return flat


__all__ = ["MultimodalProcessor", "load_audio", "load_image", "resample", "resample_fft", "CHAT_TEMPLATE"]

MultimodalProcessor.register_for_auto_class("AutoProcessor")
