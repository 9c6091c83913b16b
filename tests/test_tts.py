"""Spoken questions (python -m phi3mm.tts): LLaVA and conversational rows read aloud by flite and
espeak-ng into 16 kHz WAVs, placeholders and keys as training reads them, the same seed giving the
same clips, and whisper-base hearing what the clips say. Needs flite and espeak-ng (apt-get install
flite espeak-ng) and whisper-base in the real-parts cache (python -m phi3mm.real_parts).
"""

import json
import os
import stat

import numpy as np
import pytest
import soundfile as sf
import torch

from phi3mm import tts
from phi3mm.data import row_media, row_messages

# Quick voices of both engines, male and female; rms, awb and the other espeak-ng accents are
# as clear to whisper-base but slower to synthesise (see DEFAULT_VOICES).
VOICES = [("flite", "kal16"), ("flite", "slt"), ("espeak-ng", "en-us"), ("espeak-ng", "en-gb+f2")]

ROWS = [
    {  # LLaVA, multi-turn, the image placeholder first
        "id": "multi",
        "image": "shape.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Is the shape on the left or the right?"},
            {"from": "gpt", "value": "Left."},
        ],
    },
    {  # LLaVA-Pretrain style: the placeholder after the text
        "id": "caption",
        "image": "00453/004539375.jpg",
        "conversations": [
            {"from": "human", "value": "Describe the picture in a few words.\n<image>"},
            {"from": "gpt", "value": "A red circle."},
        ],
    },
    {  # conversational, typed parts
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        ],
        "images": ["circle.png"],
    },
    {  # conversational, a string with a placeholder; a system turn is never spoken
        "messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "How many beeps are there?"},
            {"role": "assistant", "content": "Two."},
        ],
    },
    {  # a clip of its own, with no placeholder (row_messages puts it first): kept first
        "id": "own_audio",
        "audio": "beeps.wav",
        "conversations": [{"from": "human", "value": "Is the tone high or low?"}, {"from": "gpt", "value": "High."}],
    },
    {  # nothing to say: left out and counted
        "id": "silent",
        "image": "x.png",
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A square."}],
    },
]


