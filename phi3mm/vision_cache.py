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

import argparse
import hashlib
import json
import os
import posixpath
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as serialize
from tqdm.auto import tqdm

from phi3mm.data import media_paths, read_rows

FORMAT = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
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


def _owner(model):
    """The module that has `vision_tower` and `select_vision_features`, from the full (or PEFT) model."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model if hasattr(model, "select_vision_features") else model.model


def tower_fingerprint(model) -> str:
    """sha256 of the vision tower's weights: names, shapes and values rounded to bfloat16, so the
    same tower loaded in float32 or bfloat16 gives the same fingerprint."""
    digest = hashlib.sha256()
    for name, param in sorted(_owner(model).vision_tower.named_parameters()):
        digest.update(f"{name}{tuple(param.shape)};".encode())
        digest.update(param.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _image_processor_settings(processor) -> dict:
    settings = processor.image_processor.to_dict()
    settings = {k: v for k, v in settings.items() if k not in ("auto_map", "processor_class")}
    return json.loads(json.dumps(settings, default=str))  # tuples -> lists, as meta.json reads back


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the whole file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the write failed


class VisionFeatureCache:
    """Read side of the cache (and `save` for the builder). `load(name)` -> (patches, width) tensor.

    `config` (a Phi3ProjectorConfig) is checked against meta.json on open, and `fingerprint` too
    when given; a difference raises ValueError naming the field.
    """

    def __init__(self, cache_dir: str | os.PathLike, config=None, fingerprint: str | None = None):
        self.cache_dir = Path(cache_dir)
        meta_path = self.cache_dir / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{meta_path} not found: build the cache first with `python -m phi3mm.vision_cache`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, this code reads format {FORMAT}")
        if config is not None:
            self.check(config_signature(config))
        if fingerprint is not None:
            self.check({"fingerprint": fingerprint})
        self.shape = tuple(self.meta["shape"])
        self.dtype = DTYPES[self.meta["dtype"]]

    def check(self, expected: dict) -> None:
        for field, value in expected.items():
            if self.meta.get(field) != value:
                raise ValueError(
                    f"vision cache {self.cache_dir} does not match the model: {field} is {self.meta.get(field)!r} "
                    f"in the cache but {value!r} for the model. Build a cache from this model, in a new folder: "
                    f"python -m phi3mm.vision_cache --model <this checkpoint> --data_path ... --cache_dir <new folder>"
                )

    def check_model(self, model) -> None:
        """The model's config and tower weights against the cache (the fingerprint needs the weights)."""
        self.check({**config_signature(_owner(model).config), "fingerprint": tower_fingerprint(model)})

    @staticmethod
    def key(name: str | os.PathLike) -> str:
        return posixpath.normpath(os.fspath(name))

    def path(self, name: str | os.PathLike) -> Path:
        digest = hashlib.sha256(self.key(name).encode()).hexdigest()
        return self.cache_dir / "features" / digest[:2] / f"{digest}.safetensors"

    def __contains__(self, name) -> bool:
        return self.path(name).is_file()

    def load(self, name: str | os.PathLike) -> torch.Tensor:
        """Features of one image, (patches, width), in the storage dtype; ValueError if absent or bad."""
        path = self.path(name)
        if not path.is_file():
            raise ValueError(f"no cached vision features for image {os.fspath(name)!r} in {self.cache_dir}")
        try:
            with safe_open(path, "pt") as file:
                stored_name = (file.metadata() or {}).get("image")
                features = file.get_tensor("features")
        except Exception as error:  # noqa: BLE001 - a corrupt entry is a skipped row, like a corrupt image
            raise ValueError(f"cached vision features for image {os.fspath(name)!r} are unreadable ({error})") from None
        if stored_name != self.key(name) or tuple(features.shape) != self.shape:
            raise ValueError(
                f"cached vision features for image {os.fspath(name)!r} do not fit: entry for {stored_name!r}, "
                f"shape {tuple(features.shape)}, expected {self.shape}"
            )
        return features

    def save(self, name: str | os.PathLike, features: torch.Tensor) -> None:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor = features.detach().to("cpu", self.dtype).contiguous()
        _atomic_write(path, serialize({"features": tensor}, metadata={"image": self.key(name)}))

    @classmethod
    def create(cls, cache_dir, model, processor, dtype: str = "float16", source: str = "") -> "VisionFeatureCache":
        """Open `cache_dir` for writing: a new cache gets meta.json; an existing one must match in full."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        config = _owner(model).config
        meta = {
            "format": FORMAT,
            **config_signature(config),
            "fingerprint": tower_fingerprint(model),
            "image_processor": _image_processor_settings(processor),
            "dtype": dtype,
            "shape": feature_shape(config),
            "source": os.fspath(source),
        }
        cache_dir = Path(cache_dir)
        if (cache_dir / "meta.json").is_file():
            cls(cache_dir).check({field: meta[field] for field in BUILD_FIELDS})
        else:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(cache_dir / "meta.json", json.dumps(meta, indent=1).encode())
        return cls(cache_dir)


class _Images(torch.utils.data.Dataset):
    """(name, pixel_values (1, 3, H, W) or None, error or None) per image; decoded in loader workers."""

    def __init__(self, names: list[str], image_folder, processor):
        self.names, self.folder, self.processor = names, Path(image_folder) if image_folder else None, processor

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        name = self.names[index]
        path = self.folder / name if self.folder else Path(name)
        if not path.is_file():
            return name, None, "missing"
        try:
            return name, self.processor.process_images([path]), None
        except Exception as error:  # noqa: BLE001 - any image that cannot be decoded is listed, not fatal
            return name, None, f"unreadable: {error}"


def load_vision_model(model_path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(Phi3ProjectorModel with only its vision tower kept, processor) from a composite checkpoint."""
    from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration
    from processing_multimodal import MultimodalProcessor

    inner = Phi3ProjectorForConditionalGeneration.from_pretrained(model_path, dtype=dtype).model
    inner.language_model = inner.audio_tower = None  # free what the features do not need
    processor = MultimodalProcessor.from_pretrained(model_path, trust_remote_code=True)
    return inner.to(device).eval(), processor


