"""LLaVA rows -> token masks -> batches: what is trained, what is cut, what is skipped.

The expected ids and labels are written out by hand from separately tokenized pieces, so a
change in the masking shows up here and not only as a slower-falling loss.
"""

import json

import pytest
import soundfile as sf
import torch
from PIL import Image

from conftest import shape_image, tone
from phi3mm.data import IGNORE_INDEX, LlavaDataset, MultimodalCollator, encode_conversation, read_rows, row_messages

SYSTEM = "You are a helpful assistant."
QUESTION_1, ANSWER_1 = "What color is the shape?", "red."
QUESTION_2, ANSWER_2 = "Is the tone high or low?", "low."
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": f"<image>\n{QUESTION_1}"},
    {"role": "assistant", "content": ANSWER_1},
    {"role": "user", "content": f"<audio>\n{QUESTION_2}"},
    {"role": "assistant", "content": ANSWER_2},
]
# A 1 s clip at 16 kHz: 100 mel frames -> 50 encoder frames -> 10 tokens at the tiny model's stack factor 5.
AUDIO_TOKENS_1S = 10


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


def answer_blocks(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive trained tokens."""
    blocks, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token, "a label must be the token at its own position (shifted once, in the model)"
            current.append(token)
        elif current:
            blocks.append(current)
            current = []
    return blocks + ([current] if current else [])


def test_labels_are_exactly_the_answers_and_their_end_tokens(processor):
    """With the real Phi-3.5 tokenizer (its role tokens swallow the newline after them, and a word
    after a special token has no leading space piece): the training ids are the inference ids of
    the same conversation, and the trained tokens are each answer and its <|end|>, right after an
    <|assistant|>, nothing else."""
    image, clip = Image.fromarray(shape_image()), tone(seconds=1.0)
    item = encode_conversation(processor, MESSAGES, [image], [clip], max_length=2048)
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    # The same tokens the processor gives the chat template's rendering at inference time.
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False)  # ends with the last <|end|>: eos is <|end|>
    assert processor.tokenizer.eos_token == "<|end|>" and prompt.endswith("low.<|end|>\n")
    assert processor(text=prompt, images=[shape_image()], audio=[tone(seconds=1.0)])["input_ids"][0].tolist() == ids
    tok = processor.tokenizer.convert_tokens_to_ids
    blocks = answer_blocks(ids, labels)
    assert [processor.tokenizer.decode(block) for block in blocks] == [f"{ANSWER_1}<|end|>", f"{ANSWER_2}<|end|>"]
    for block in blocks:
        start = next(i for i in range(len(ids)) if ids[i : i + len(block)] == block)
        assert ids[start - 1] == tok("<|assistant|>") and block[-1] == tok("<|end|>")
    assert ids.count(processor.image_token_id) == 16 and ids.count(processor.audio_token_id) == AUDIO_TOKENS_1S
    assert ids[0] == tok("<|system|>")  # no BOS: Phi-3.5's tokenizer adds none
    assert item["pixel_values"].shape == (1, 3, 64, 64)  # the tiny CLIP's input size
    assert item["input_features"].shape == (1, 80, 3000)
    assert item["input_features_mask"].sum().item() == 100  # 1 s of 10 ms mel frames


def test_truncation_drops_the_second_turn_whole_with_its_audio(processor):
    first_turn = processor(text=processor.apply_chat_template(MESSAGES[:3], tokenize=False), images=[shape_image()])
    n_first = first_turn["input_ids"].shape[1]
    full = encode_conversation(processor, MESSAGES, [Image.fromarray(shape_image())], [tone(seconds=1.0)], 2048)
    # Room for the first turn and a few audio tokens of the second, never the whole second turn.
    item = encode_conversation(
        processor, MESSAGES, [Image.fromarray(shape_image())], [tone(seconds=1.0)], max_length=n_first + 5
    )
    assert n_first + 5 < len(full["input_ids"])
    assert item["input_ids"].tolist() == first_turn["input_ids"][0].tolist()
    assert torch.equal(item["labels"], full["labels"][:n_first])
    assert processor.audio_token_id not in item["input_ids"].tolist()
    assert "input_features" not in item and "input_features_mask" not in item
    assert item["pixel_values"].shape[0] == 1
    assert (item["input_ids"] == processor.image_token_id).sum().item() == processor.image_seq_length


def write_image(path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(shape_image(**kwargs)).save(path)
    return path


def write_audio(path, seconds=0.5):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds=seconds), 16_000)
    return path


def row(id_, question, answer, image=None, audio=None):
    out = {"id": id_, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image:
        out["image"] = image
    if audio:
        out["audio"] = audio
    return out


@pytest.fixture
def media(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png", color=(0, 0, 255), left=False)
    write_audio(tmp_path / "t.wav")
    return tmp_path


def test_first_turn_longer_than_max_length_is_skipped_and_counted(processor, media):
    rows = [
        row("long", "<image>\n" + "Describe the image. " * 30, "red.", image="a.png"),
        row("short", "<image>\nWhat color?", "blue.", image="b.png"),
    ]
    dataset = LlavaDataset(rows, processor, media, media, max_length=40)
    item = dataset[0]  # the long row does not fit: the next one stands in
    assert processor.tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX]) == "blue.<|end|>"
    assert dataset.skipped == {"too long": 1}
    dataset[0], dataset[1]
    assert dataset.skipped == {"too long": 1}, "a row is counted once, however often it is drawn"


def test_json_list_and_json_lines_read_the_same(tmp_path):
    rows = [row("1", "<image>\nWhat color?", "red.", image="a.png"), row("2", "Hello?", "Hi.")]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_rows(tmp_path / "list.json") == rows
    assert read_rows(str(tmp_path / "rows.jsonl")) == rows
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_rows(tmp_path / "bad.json")


def test_row_with_image_but_no_placeholder_gets_one():
    messages = row_messages(row("1", "What color is the shape?", "red.", image="a.png"))
    assert messages[0] == {"role": "user", "content": "<image>\nWhat color is the shape?"}
    after = row_messages(row("2", "What color is the shape?\n<image>", "red.", image="a.png"))
    assert after[0]["content"] == "What color is the shape?\n<image>"  # kept where the row put it
    with pytest.raises(ValueError, match="placeholders"):
        row_messages(row("3", "<image>\n<image>\nSame?", "yes.", image="a.png"))


def test_rows_without_media_and_a_datasets_dataset(processor, media):
    import datasets

    rows = [row("text", "Hello, how are you today?", "I am fine."), row("img", "What color?", "red.", image="a.png"),
            row("snd", "<audio>\nHigh or low?", "low.", audio="t.wav")]
    # A hub dataset has every column in every row (None where a row has no image); from_list takes
    # its columns from the first row, so they are spelled out.
    table = datasets.Dataset.from_list([{"image": None, "audio": None, **r} for r in rows])
    for source in (rows, table):
        dataset = LlavaDataset(read_rows(source), processor, media, media)
        assert len(dataset) == 3 and not dataset.skipped
        text, image, audio = (dataset[i] for i in range(3))
        assert set(text) == {"input_ids", "labels"}
        assert image["pixel_values"].shape[0] == 1 and "input_features" not in image
        assert audio["input_features"].shape[0] == 1 and "pixel_values" not in audio
    table.save_to_disk(str(media / "saved"))
    assert len(LlavaDataset(read_rows(media / "saved"), processor, media, media)) == 3


def test_missing_and_corrupt_media_are_skipped_and_counted(processor, media):
    good = (media / "a.png").read_bytes()
    (media / "broken.png").write_bytes(good[: len(good) // 2])  # a truncated download
    rows = [
        row("ok", "<image>\nWhat color?", "red.", image="a.png"),
        row("no-image", "<image>\nWhat color?", "red.", image="gone.png"),
        row("no-audio", "<audio>\nHigh or low?", "low.", audio="gone.wav"),
        row("corrupt", "<image>\nWhat color?", "red.", image="broken.png"),
        row("ok-audio", "<audio>\nHigh or low?", "low.", audio="t.wav"),
    ]
    dataset = LlavaDataset(rows, processor, media, media)
    assert len(dataset) == 3  # missing files are found up front; the corrupt one only on access
    assert dataset.skipped == {"missing image": 1, "missing audio": 1}
    item = dataset[1]  # the corrupt image: the next row stands in, a valid item comes back
    assert "input_features" in item and "pixel_values" not in item
    for _ in range(2):
        [dataset[i] for i in range(len(dataset))]
    assert dataset.skipped == {"missing image": 1, "missing audio": 1, "unreadable image": 1}


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_rows_that_fail_in_dataloader_workers_are_counted_in_the_main_process(processor, media, start_method):
    good = (media / "a.png").read_bytes()
    (media / "half.png").write_bytes(good[: len(good) // 2])
    (media / "noise.wav").write_bytes(b"RIFF" + bytes(100))
    rows = [row("ok", "<image>\nWhat color?", "red.", image="a.png"),
            row("corrupt", "<image>\nWhat color?", "red.", image="half.png"),
            row("corrupt-audio", "<audio>\nHigh or low?", "low.", audio="noise.wav"),
            row("ok-audio", "<audio>\nHigh or low?", "low.", audio="t.wav")]
    dataset = LlavaDataset(rows, processor, media, media)
    assert not dataset.skipped
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=list,
                                         multiprocessing_context=start_method)
    assert sum(len(batch) for batch in loader) == 4  # stand-ins keep the batches full
    assert dataset.skipped == {"unreadable image": 1, "unreadable audio": 1}


def test_strict_raises_naming_the_row(processor, media):
    with pytest.raises(ValueError, match=r"id 'no-image'.*missing image"):
        LlavaDataset([row("no-image", "<image>\nWhat?", "red.", image="gone.png")], processor, media, media,
                     strict=True)
    good = (media / "a.png").read_bytes()
    (media / "broken.png").write_bytes(good[:40])
    rows = [row("corrupt", "<image>\nWhat?", "red.", image="broken.png")]
    dataset = LlavaDataset(rows, processor, media, media, strict=True)
    with pytest.raises(ValueError, match=r"id 'corrupt'.*unreadable image"):
        dataset[0]


def test_collator_pads_right_with_ignored_labels_and_no_attention(processor):
    image = [Image.fromarray(shape_image())]
    long = encode_conversation(processor, MESSAGES, image, [tone(seconds=1.0)], max_length=2048)
    chat = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]
    short = encode_conversation(processor, chat, [], [], 2048)
    batch = MultimodalCollator(processor.tokenizer.pad_token_id)([short, long])
    n, longest = len(short["input_ids"]), len(long["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, longest)
    assert torch.equal(batch["input_ids"][0, :n], short["input_ids"])
    assert (batch["input_ids"][0, n:] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and torch.equal(batch["labels"][0, :n], short["labels"])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (longest - n)
    assert batch["attention_mask"][1].all() and torch.equal(batch["labels"][1], long["labels"])
    # Media of the rows that have them, in row order.
    assert batch["pixel_values"].shape[0] == 1 and batch["input_features"].shape[0] == 1
    left_collator = MultimodalCollator(processor.tokenizer.pad_token_id, padding_side="left", pad_to_multiple_of=8)
    left = left_collator([short, long])
    width = left["input_ids"].shape[1]
    assert width % 8 == 0 and width >= longest
    assert left["attention_mask"][0].tolist() == [0] * (width - n) + [1] * n
    assert torch.equal(left["input_ids"][0, width - n :], short["input_ids"])


@pytest.mark.parametrize("seconds", [0.5, 29.9, 30.1, 45.0])
def test_length_from_the_header_equals_the_encoded_length(tiny, processor, tmp_path, seconds):
    """Length grouping counts audio tokens from the file header; the model makes them from the
    decoded windows. One function counts both, so a 45 s clip (two windows) agrees too."""
    write_image(tmp_path / "a.png")
    write_audio(tmp_path / "long.wav", seconds=seconds)
    rows = [row("x", "<image>\n<audio>\nHow long is it?", "long.", image="a.png", audio="long.wav")]
    dataset = LlavaDataset(rows, processor, tmp_path, tmp_path, max_length=10_000)
    item = dataset[0]
    assert dataset.lengths == [len(item["input_ids"])]
    expected_windows = -(-round(seconds * 16_000) // processor.window_samples)
    assert item["input_features"].shape[0] == expected_windows
    n_audio = int((item["input_ids"] == processor.audio_token_id).sum())
    assert n_audio == int(tiny[0].model.audio_token_counts(item["input_features_mask"].sum(-1)).sum())


# ---- the formats users already have -------------------------------------------------------------


def test_conversational_rows_give_the_same_tokens_as_the_llava_row(processor, media):
    """TRL / llava-instruct-mix-vsft rows: typed content parts (with their None fields), media in
    `images` / `audios`; string content with placeholders too. All read unchanged, same tokens."""
    llava = row("a", "<image>\n<audio>\nWhat color is it?", "red.", image="a.png", audio="t.wav")
    parts = {
        "messages": [
            {"role": "user", "content": [
                {"type": "image", "text": None, "index": 0}, {"type": "audio", "text": None, "index": 0},
                {"type": "text", "text": "What color is it?", "index": None},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "red.", "index": None}]},
        ],
        "images": ["a.png"], "audios": ["t.wav"],
    }  # fmt: skip
    string = {"messages": [{"role": "user", "content": "<image>\n<audio>\nWhat color is it?"},
                           {"role": "assistant", "content": "red."}], "images": ["a.png"], "audios": ["t.wav"]}
    path = media / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (llava, parts, string)))
    dataset = LlavaDataset(read_rows(path), processor, media, media)
    assert dataset.skipped == {} and len(dataset) == 3
    items = [dataset[i] for i in range(3)]
    for item in items[1:]:
        for key in ("input_ids", "labels", "pixel_values", "input_features"):
            assert torch.equal(item[key], items[0][key]), key
    assert dataset.lengths == [len(item["input_ids"])] * 3


def test_a_datasets_folder_with_in_memory_images_and_audio(processor, media):
    import datasets
    import numpy as np

    rows = {
        "messages": [[{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Which?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red."}]}]],
        "images": [[Image.fromarray(shape_image())]],
        "audios": [[{"array": tone(seconds=0.5).astype(np.float64), "sampling_rate": 16_000}]],
    }
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.List(datasets.Image()),
        "audios": [{"array": datasets.List(datasets.Value("float64")), "sampling_rate": datasets.Value("int64")}],
    })  # fmt: skip
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(media / "ds"))
    dataset = LlavaDataset(read_rows(media / "ds"), processor)
    item = dataset[0]
    assert dataset.skipped == {}
    assert item["pixel_values"].shape == (1, 3, 64, 64) and item["input_features"].shape[0] == 1
    assert processor.tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX]) == "red.<|end|>"
    assert dataset.lengths == [len(item["input_ids"])]


def test_llava_mix665k_shapes_sub_folder_paths_and_text_only_sharegpt_rows(processor, tmp_path):
    write_image(tmp_path / "coco" / "train2017" / "1.jpg")
    write_image(tmp_path / "gqa" / "images" / "2.jpg")
    rows = [
        row("c", "<image>\nWhat is it?", "A square.", image="coco/train2017/1.jpg"),
        row("g", "What is it?\n<image>", "A square.", image="gqa/images/2.jpg"),  # <image> after the text
        # ShareGPT: no image key, and some conversations open with a gpt turn, which LLaVA skips
        {"id": "s", "conversations": [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "Hello"},
                                      {"from": "gpt", "value": "How can I help?"}]},
    ]
    dataset = LlavaDataset(rows, processor, tmp_path)
    assert dataset.skipped == {} and len(dataset) == 3
    text_only = dataset[2]
    assert "pixel_values" not in text_only
    assert processor.tokenizer.decode(text_only["labels"][text_only["labels"] != IGNORE_INDEX]) == "How can I help?<|end|>"
    assert "Hi!" not in processor.tokenizer.decode(text_only["input_ids"])


def test_asr_style_datasets_with_audio_columns_are_read_without_torchcodec(processor, tmp_path):
    """LibriSpeech-like data sets: an Audio column (datasets would decode it with torchcodec, which
    is not installed) plus a transcript; the rows come back with the clip as bytes for our loader."""
    import io

    import datasets

    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds=0.5), 16_000, format="WAV")
    rows = {"audio": [{"bytes": buffer.getvalue(), "path": None}], "text": ["hello"],
            "audios": [[{"bytes": buffer.getvalue(), "path": None}]]}  # fmt: skip
    ds = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())
    ds = ds.cast_column("audios", datasets.List(datasets.Audio()))
    ds.save_to_disk(str(tmp_path / "asr"))
    (row,) = read_rows(tmp_path / "asr")
    assert isinstance(row["audio"]["bytes"], bytes) and row["text"] == "hello"
    assert isinstance(row["audios"][0]["bytes"], bytes)
    from processing_multimodal import load_audio

    assert len(load_audio(row["audio"])) == 8000


def test_llava_instruct_rows_train_exactly_their_answers_with_the_real_tokenizer(processor, media):
    """System turn, several turns, <image> after the text, audio in a later turn: every answer and
    its <|end|> is trained, nothing else, and the ids are what inference tokenizes."""
    answers = ["It is red.", "Yes, on the left side.", "A low tone, about 300 Hz."]
    rows = [{
        "id": "multi", "image": "a.png", "audio": "t.wav",
        "conversations": [
            {"from": "system", "value": "You answer briefly."},
            {"from": "human", "value": "What color is the shape?\n<image>"},
            {"from": "gpt", "value": answers[0]},
            {"from": "human", "value": "Is it on the left?"},
            {"from": "gpt", "value": answers[1]},
            {"from": "human", "value": "<audio>\nAnd this sound?"},
            {"from": "gpt", "value": answers[2]},
        ],
    }]  # fmt: skip
    dataset = LlavaDataset(rows, processor, media, media)
    item = dataset[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    decoded = [processor.tokenizer.decode(block) for block in answer_blocks(ids, labels)]
    assert decoded == [f"{answer}<|end|>" for answer in answers]
    messages = row_messages(rows[0])
    prompt = processor.apply_chat_template(messages, tokenize=False)
    from processing_multimodal import load_audio

    again = processor(text=prompt, images=[media / "a.png"], audio=[load_audio(media / "t.wav")])
    assert again["input_ids"][0].tolist() == ids and dataset.lengths == [len(ids)]
