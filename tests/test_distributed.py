"""FSDP2 and DeepSpeed ZeRO-3 training runs for real on two CPU processes (gloo), with the repository's
accelerate configs and the tiny model: the weights are sharded (the run summary counts DTensors /
ZeRO-partitioned parameters and the share each process holds), full fine-tuning ends with DDP's weights,
LoRA and QLoRA end in the usual merged `OUTPUT_DIR/model`, and what cannot run stops early, saying why.

Every run goes through `accelerate launch` as a user would start it:

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 train_trainer.py ... --use_cpu true
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes 2 --mixed_precision no \\
        train_trainer.py ... --model_name_or_path BASE --ddp_backend gloo
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phi3mm.demo_data import make_demo_dataset
from phi3mm.load_test import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]
# Three steps of 4 rows per process: enough to move every trained weight, short enough for CI.
STEPS = ["--per_device_train_batch_size", "4", "--learning_rate", "2e-3", "--max_steps", "3", "--logging_steps", "1",
         "--save_strategy", "no", "--lora_r", "8", "--lora_alpha", "16", "--bnb_compute_dtype", "float32"]  # fmt: skip
ZERO3_ON_CPU = ["--mixed_precision", "no"]  # accelerate flag: the config's bf16 needs a GPU
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo set (image rows and audio rows mixed), and `images.json`: its image rows alone."""
    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, n_train=32, n_eval=4)
    rows = json.loads((out / "train.json").read_text())
    (out / "images.json").write_text(json.dumps([row for row in rows if "image" in row]))
    return out