def speak(tmp_path, name="out", **kwargs):
    rows = kwargs.pop("rows", ROWS)
    summary = tts.speak_rows(rows, tmp_path / name, **({"voices": VOICES, "seed": 0, "log": lambda _: None} | kwargs))
    lines = (tmp_path / name / "rows.jsonl").read_text().splitlines()
    return summary, [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tts")
    return (tmp / "out", *speak(tmp))


def test_rows_of_both_formats_are_spoken(spoken):
    out, summary, rows = spoken
    assert summary["rows_in"] == 6 and summary["rows_out"] == 5 and summary["skipped"] == {"nothing to say": 1}
    assert summary["clips"] == 6 and summary["synthesised"] == 6
    multi, caption, shape, beeps, own = rows
    assert multi["conversations"][0]["value"] == "<image>\n<audio>" and multi["conversations"][2]["value"] == "<audio>"
    assert multi["conversations"][1]["value"] == "Red." and multi["image"] == "shape.png"
    assert multi["transcripts"] == ["What color is the shape?", "Is the shape on the left or the right?"]
    assert caption["conversations"][0]["value"] == "<audio>\n<image>"  # the clip where the text stood
    assert shape["messages"][0]["content"] == [{"type": "image"}, {"type": "audio"}]
    assert shape["images"] == ["circle.png"]
    assert shape["transcripts"] == ["What shape is this?"] and "audio" not in shape  # the format's own key
    assert beeps["messages"][0] == ROWS[3]["messages"][0] and beeps["messages"][1]["content"] == "<audio>"
    assert own["conversations"][0]["value"] == "<audio>\n<audio>"
    assert own["audio"][0] == "beeps.wav" and own["transcripts"][0] is None and own["voices"][0] is None
    for row in rows:
        row_messages(row)  # placeholders and clips agree, as training checks them
        clips = [str(p) for p in row_media(row, "audio", None)]
        assert len(clips) == len(row["transcripts"]) == len(row["voices"])
        for clip, text, voice in zip(clips, row["transcripts"], row["voices"]):
            if text is None:
                continue
            assert (voice["engine"], voice["voice"]) in VOICES and 0.85 <= voice["rate"] <= 1.15
            assert 20 <= voice["snr_db"] <= 40 and voice["noise"] in ("white", "pink")
            info = sf.info(str(out / "audio" / clip))
            assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
            wave, _ = sf.read(str(out / "audio" / clip), dtype="float32")
            seconds = len(wave) / 16_000
            assert 0.5 < seconds < 0.5 * len(text.split()) + 1 and np.sqrt((wave**2).mean()) > 0.02


def test_same_seed_same_clips(spoken, tmp_path):
    out, _, rows = spoken
    _, again = speak(tmp_path, "again")
    assert [row["voices"] for row in again] == [row["voices"] for row in rows]
    for clip in rows[0]["audio"]:
        assert (tmp_path / "again" / "audio" / clip).read_bytes() == (out / "audio" / clip).read_bytes()
    _, other = speak(tmp_path, "other", seed=1)
    assert [row["voices"] for row in other] != [row["voices"] for row in rows]


@pytest.mark.slow  # whisper-base: ~10 s
def test_whisper_base_hears_the_questions(spoken):
    """The clips one after another, half a second apart, as one recording: whisper-base pads every
    input to 30 s, so one window for all of them costs what one clip would."""
    from transformers import pipeline

    from phi3mm.metrics import word_error_rate
    from phi3mm.real_parts import whisper_base_path

    out, _, rows = spoken
    clips = [(clip, text, voice) for row in rows for clip, text, voice in zip(row.get("audio") or row["audios"],
             row["transcripts"], row["voices"]) if text is not None]  # fmt: skip
    gap = np.zeros(8_000, np.float32)
    recording = np.concatenate(
        [part for clip, _, _ in clips for part in (sf.read(str(out / "audio" / clip), dtype="float32")[0], gap)]
    )
    assert len(recording) < 30 * 16_000
    asr = pipeline("automatic-speech-recognition", model=str(whisper_base_path()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy two-core box: 2 threads took 130 s here (spinning), 1 thread 20 s
    try:
        heard = asr(
            {"raw": recording, "sampling_rate": 16_000}, generate_kwargs={"language": "en", "task": "transcribe"}
        )
    finally:
        torch.set_num_threads(threads)
    heard = heard["text"]
    said = " ".join(text for _, text, _ in clips)
    wer = word_error_rate([heard], [said])
    for _, text, voice in clips:
        print(f"{voice['engine']}:{voice['voice']} rate {voice['rate']} pitch {voice['pitch']}", end=" ")
        print(f"{voice['noise']} noise {voice['snr_db']} dB | {text}")
    print(f"whisper-base heard: {heard.strip()}\nWER {wer:.1%} over {len(said.split())} words")
    assert wer <= 0.2, heard


def test_repeats_are_synthesised_once_and_asr_rows(tmp_path, monkeypatch):
    calls = []
    flite = tts.ENGINES["flite"]
    monkeypatch.setitem(tts.ENGINES, "flite", lambda *args: calls.append(args) or flite(*args))
    rows = [{"conversations": [{"from": "human", "value": "What shape is this?"}, {"from": "gpt", "value": "A circle."},
                               {"from": "human", "value": "And its color?"}, {"from": "gpt", "value": "Red."}]}] * 6  # fmt: skip
    summary, asr_rows = speak(
        tmp_path, voices=["flite:kal16"], rates=(1, 1), pitches=(1, 1), mode="asr", first_turn_only=True, rows=rows
    )
    assert summary["clips"] == 6 and summary["synthesised"] == 1
    assert len(calls) == 2  # the voice check's "test" and one synthesis
    assert asr_rows[0] == {"audio": "000/000000_0.wav", "text": "What shape is this?"} and len(asr_rows) == 6
    first, second = (sf.read(str(tmp_path / "out" / "audio" / row["audio"]))[0] for row in asr_rows[:2])
    assert len(first) == len(second) and not np.array_equal(first, second)  # one synthesis, its own noise each


def test_command_line_and_datasets_folder(tmp_path):
    import datasets
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8), "red").save(image)
    data = datasets.Dataset.from_dict({
        "image": [str(image)],
        "conversations": [[{"from": "human", "value": "-What color?\n<image>"}, {"from": "gpt", "value": "Red."}]],
    }).cast_column("image", datasets.Image())  # fmt: skip
    data.save_to_disk(str(tmp_path / "ds"))
    summary = tts.main(["--data_path", str(tmp_path / "ds"), "--out_dir", str(tmp_path / "cli"),
                        "--voices", "espeak-ng:en-gb", "--noise_db", "none", "--seed", "3"])  # fmt: skip
    (row,) = [json.loads(line) for line in (tmp_path / "cli" / "rows.jsonl").read_text().splitlines()]
    assert summary["clips"] == 1 and row["transcripts"] == ["-What color?"]  # a leading "-" is spoken, not an option
    assert row["conversations"][0]["value"] == "<audio>\n<image>" and row["voices"][0]["snr_db"] is None
    assert os.path.isabs(row["image"]) and Image.open(row["image"]).getpixel((0, 0)) == (255, 0, 0)


def test_missing_or_failing_engine_names_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither engine on the PATH
    with pytest.raises(RuntimeError, match="flite is not installed: apt-get install flite"):
        speak(tmp_path, voices=[("flite", "slt")])
    fake = tmp_path / "espeak-ng"  # lists a voice, then fails as a broken install would
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--voices" ]; then printf "Pty Language Age/Gender VoiceName File\\n 2 en-us --/M English gmw/en-US\\n"; exit 0; fi\n'
        'echo "espeak-ng: cannot open phoneme data" >&2; exit 3\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(RuntimeError, match=r"espeak-ng failed \(exit 3\): espeak-ng: cannot open phoneme data"):
        speak(tmp_path, voices=[("espeak-ng", "en-us")])


def test_unknown_voices_and_engines_are_value_errors(tmp_path):
    for voices, message in [
        ([("flite", "nosuch")], "unknown flite voice 'nosuch'"),
        ([("espeak-ng", "xx-nosuch")], "unknown espeak-ng voice 'xx-nosuch'"),
        ([("espeak-ng", "en-us+nosuch")], "unknown espeak-ng variant 'nosuch'"),
        ([("say", "Alex")], "unknown engine 'say'"),
        (["slt"], "write engine:voice"),
    ]:
        with pytest.raises(ValueError, match=message):
            speak(tmp_path, voices=voices)
    with pytest.raises(ValueError, match="rate must lie in"):
        speak(tmp_path, rates=(0.1, 1.0))
    with pytest.raises(ValueError, match="noise_db must be a"):
        speak(tmp_path, noise_db=(40, 20))
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_silence_before_and_after_the_speech(tmp_path):
    """silence_s pads each clip as a recording would, both ends drawn apart; the speech itself, its
    voice and its noise draws, stays as the same seed gives it without padding."""
    _, padded = speak(tmp_path, noise_db=None, silence_s=(0.3, 1.0))
    _, plain = speak(tmp_path, "plain", noise_db=None)
    ends = []
    for row, bare in zip(padded, plain):
        clips = [str(path) for path in row_media(row, "audio", None)]
        for clip, voice, text in zip(clips, row["voices"], row["transcripts"]):
            if text is None:
                continue
            before, after = voice["silence_s"]
            assert 0.3 <= before <= 1.0 and 0.3 <= after <= 1.0
            ends.append((before, after))
            wave, _ = sf.read(str(tmp_path / "out" / "audio" / clip), dtype="float32")
            speech, _ = sf.read(str(tmp_path / "plain" / "audio" / clip), dtype="float32")
            lead, tail = round(before * 16_000), round(after * 16_000)
            assert len(wave) == lead + len(speech) + tail and not wave[:lead].any() and not wave[len(wave) - tail:].any()
            assert np.array_equal(wave[lead : lead + len(speech)], speech)
    assert len(set(ends)) > 1 and any(before != after for before, after in ends)
    voices = lambda rows: [[v and (v["voice"], v["rate"], v["pitch"]) for v in row["voices"]] for row in rows]
    assert voices(padded) == voices(plain)
    with pytest.raises(ValueError, match="silence_s"):
        speak(tmp_path, "bad", silence_s=(-1.0, 0.5))


def test_noise_at_the_asked_snr():
    t = np.arange(32_000) / 16_000
    speech = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for kind in tts.NOISE_KINDS:
        noisy = tts.add_noise(speech, 20.0, kind, np.random.default_rng(0))
        snr = 10 * np.log10((speech**2).mean() / ((noisy - speech) ** 2).mean())
        assert noisy.dtype == np.float32 and abs(snr - 20.0) < 0.5, (kind, snr)
    assert tts.spoken_text("<image>\n  What is\tthis? <audio>") == "What is this?"


def test_speak_one_text():
    for engine in tts.ENGINES:
        wave = tts.speak("one two three", engine, rate=1.2, pitch=1.1)
        assert wave.dtype == np.float32 and wave.ndim == 1 and 0.5 < len(wave) / 16_000 < 3
    with pytest.raises(ValueError, match="engine must be one of"):
        tts.speak("hi", "say")
