"""The demo end to end at its quick size: every stage runs through the library code, the report
holds every figure the README's table shows, and the spoken-question voices are split."""

import json

import pytest

from phi3mm.demo import run_demo
from phi3mm.demo_data import HELD_OUT_VOICES


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, quick=True)


def test_quick_demo_reports_every_figure(report):
    out, result = report
    assert json.loads((out / "eval.json").read_text()) == result
    for name in ("held_out", "held_out_blank_media", "independent"):
        assert set(result[name]["by_type"]) == {"color", "shape", "position", "pitch", "beeps"}
        assert result[name]["skipped"] == 0
    spoken = result["spoken"]
    assert set(spoken["held_out_voices"]) <= set(HELD_OUT_VOICES)
    assert not set(spoken["held_out_voices"]) & set(spoken["train_voices"])
    for variant in ("distillation", "distillation_asr_only", "supervised"):
        assert spoken[variant]["spoken"]["n"] == spoken["typed"]["n"] == result["settings"]["spoken"]["n_eval"]
        assert spoken[variant]["audio_silenced"]["n"] == spoken["typed"]["n"]
        assert spoken[variant]["steps"] > 0
    # Whisper-base ran once per clip: the cache computed every clip, and the spoken clips joined it.
    assert result["audio_cache"]["computed"] == result["audio_cache"]["total"] > 0
    assert result["audio_cache"]["failed"] == 0
    asr, spoken_train = result["spoken_audio_cache"]  # the image + speech rows reuse the ASR rows' clips
    assert asr["computed"] == asr["total"] > 0 and asr["failed"] == 0
    assert spoken_train["reused"] == spoken_train["total"] > 0 and spoken_train["failed"] == 0
    # The published model is the one aligned by distillation.
    config = json.loads((out / "model" / "config.json").read_text())
    assert config == json.loads((out / "align_distillation" / "model" / "config.json").read_text())
    assert config["component_models"]["audio"].endswith("whisper_base")
