"""python -m phi3mm.audio_cache --model CHECKPOINT --data_path train.json --audio_folder DIR \
    --cache_dir OUT [--batch_size 16] [--dtype float16|float32] [--device cpu|cuda] [--num_workers 0]

Precomputed Whisper encoder output, so training with a frozen audio tower runs the encoder once
per clip instead of once per clip and epoch (`train_trainer.py ... --audio_cache_dir OUT`). For
the demo's pretrained Whisper-base that is most of a step's time: the encoder is 20M parameters
beside a language model of a few hundred thousand.

An entry is one clip, keyed by its file name as the rows write it: `states` (windows, frames,
audio width), the encoder's output over the frames the clip's audio tokens read (the real ones;
the rest of a 30 s window is not stored), and `mel_lengths` (windows,), the real mel frames of each window, from
which the model counts the clip's tokens. The clip is encoded the way the checkpoint encodes it
(real length, or padded to 30 s for checkpoints trained so), alone or batched alike, so training
on the cache is training on the same numbers. Missing or unreadable clips are counted and listed
(printed, and in OUT/summary.json), not a crash; see `phi3mm.feature_cache` for the layout.
Clips given in the rows as bytes or arrays have no name to key them: such rows need the encoder.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from configuration_phi3_projector import SAMPLING_RATE
from phi3mm.data import media_paths, read_rows
from phi3mm.feature_cache import FeatureCache, MediaFiles, command_line, load_tower_model, module_fingerprint, owner
from phi3mm.feature_cache import format_summary as _format, summarize

BUILD_FIELDS = ("d_model", "encoder_layers", "num_mel_bins", "max_source_positions", "audio_real_length",
                "audio_stack_factor", "fingerprint", "feature_extractor", "dtype")  # fmt: skip


def config_signature(config) -> dict:
    audio = config.audio_config
    if audio is None:
        raise ValueError("this model has no audio tower (config.audio_config is None): there is nothing to cache")
    return {
        "d_model": audio.d_model,
        "encoder_layers": audio.encoder_layers,
        "num_mel_bins": audio.num_mel_bins,
        "max_source_positions": audio.max_source_positions,
        "audio_real_length": bool(config.audio_real_length),
        "audio_stack_factor": config.audio_stack_factor,
    }


def tower_fingerprint(model) -> str:
    """sha256 of the Whisper encoder's weights (see `feature_cache.module_fingerprint`)."""
    return module_fingerprint(owner(model).audio_tower)


class AudioFeatureCache(FeatureCache):
    """`load(name)` -> {"states": (windows, frames, width), "mel_lengths": (windows,)} of one clip."""

    modality = "audio"
    command = "python -m phi3mm.audio_cache"
    signature = staticmethod(config_signature)
    tower = staticmethod(lambda model: owner(model).audio_tower)

    def load(self, name) -> dict[str, torch.Tensor]:
        entry = self.read(name)
        states, mel_lengths = entry.get("states"), entry.get("mel_lengths")
        if states is None or mel_lengths is None or states.ndim != 3 or states.shape[2] != self.meta["d_model"] \
                or tuple(mel_lengths.shape) != (states.shape[0],):  # fmt: skip
            shape = None if states is None else tuple(states.shape)
            raise ValueError(f"cached features for audio {name!r} do not fit: states {shape}, width {self.meta['d_model']} expected")
        return {"states": states, "mel_lengths": mel_lengths}

    def save(self, name, states: torch.Tensor, mel_lengths: torch.Tensor) -> None:
        self.write(name, {"states": states.to(self.dtype), "mel_lengths": mel_lengths.long()})

    @classmethod
    def create(cls, cache_dir, model, processor, dtype: str = "float16", source: str = "") -> AudioFeatureCache:
        settings = processor.feature_extractor.to_dict()
        settings = {k: v for k, v in settings.items() if k not in ("auto_map", "processor_class", "mel_filters")}
        meta = {
            **config_signature(owner(model).config),
            "fingerprint": tower_fingerprint(model),
            "feature_extractor": json.loads(json.dumps(settings, default=str)),
            "dtype": dtype,
            "source": str(source),
        }
        return super().create(cache_dir, meta, BUILD_FIELDS)


def load_audio_model(model_path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(Phi3ProjectorModel with only its audio tower kept, processor) from a composite checkpoint."""
    return load_tower_model(model_path, device, dtype, keep="audio_tower")


def _features(processor, path):
    features, mask, _ = processor.process_audio([path], SAMPLING_RATE)
    return features, mask


def clip_names(rows: list[dict]) -> list[str]:
    """The unique audio file names of the rows, as written (the cache's keys)."""
    return list(dict.fromkeys(str(name) for row in rows for name in media_paths(row, "audio", None)))


def build_cache(model, processor, data_path, cache_dir, audio_folder=None, batch_size: int = 16,
                dtype: str = "float16", num_workers: int = 0, source: str = "") -> dict:  # fmt: skip
    """Encoder output of every clip of the rows not yet in the cache; returns the run's summary.
    `data_path` is a file of rows or a list of rows."""
    rows = data_path if isinstance(data_path, list) else read_rows(data_path)
    names = clip_names(rows)
    cache = AudioFeatureCache.create(cache_dir, model, processor, dtype, source)
    todo = [name for name in names if name not in cache]
    tower_owner = owner(model)
    device = next(tower_owner.audio_tower.parameters()).device
    # Clips of like length batch together: real-length encoding pads a batch to its longest clip.
    lengths = {name: _duration(Path(audio_folder or "") / name) for name in todo}
    todo.sort(key=lambda name: lengths[name])
    loader = torch.utils.data.DataLoader(
        MediaFiles(todo, audio_folder, functools.partial(_features, processor)),
        batch_size=batch_size, num_workers=num_workers, collate_fn=list,
    )
    failed, computed = {}, 0
    with tqdm(total=len(todo), unit="clip", desc="audio features") as bar, torch.inference_mode():
        for batch in loader:
            failed.update({name: error for name, _, error in batch if error})
            good = [(name, inputs) for name, inputs, error in batch if not error]
            if good:
                features = torch.from_numpy(np.concatenate([f for _, (f, _) in good])).to(device)
                mel_lengths = torch.from_numpy(np.concatenate([m for _, (_, m) in good])).sum(-1).to(device)
                states = tower_owner.encode_audio(features, mel_lengths)
                keep = tower_owner.audio_frames_used(mel_lengths)
                first = 0
                for name, (f, _) in good:
                    windows = slice(first, first + f.shape[0])
                    first += f.shape[0]
                    cache.save(name, states[windows, : int(keep[windows].max())], mel_lengths[windows])
                    computed += 1
            bar.update(len(batch))
    return summarize(cache_dir, len(names), len(todo), computed, failed)


def _duration(path: Path) -> float:
    try:
        import soundfile

        return soundfile.info(str(path)).duration
    except Exception:  # noqa: BLE001 - unreadable or missing: the loader reports it
        return 0.0


def format_summary(summary: dict, limit: int = 20) -> str:
    return "audio cache " + _format(summary, "clips", limit)


def main(argv: list[str] | None = None) -> dict:
    return command_line(argv, "Precompute Whisper encoder output of the clips of LLaVA-format rows.", "audio", 16,
                        load_audio_model, build_cache, format_summary)  # fmt: skip


__all__ = ["AudioFeatureCache", "build_cache", "clip_names", "config_signature", "load_audio_model", "main", "tower_fingerprint"]

if __name__ == "__main__":
    main()