def build_cache(model, processor, data_path, cache_dir, image_folder=None, batch_size: int = 32,
                dtype: str = "float16", num_workers: int = 0, source: str = "") -> dict:  # fmt: skip
    """Features of every image of the rows not yet in the cache; returns the run's summary."""
    names = list(dict.fromkeys(str(name) for row in read_rows(data_path) for name in media_paths(row, "image", None)))
    cache = VisionFeatureCache.create(cache_dir, model, processor, dtype, source)
    todo = [name for name in names if name not in cache]
    owner, device = _owner(model), next(_owner(model).vision_tower.parameters()).device
    loader = torch.utils.data.DataLoader(
        _Images(todo, image_folder, processor), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    failed, computed = {}, 0
    with tqdm(total=len(todo), unit="img", desc="vision features") as bar, torch.inference_mode():
        for batch in loader:
            failed.update({name: error for name, _, error in batch if error})
            good = [(name, pixels) for name, pixels, error in batch if not error]
            if good:
                pixel_values = torch.from_numpy(np.concatenate([pixels for _, pixels in good])).to(device)
                for (name, _), features in zip(good, owner.select_vision_features(pixel_values)):
                    cache.save(name, features)
                    computed += 1
            bar.update(len(batch))
    summary = {
        "cache_dir": str(cache_dir),
        "images": len(names),
        "computed": computed,
        "reused": len(names) - len(todo),
        "failed": len(failed),
        "missing": sum(error == "missing" for error in failed.values()),
        "unreadable": sum(error != "missing" for error in failed.values()),
        "failures": failed,
    }
    _atomic_write(Path(cache_dir) / "summary.json", json.dumps(summary, indent=1).encode())
    return summary


def format_summary(summary: dict, limit: int = 20) -> str:
    text = (f"vision cache {summary['cache_dir']}: {summary['images']} images, {summary['computed']} computed, "
            f"{summary['reused']} reused, {summary['failed']} failed "
            f"({summary['missing']} missing, {summary['unreadable']} unreadable)")  # fmt: skip
    lines = [f"  {name}: {error}" for name, error in list(summary["failures"].items())[:limit]]
    if summary["failed"] > limit:
        lines.append(f"  ... and {summary['failed'] - limit} more (summary.json lists all)")
    return "\n".join([text, *lines])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Precompute vision-tower features of LLaVA-format rows.")
    parser.add_argument("--model", required=True, help="composite checkpoint folder")
    parser.add_argument("--data_path", required=True, help="LLaVA rows: JSON list, JSON Lines or a saved dataset")
    parser.add_argument("--image_folder", default=None, help="folder the rows' image paths are relative to")
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="storage dtype")
    parser.add_argument("--tower_dtype", default="float32", choices=sorted(DTYPES), help="dtype the tower runs in")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num_workers", type=int, default=0, help="image-decoding worker processes")
    args = parser.parse_args(argv)
    model, processor = load_vision_model(args.model, args.device, DTYPES[args.tower_dtype])
    summary = build_cache(model, processor, args.data_path, args.cache_dir, args.image_folder, args.batch_size,
                          args.dtype, args.num_workers, source=args.model)  # fmt: skip
    print(format_summary(summary))
    return summary


__all__ = ["VisionFeatureCache", "build_cache", "config_signature", "load_vision_model", "main", "tower_fingerprint"]

if __name__ == "__main__":
    main()
