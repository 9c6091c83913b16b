"""What the vision and the audio feature caches share: a folder of safetensors entries, one per
media file, keyed by the file's name as the rows write it, with a meta.json that says which tower
(shape, layer, weights' fingerprint) and which preprocessing made them.

    OUT/meta.json                        format, the tower's signature, fingerprint, dtype, ...
    OUT/features/<h[:2]>/<h>.safetensors h = sha256 of the media name (a relative path)
    OUT/summary.json                     the last build: computed, reused, failed (and why)

Entries are written under a temporary name and renamed into place, so an interrupted build never
leaves a half-written one, and a rerun computes only what is missing. A subclass names its
modality and says what an entry holds (`validate`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

FORMAT = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the whole file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the write failed


def owner(model):
    """The module holding the towers (`Phi3ProjectorModel`), from the full or the PEFT-wrapped model."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model if hasattr(model, "select_vision_features") else model.model


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's weights: names, shapes and values rounded to bfloat16, so the same
    tower loaded in float32 or bfloat16 gives the same fingerprint."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        digest.update(f"{name}{tuple(param.shape)};".encode())
        digest.update(param.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Read side of a cache (and `save` for its builder). `config` (a Phi3ProjectorConfig) is
    checked against meta.json on open, and `fingerprint` too when given; a difference raises
    ValueError naming the field and the command that builds a matching cache."""

    modality = "media"  # "image" / "audio": the rows' key, and the name in messages
    command = ""  # the builder, as a user runs it

    def __init__(self, cache_dir: str | os.PathLike, config=None, fingerprint: str | None = None):
        self.cache_dir = Path(cache_dir)
        meta_path = self.cache_dir / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{meta_path} not found: build the cache first with `{self.command}`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, this code reads format {FORMAT}")
        if config is not None:
            self.check(self.signature(config))
        if fingerprint is not None:
            self.check({"fingerprint": fingerprint})
        self.dtype = DTYPES[self.meta["dtype"]]

    @staticmethod
    def signature(config) -> dict:
        """The config fields the features depend on."""
        raise NotImplementedError

    @staticmethod
    def tower(model) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def fingerprint(cls, model) -> str:
        return module_fingerprint(cls.tower(model))

    def check(self, expected: dict) -> None:
        for field, value in expected.items():
            if self.meta.get(field) != value:
                raise ValueError(
                    f"{self.modality} feature cache {self.cache_dir} does not match the model: {field} is "
                    f"{self.meta.get(field)!r} in the cache but {value!r} for the model. Build a cache from this "
                    f"model, in a new folder: {self.command} --model <this checkpoint> --data_path ... --cache_dir <new folder>"
                )

    def check_model(self, model) -> None:
        """The model's config and tower weights against the cache (the fingerprint needs the weights)."""
        self.check({**self.signature(owner(model).config), "fingerprint": self.fingerprint(model)})

    @staticmethod
    def key(name: str | os.PathLike) -> str:
        return posixpath.normpath(os.fspath(name))

    def path(self, name: str | os.PathLike) -> Path:
        digest = hashlib.sha256(self.key(name).encode()).hexdigest()
        return self.cache_dir / "features" / digest[:2] / f"{digest}.safetensors"

    def __contains__(self, name) -> bool:
        return self.path(name).is_file()

    def read(self, name: str | os.PathLike) -> dict[str, torch.Tensor]:
        """One entry's tensors; ValueError (a skipped row, like a corrupt file) if absent, unreadable
        or not the entry of `name`."""
        path, label = self.path(name), f"{self.modality} {os.fspath(name)!r}"
        if not path.is_file():
            raise ValueError(f"no cached features for {label} in {self.cache_dir}")
        try:
            with safe_open(path, "pt") as file:
                stored_name = (file.metadata() or {}).get(self.modality)
                tensors = {key: file.get_tensor(key) for key in file.keys()}
        except Exception as error:  # noqa: BLE001 - a corrupt entry is a skipped row, like a corrupt file
            raise ValueError(f"cached features for {label} are unreadable ({error})") from None
        if stored_name != self.key(name):
            raise ValueError(f"cached features for {label} are the entry of {stored_name!r}")
        return tensors

    def write(self, name: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
        atomic_write(path, serialize(tensors, metadata={self.modality: self.key(name)}))

    @classmethod
    def create(cls, cache_dir, meta: dict, build_fields: tuple[str, ...]):
        """Open `cache_dir` for writing: a new cache gets `meta`; an existing one must match it on
        `build_fields`."""
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {meta['dtype']!r}")
        cache_dir = Path(cache_dir)
        if (cache_dir / "meta.json").is_file():
            cls(cache_dir).check({field: meta[field] for field in build_fields})
        else:
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_dir / "meta.json", json.dumps({"format": FORMAT, **meta}, indent=1).encode())
        return cls(cache_dir)


def write_summary(cache_dir, summary: dict) -> None:
    atomic_write(Path(cache_dir) / "summary.json", json.dumps(summary, indent=1).encode())


def format_summary(summary: dict, unit: str, limit: int = 20) -> str:
    """One line of counts, then the first `limit` failures by name."""
    text = (f"{summary['cache_dir']}: {summary['total']} {unit}, {summary['computed']} computed, "
            f"{summary['reused']} reused, {summary['failed']} failed "
            f"({summary['missing']} missing, {summary['unreadable']} unreadable)")  # fmt: skip
    lines = [f"  {name}: {error}" for name, error in list(summary["failures"].items())[:limit]]
    if summary["failed"] > limit:
        lines.append(f"  ... and {summary['failed'] - limit} more (summary.json lists all)")
    return "\n".join([text, *lines])


def summarize(cache_dir, total: int, todo: int, computed: int, failed: dict[str, str]) -> dict:
    summary = {
        "cache_dir": str(cache_dir),
        "total": total,
        "computed": computed,
        "reused": total - todo,
        "failed": len(failed),
        "missing": sum(error == "missing" for error in failed.values()),
        "unreadable": sum(error != "missing" for error in failed.values()),
        "failures": failed,
    }
    write_summary(cache_dir, summary)
    return summary


class MediaFiles(torch.utils.data.Dataset):
    """(name, processed inputs or None, error or None) per media file, decoded in loader workers by
    `process(path)`; a missing or undecodable file is an error string, listed, not fatal."""

    def __init__(self, names: list[str], folder, process):
        self.names, self.folder, self.process = names, Path(folder) if folder else None, process

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        name = self.names[index]
        path = self.folder / name if self.folder else Path(name)
        if not path.is_file():
            return name, None, "missing"
        try:
            return name, self.process(path), None
        except Exception as error:  # noqa: BLE001 - any file that cannot be decoded is listed, not fatal
            return name, None, f"unreadable: {error}"


def load_tower_model(model_path, device: str, dtype: torch.dtype, keep: str):
    """(Phi3ProjectorModel with only its `keep` tower ("vision_tower" / "audio_tower"), processor)
    from a composite checkpoint: the rest is freed, since the features do not need it."""
    from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration
    from processing_multimodal import MultimodalProcessor

    inner = Phi3ProjectorForConditionalGeneration.from_pretrained(model_path, dtype=dtype).model
    inner.language_model = None
    setattr(inner, "audio_tower" if keep == "vision_tower" else "vision_tower", None)
    processor = MultimodalProcessor.from_pretrained(model_path, trust_remote_code=True)
    return inner.to(device).eval(), processor


def command_line(argv, description: str, kind: str, batch_size: int, load, build, format_summary) -> dict:
    """The `python -m phi3mm.{vision,audio}_cache` command: `kind` is "image" or "audio" (its
    `--<kind>_folder` flag), `load(model, device, dtype)` and `build(...)` the module's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="composite checkpoint folder")
    parser.add_argument("--data_path", required=True, help="LLaVA rows: JSON list, JSON Lines or a saved dataset")
    parser.add_argument(f"--{kind}_folder", default=None, help=f"folder the rows' {kind} paths are relative to")
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="storage dtype")
    parser.add_argument("--tower_dtype", default="float32", choices=sorted(DTYPES), help="dtype the tower runs in")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num_workers", type=int, default=0, help=f"{kind}-decoding worker processes")
    args = parser.parse_args(argv)
    model, processor = load(args.model, args.device, DTYPES[args.tower_dtype])
    summary = build(model, processor, args.data_path, args.cache_dir, getattr(args, f"{kind}_folder"), args.batch_size,
                    args.dtype, args.num_workers, source=args.model)  # fmt: skip
    print(format_summary(summary))
    return summary
