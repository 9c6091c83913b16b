"""The demo end to end at its quick size: every stage runs through the library code, the report
holds every figure the README's table shows, and the spoken-question voices are split."""

import json
import re

import pytest
import torch

from phi3mm.demo import QUICK_WIDE, run_demo
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
    assert config["image_token_order"] == "columns"  # the default's LM reads the picture column by column


def test_quick_wide_demo_teaches_the_eyes_first_and_keeps_them_in_stage_2(tmp_path):
    from safetensors.torch import load_file

    # with its stage 2's first phase (the side, shape and negation questions alone, then the whole
    # mix from its model, the yes/no rows that name a colour twice)
    settings = QUICK_WIDE
    result = run_demo(tmp_path, seed=0, settings=settings)
    for renderer in ("generator", "independent"):
        assert set(result["eyes"][renderer]) == {"patches", "count", "colours", "kinds", "exact"}
    for name in ("held_out", "held_out_blank_media", "independent"):
        assert set(result[name]["by_type"]) == {"color", "shape", "position", "count", "exists", "negation", "pitch", "beeps"}

    def tower(folder):
        weights = load_file(next(folder.glob("*.safetensors")))
        return {k.split("vision_tower.")[1]: v for k, v in weights.items() if "vision_tower." in k}

    random_tower = {k.removeprefix("vision_model."): v for k, v in load_file(
        next((tmp_path / "components" / "vision").glob("*.safetensors"))).items() if k.startswith("vision_model.")}  # fmt: skip
    base, stage2 = tower(tmp_path / "base"), tower(tmp_path / "stage2" / "model")
    assert base.keys() == stage2.keys() and base.keys() <= random_tower.keys()
    assert any(not torch.equal(random_tower[k], base[k]) for k in base)  # the eyes stage trained the tower
    assert all(torch.equal(base[k], stage2[k]) for k in base)  # and stage 2 left it as it was
    assert json.loads((tmp_path / "model" / "config.json").read_text())["image_token_order"] == "columns"
    # so stages 1 and 2 read its features from the cache, each training and held-out picture computed once
    assert [c["computed"] for c in result["vision_cache"]] == [c["total"] for c in result["vision_cache"]]
    pictures = [len({row["image"] for row in json.loads((tmp_path / "data" / f"{split}.json").read_text()) if "image" in row})
                for split in ("train", "eval")]  # fmt: skip
    assert [c["total"] for c in result["vision_cache"]] == pictures and min(pictures) > 0
    train_rows = json.loads((tmp_path / "data" / "train.json").read_text())
    first_rows = [row for row in train_rows if row.get("question_type") in ("position", "shape", "negation")]
    assert json.loads((tmp_path / "data" / "train_first.json").read_text()) == first_rows
    assert result["stage2_first"]["rows"] == len(first_rows) > 0
    assert result["stage2_first"]["steps"] == -(-len(first_rows) // settings["batch_size"])  # one epoch
    colour = re.compile(r"\b(red|orange|yellow|green|blue|purple|black|gray)\b")
    again = [row for row in train_rows if row.get("question_type") in ("exists", "negation")
             and colour.search(row["conversations"][0]["value"])]  # fmt: skip
    assert 0 < len(again) < sum(row.get("question_type") in ("exists", "negation") for row in train_rows)
    assert json.loads((tmp_path / "data" / "train_mix.json").read_text()) == train_rows + again
    assert result["stage2_rows_twice"] == len(again)
    # then the whole mix, once over it
    assert result["stage2"]["steps"] == settings["stage2"]["epochs"] * -(-(len(train_rows) + len(again)) // settings["batch_size"])
    # the first phase trained the language model (the whole mix then starts from its model)
    first_model, stage1_model = (load_file(next((tmp_path / d / "model").glob("*.safetensors"))) for d in ("stage2_first", "stage1"))
    assert any(not torch.equal(first_model[k], stage1_model[k]) for k in first_model if "language_model" in k)
