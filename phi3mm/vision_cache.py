"""python -m phi3mm.vision_cache --model CHECKPOINT --data_path train.json --image_folder DIR \
    --cache_dir OUT [--batch_size 32] [--dtype float16|float32] [--device cpu|cuda] [--num_workers 0]

Precomputed vision features, so training can skip the vision tower (`train_trainer.py ...
--vision_cache_dir OUT`, which opens the cache with `VisionFeatureCache(OUT, model.config)`).

The command runs the checkpoint's vision tower through `select_vision_features` (the hidden layer and
CLS choice the projector takes, before any token pooling) over every unique image of the LLaVA rows
and stores one safetensors file per image: `OUT/features/<h[:2]>/<h>.safetensors`, h = sha256 of the
image name as the rows write it (a relative path). Each file is written under a temporary name and
renamed into place, so an interrupted run never leaves a half-written entry; a rerun reuses the
entries already there and computes the rest. Missing or unreadable images are counted and listed
(printed, and in OUT/summary.json), not a crash.

OUT/meta.json records what the features depend on: the tower's shape (hidden_size, image_size,
patch_size, num_hidden_layers), vision_feature_layer (as an index into hidden_states, 0 = embeddings),
vision_feature_select_strategy, a fingerprint of the tower's weights, the image processor's settings
and the storage dtype. Opening a cache checks the config fields; the fingerprint needs the weights, so
it is checked when the command resumes a cache and by `VisionFeatureCache.check_model(model)`.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import torch
from tqdm.auto import tqdm

from phi3mm.data import media_paths, read_rows
from phi3mm.feature_cache import FeatureCache, MediaFiles, command_line, load_tower_model, module_fingerprint, owner
from phi3mm.feature_cache import format_summary as _format, summarize

# Fields that must agree between a cache and the model that uses it; only the config ones are
# known without the weights.
CONFIG_FIELDS = ("hidden_size", "image_size", "patch_size", "num_hidden_layers",
                 "vision_feature_layer", "vision_feature_select_strategy")  # fmt: skip
BUILD_FIELDS = CONFIG_FIELDS + ("fingerprint", "image_processor", "dtype", "shape")


def config_signature(config) -> dict:
    """What a Phi3ProjectorConfig says about the features: the tower's shape and the layer taken."""
    vision = config.vision_config
    return {
        "hidden_size": vision.hidden_size,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "num_hidden_layers": vision.num_hidden_layers,
        "vision_feature_layer": config.vision_layers_used,  # -2 == n - 1
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }


def feature_shape(config) -> list[int]:
    """(patches [+1 CLS with strategy "full"], vision width) of one image's features."""
    return [config.vision_feature_tokens, config.vision_config.hidden_size]


def tower_fingerprint(model) -> str:
    """sha256 of the vision tower's weights (see `feature_cache.module_fingerprint`)."""
    return module_fingerprint(owner(model).vision_tower)


def _image_processor_settings(processor) -> dict:
    settings = processor.image_processor.to_dict()
    settings = {k: v for k, v in settings.items() if k not in ("auto_map", "processor_class")}
    return json.loads(json.dumps(settings, default=str))  # tuples -> lists, as meta.json reads back


class VisionFeatureCache(FeatureCache):
    """`load(name)` -> (patches, width) tensor of one image, in the storage dtype."""

    modality = "image"
    command = "python -m phi3mm.vision_cache"
    signature = staticmethod(config_signature)
    tower = staticmethod(lambda model: owner(model).vision_tower)

    def __init__(self, cache_dir, config=None, fingerprint: str | None = None):
        super().__init__(cache_dir, config, fingerprint)
        self.shape = tuple(self.meta["shape"])

    def load(self, name) -> torch.Tensor:
        features = self.read(name)["features"]
        if tuple(features.shape) != self.shape:
            raise ValueError(f"cached features for image {name!r} have shape {tuple(features.shape)}, expected {self.shape}")
        return features

    def save(self, name, features: torch.Tensor) -> None:
        self.write(name, {"features": features.to(self.dtype)})

    @classmethod
    def create(cls, cache_dir, model, processor, dtype: str = "float16", source: str = "") -> VisionFeatureCache:
        """Open `cache_dir` for writing: a new cache gets meta.json; an existing one must match in full."""
        config = owner(model).config
        meta = {
            **config_signature(config),
            "fingerprint": tower_fingerprint(model),
            "image_processor": _image_processor_settings(processor),
            "dtype": dtype,
            "shape": feature_shape(config),
            "source": str(source),
        }
        return super().create(cache_dir, meta, BUILD_FIELDS)


def _pixels(processor, path):
    return processor.process_images([path])


def load_vision_model(model_path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(Phi3ProjectorModel with only its vision tower kept, processor) from a composite checkpoint."""
    return load_tower_model(model_path, device, dtype, keep="vision_tower")


def build_cache(model, processor, data_path, cache_dir, image_folder=None, batch_size: int = 32,
                dtype: str = "float16", num_workers: int = 0, source: str = "") -> dict:  # fmt: skip
    """Features of every image of the rows not yet in the cache; returns the run's summary."""
    names = list(dict.fromkeys(str(name) for row in read_rows(data_path) for name in media_paths(row, "image", None)))
    cache = VisionFeatureCache.create(cache_dir, model, processor, dtype, source)
    todo = [name for name in names if name not in cache]
    tower_owner = owner(model)
    device = next(tower_owner.vision_tower.parameters()).device
    loader = torch.utils.data.DataLoader(
        MediaFiles(todo, image_folder, functools.partial(_pixels, processor)),
        batch_size=batch_size, num_workers=num_workers, collate_fn=list,
    )
    failed, computed = {}, 0
    with tqdm(total=len(todo), unit="img", desc="vision features") as bar, torch.inference_mode():
        for batch in loader:
            failed.update({name: error for name, _, error in batch if error})
            good = [(name, pixels) for name, pixels, error in batch if not error]
            if good:
                pixel_values = torch.from_numpy(np.concatenate([pixels for _, pixels in good])).to(device)
                for (name, _), features in zip(good, tower_owner.select_vision_features(pixel_values)):
                    cache.save(name, features)
                    computed += 1
            bar.update(len(batch))
    return summarize(cache_dir, len(names), len(todo), computed, failed)


def format_summary(summary: dict, limit: int = 20) -> str:
    return "vision cache " + _format(summary, "images", limit)


def main(argv: list[str] | None = None) -> dict:
    return command_line(argv, "Precompute vision-tower features of LLaVA-format rows.", "image", 32,
                        load_vision_model, build_cache, format_summary)  # fmt: skip


__all__ = ["VisionFeatureCache", "build_cache", "config_signature", "feature_shape", "load_vision_model", "main", "tower_fingerprint"]

if __name__ == "__main__":
    main()