@pytest.fixture(scope="module")
def deepspeed_on_cpu():
    """DeepSpeed's CPU accelerator compiles a shared-memory op the first time a process group starts
    (1-4 minutes on 2 cores, then cached in ~/.cache/torch_extensions): built once here, so the runs
    below do not each wait for it inside their time limit."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pytest.fail("DeepSpeed is not installed: pip install --no-build-isolation deepspeed (configs/accelerate/README.md)")
    build = "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
    subprocess.run([sys.executable, "-c", build], env={**os.environ, "DS_ACCELERATOR": "cpu"}, check=True, timeout=900)


def launch(config: str, out: Path, *args, accelerate_args=(), timeout=300) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
        "--num_processes", "2", "--main_process_port", str(free_port()), *accelerate_args,
        str(ROOT / "train_trainer.py"), "--output_dir", str(out), *map(str, args), *QUIET,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=timeout)


def train(config: str, out: Path, *args, **kwargs) -> dict:
    done = launch(config, out, *args, **kwargs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    return summary


def data(demo: Path, rows: str = "train.json") -> list:
    return ["--data_path", demo / rows, "--image_folder", demo, "--audio_folder", demo]


def fsdp(demo, base, out, tuning, rows="train.json") -> dict:
    return train("fsdp.yaml", out, "--model_name_or_path", base, "--tuning", tuning, *data(demo, rows), *STEPS,
                 "--use_cpu", "true")  # fmt: skip


def zero3(demo, base, out, tuning, rows="images.json") -> dict:
    return train("deepspeed_zero3.yaml", out, "--model_name_or_path", base, "--tuning", tuning, *data(demo, rows),
                 *STEPS, "--ddp_backend", "gloo", accelerate_args=ZERO3_ON_CPU)  # fmt: skip


def assert_sharded(summary: dict, distributed_type: str) -> None:
    """Every parameter split over the two processes, each holding half of the elements (not DDP's copies)."""
    sharding = summary.get("sharding", {})
    assert sharding.get("distributed_type") == distributed_type, sharding
    assert sharding["sharded_parameters"] == sharding["parameters"] > 0, sharding
    assert abs(sharding["local_fraction"] - 0.5) < 0.01, sharding


def assert_loads_as_causal_lm(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    saved = load_file(model_dir / "model.safetensors")
    name = "lm_head.weight"
    assert torch.equal(model.state_dict()[name], saved[name])
    return saved


def assert_merged_like_the_sharded_model(summary: dict, out: Path, base: Path) -> None:
    """The merge check compares the merged model with the trained one as it ran, sharded over both processes."""
    merge = summary["merge"]
    assert merge["top1_agreement"] == 1.0 and merge["max_abs_logit_diff"] < 1e-4, merge
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged, original = assert_loads_as_causal_lm(out / "model"), load_file(base / "model.safetensors")
    name = "model.language_model.layers.0.self_attn.o_proj.weight"
    assert not torch.allclose(merged[name], original[name])  # the adapter went in


@pytest.fixture(scope="module")
def ddp_full(demo, base, tmp_path_factory) -> Path:
    """Full fine-tuning under plain DDP: the weights FSDP and ZeRO-3 must end with."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    summary = train("ddp.yaml", out, "--model_name_or_path", base, "--tuning", "full", *data(demo, "images.json"),
                    *STEPS, "--use_cpu", "true")  # fmt: skip
    assert summary["sharding"]["distributed_type"] == "MULTI_CPU" and summary["sharding"]["sharded_parameters"] == 0
    return out


def assert_same_weights_as_ddp(out: Path, ddp: Path, base: Path, atol: float) -> None:
    saved, reference = assert_loads_as_causal_lm(out / "model"), load_file(ddp / "model" / "model.safetensors")
    assert saved.keys() == reference.keys()
    worst = max((saved[k] - reference[k]).abs().max().item() for k in reference)
    original = load_file(base / "model.safetensors")
    moved = max((reference[k] - original[k]).abs().max().item() for k in reference)
    assert worst < atol < moved / 20, (worst, moved)  # equal to DDP's, far within how far training moved them


def test_fsdp_full_fine_tuning_shards_the_model_and_ends_with_ddps_weights(demo, base, ddp_full, tmp_path):
    summary = fsdp(demo, base, tmp_path / "fsdp", "full", rows="images.json")
    assert_sharded(summary, "FSDP")
    ddp = json.loads((ddp_full / "run_summary.json").read_text())
    assert summary["train_loss"] == pytest.approx(ddp["train_loss"], rel=1e-5)
    assert_same_weights_as_ddp(tmp_path / "fsdp", ddp_full, base, atol=1e-5)


def test_fsdp_lora_on_mixed_image_and_audio_batches_merges_like_the_sharded_model(demo, base, tmp_path):
    """Batches with audio on one process and none on the other: the towers sit in FSDP's root unit and
    the unused projector's gradient is reduce-scattered as zeros, so the collectives still pair up."""
    summary = fsdp(demo, base, tmp_path / "fsdp", "lora")
    assert_sharded(summary, "FSDP")
    assert summary["last_logged_loss"] < summary["first_logged_loss"]
    assert_merged_like_the_sharded_model(summary, tmp_path / "fsdp", base)


def test_fsdp_qlora_shards_the_4bit_weights_and_merges_them_dequantized(demo, base, tmp_path):
    """bnb_4bit_quant_storage = the compute dtype: accelerate leaves 4-bit weights stored as uint8 out of
    the shards (each process would hold them whole); stored as float32 here, they are sharded too."""
    summary = fsdp(demo, base, tmp_path / "fsdp", "qlora")
    assert_sharded(summary, "FSDP")
    assert summary["merge"]["dequantized_linears"] == 8  # 2 layers x 4 linears, merged into the NF4 weights
    assert_merged_like_the_sharded_model(summary, tmp_path / "fsdp", base)


def test_zero3_full_fine_tuning_partitions_the_model_and_ends_with_ddps_weights(demo, base, ddp_full, deepspeed_on_cpu, tmp_path):
    summary = zero3(demo, base, tmp_path / "zero3", "full")
    assert_sharded(summary, "DEEPSPEED")
    assert_same_weights_as_ddp(tmp_path / "zero3", ddp_full, base, atol=1e-4)


def test_zero3_lora_partitions_the_model_and_merges_like_it(demo, base, deepspeed_on_cpu, tmp_path):
    summary = zero3(demo, base, tmp_path / "zero3", "lora")
    assert_sharded(summary, "DEEPSPEED")
    assert summary["last_logged_loss"] < summary["first_logged_loss"]
    assert_merged_like_the_sharded_model(summary, tmp_path / "zero3", base)


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--model_name_or_path", "BASE", "--use_cpu", "true"],
                     "DeepSpeed does not run with --use_cpu true (accelerate turns it off): to run it on CPUs drop "
                     "--use_cpu and add --ddp_backend gloo", id="use_cpu"),
        pytest.param(["--model_name_or_path", "BASE"],
                     "not one distributed run (world size 1): add --ddp_backend gloo (not --use_cpu) to run DeepSpeed "
                     "on CPUs", id="no_gloo_backend"),
        pytest.param(["--tiny", "true", "--ddp_backend", "gloo"],
                     "one process cannot assemble the base alone: save it first (python -m phi3mm.build OUT",
                     id="assembling_the_base"),
        pytest.param(["--model_name_or_path", "BASE", "--ddp_backend", "gloo"],
                     "DeepSpeed ZeRO-3 runs only data sets whose rows all carry the same media", id="mixed_media"),
    ],
)  # fmt: skip
def test_zero3_refuses_what_cannot_run_before_training(demo, base, deepspeed_on_cpu, tmp_path, args, message):
    """What a user sees instead of a hang, DDP over partitioned weights, or a gloo size mismatch mid-run."""
    args = [str(base) if a == "BASE" else a for a in args]
    out = tmp_path / "zero3"
    done = launch("deepspeed_zero3.yaml", out, *args, "--tuning", "lora", *data(demo), *STEPS, accelerate_args=ZERO3_ON_CPU)
    assert done.returncode != 0
    assert done.stderr.count(message) >= 2, done.stderr[-5000:]  # both processes say why
    assert "'loss'" not in done.stdout and not (out / "run_summary.json").exists()
