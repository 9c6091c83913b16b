"""train_trainer.py end to end on the tiny model: it learns, merges faithfully, survives bad rows,
resumes exactly, runs under 2-process DDP, and reads its arguments from one YAML file.

Runs go through `main(argv)` in this process (the DDP run through `accelerate launch`), on a
96-row demo set, so each takes seconds on a laptop CPU.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from phi3mm.data import LlavaDataset, MultimodalCollator, read_rows
from phi3mm.demo_data import make_demo_dataset
from phi3mm.load_test import free_port
from phi3mm.training import LORA_TARGETS
from train_trainer import main, parse_args

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls on one thread


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_data")
    make_demo_dataset(out, n_train=96, n_eval=8)
    return out


def data_args(folder: Path, data_path: Path | None = None) -> list[str]:
    data_path = data_path or folder / "train.json"
    return ["--data_path", str(data_path), "--image_folder", str(folder), "--audio_folder", str(folder)]


def qlora_args(base: Path, rank: int = 16) -> list[str]:
    return ["--model_name_or_path", str(base), "--stage", "finetune", "--tuning", "qlora", "--lora_r", str(rank),
            "--lora_alpha", str(2 * rank), "--bnb_compute_dtype", "float32"]


def run(*argv) -> dict:
    return main([str(a) for a in argv] + QUIET)


def test_qlora_run_learns_and_the_merged_model_matches_base_plus_adapter(demo, base, tmp_path):
    out = tmp_path / "run"
    summary = run(*qlora_args(base), *data_args(demo), "--output_dir", out, "--per_device_train_batch_size", 8,
                  "--learning_rate", 2e-3, "--num_train_epochs", 3, "--logging_steps", 2, "--save_strategy", "no")

    written = json.loads((out / "run_summary.json").read_text())
    assert written["steps"] == summary["steps"] == 3 * math.ceil(96 / 8)
    assert written["samples_per_second"] > 0 and written["peak_memory_mb"] > 0
    assert written["skipped_total"] == 0 and written["tuning"] == "qlora"
    # The answers are single words from a handful of classes: 36 steps take several nats off a
    # random LM's ~ln(vocab); one nat is a margin noise cannot make.
    assert written["last_logged_loss"] < written["first_logged_loss"] - 1.0, written
    assert Image.open(out / "loss.png").format == "PNG"

    # LoRA on all four fused Phi-3 linears of every layer; both projectors trained and saved in full.
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    n_layers = json.loads((base / "config.json").read_text())["text_config"]["num_hidden_layers"]
    for layer in range(n_layers):
        for target in LORA_TARGETS:
            block = "self_attn" if target in ("qkv_proj", "o_proj") else "mlp"
            stem = f"language_model.layers.{layer}.{block}.{target}"
            assert any(stem in k and "lora_A" in k for k in adapter), f"no LoRA on {stem}"
            assert any(stem in k and "lora_B" in k for k in adapter), f"no LoRA on {stem}"
    assert set(config["modules_to_save"]) == {"multi_modal_projector", "audio_projector"}
    for projector in ("multi_modal_projector", "audio_projector"):
        assert any(projector in k for k in adapter), f"{projector} not in the adapter"

    # The merge goes into the dequantized NF4 weights the adapter was trained against, so the
    # merged model gives the trained model's logits, not those of the original fp32 base + adapter.
    n_linears = n_layers * len(LORA_TARGETS)
    assert summary["merge"]["dequantized_linears"] == n_linears, summary["merge"]
    assert summary["merge"]["top1_agreement"] == 1.0, summary["merge"]
    assert summary["merge"]["max_abs_logit_diff"] < 1e-4, summary["merge"]

    # Independently of the script: merged (loaded as a Hub user would) vs a fresh 4-bit base + adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration
    from processing_multimodal import MultimodalProcessor
    from phi3mm.training import ModelArguments, quantization_config, use_compute_dtype_on_cpu

    merged = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True).eval()
    processor = MultimodalProcessor.from_pretrained(base, trust_remote_code=True)
    rows = read_rows(demo / "eval.json")
    dataset = LlavaDataset(rows, processor, demo, demo)
    batch = MultimodalCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    assert "pixel_values" in batch and "input_features" in batch
    batch.pop("labels")
    quantized = quantization_config(ModelArguments(bnb_compute_dtype="float32"))
    reference = Phi3ProjectorForConditionalGeneration.from_pretrained(base, quantization_config=quantized).eval()
    use_compute_dtype_on_cpu(reference)
    full_precision = Phi3ProjectorForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = reference(**batch).logits
        reference = PeftModel.from_pretrained(reference, out / "adapter").eval()
        expected, got = reference(**batch).logits, merged(**batch).logits
        original = PeftModel.from_pretrained(full_precision, out / "adapter").eval()(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (expected - got).abs()[mask].max().item() < 1e-4  # fp32 compute both: summation order only
    assert (expected - base_logits).abs()[mask].max().item() > 1e-2, "the adapter changed nothing"
    # ...and the quantization error is real: merging into the original weights would have moved the logits.
    assert (original - got).abs()[mask].max().item() > 1e-2


def test_broken_rows_are_skipped_counted_and_training_finishes(demo, tmp_path):
    rows = json.loads((demo / "train.json").read_text())[:50]
    image_rows = [r for r in rows if "image" in r]
    good = (demo / image_rows[0]["image"]).read_bytes()
    for i, r in enumerate(image_rows[1:3]):  # truncated downloads: found only when decoded
        r["image"] = f"images/corrupt_{i}.png"
        (demo / r["image"]).write_bytes(good[: len(good) // 3])
    for r in image_rows[3:5]:
        r["image"] = "images/not_there.png"
    next(r for r in rows if "audio" in r)["audio"] = "audio/not_there.wav"
    (tmp_path / "broken.json").write_text(json.dumps(rows))

    out = tmp_path / "run"
    summary = run("--tiny", "true", "--stage", "pretrain", *data_args(demo, tmp_path / "broken.json"),
                  "--output_dir", out, "--per_device_train_batch_size", 8, "--learning_rate", 1e-3,
                  "--num_train_epochs", 2, "--save_strategy", "no")
    assert summary["steps"] == 2 * math.ceil(45 / 8)  # the 3 missing files are dropped before training
    written = json.loads((out / "run_summary.json").read_text())
    # Each bad row counted once, though the corrupt ones are drawn every epoch.
    assert written["skipped_rows"] == {"missing image": 2, "missing audio": 1, "unreadable image": 2}
    assert written["skipped_total"] == 5 and (out / "model" / "model.safetensors").is_file()


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_resume_from_the_middle_checkpoint_ends_where_the_uninterrupted_run_does(demo, base, tmp_path):
    # LoRA dropout on, and a separate projector learning rate: RNG state and both optimizer groups matter.
    common = [*qlora_args(base, rank=8), *data_args(demo), "--per_device_train_batch_size", 4,
              "--learning_rate", 2e-3, "--projector_lr", 1e-3, "--lora_dropout", 0.1, "--max_steps", 12,
              "--save_strategy", "steps", "--save_steps", 6, "--logging_steps", 1, "--merge", "false", "--seed", 7]
    full = run(*common, "--output_dir", tmp_path / "full")
    middle = tmp_path / "full" / "checkpoint-6"
    resumed = run(*common, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", middle)

    final = adapter_weights(tmp_path / "full" / "adapter")
    assert any("multi_modal_projector" in k for k in final) and any("audio_projector" in k for k in final)
    assert max_difference(final, adapter_weights(middle)) > 1e-3  # the second half did train
    # Same CPU, same seed, same batches: the tolerance only absorbs float reordering.
    assert max_difference(final, adapter_weights(tmp_path / "resumed" / "adapter")) <= 1e-6
    assert resumed["steps"] == full["steps"] == 12
    assert resumed["last_logged_loss"] == pytest.approx(full["last_logged_loss"], abs=1e-5)

    # Controls: without the optimizer state, or without skipping the batches already seen, the
    # resumed run ends elsewhere, so the comparison above can tell.
    no_optimizer = tmp_path / "no_optimizer"
    shutil.copytree(middle, no_optimizer)
    (no_optimizer / "optimizer.pt").unlink()
    run(*common, "--output_dir", tmp_path / "control1", "--resume_from_checkpoint", no_optimizer)
    assert max_difference(final, adapter_weights(tmp_path / "control1" / "adapter")) > 1e-4
    run(*common, "--output_dir", tmp_path / "control2", "--resume_from_checkpoint", middle,
        "--ignore_data_skip", "true")
    assert max_difference(final, adapter_weights(tmp_path / "control2" / "adapter")) > 1e-4



@pytest.mark.slow
def test_two_process_ddp_on_cpu_with_the_accelerate_config(demo, tmp_path):
    out = tmp_path / "ddp"
    # --tiny without a checkpoint: rank 0 assembles and saves the base while rank 1 waits for it.
    qlora = ["--tiny", "true", "--stage", "finetune", "--tuning", "qlora", "--lora_r", "8", "--lora_alpha", "16",
             "--bnb_compute_dtype", "float32"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/ddp.yaml"),
        "--num_processes", "2", "--main_process_port", str(free_port()), str(ROOT / "train_trainer.py"),
        *qlora, *data_args(demo), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--learning_rate", "2e-3", "--max_steps", "4", "--logging_steps", "1", "--save_strategy", "no",
        "--use_cpu", "true", *QUIET,  # on CPU accelerate goes multi-process (gloo) only when told
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["merge"]["top1_agreement"] == 1.0, summary["merge"]  # merged into the dequantized base
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in done.stderr + done.stdout


def test_a_process_leaves_its_gloo_group_before_it_exits():
    """Each process of a distributed run unregisters its group at the end of train()."""
    from phi3mm.training import leave_process_group

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    torch.distributed.all_reduce(torch.ones(2))
    leave_process_group()
    assert not torch.distributed.is_initialized()
    leave_process_group()  # outside a distributed run: nothing to do


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_worker_process_ends_without_teardown_and_loses_no_output(rank, tmp_path):
    """A distributed run's other processes skip the interpreter's teardown, where gloo's live
    threads made one abort now and then (SIGABRT in CI), and lose nothing they printed or logged on
    the way out; the main process exits as usual."""
    script = (
        "import atexit, logging, sys\n"
        "from phi3mm.training import end_worker_process\n"
        f"logging.basicConfig(filename={str(tmp_path / 'log.txt')!r}, level=logging.INFO)\n"
        "atexit.register(lambda: print('teardown ran', flush=True))\n"
        "print('printed before'); sys.stderr.write('stderr before'); logging.info('logged before')\n"
        "end_worker_process()\n"
        "print('after')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as under torchrun
    env.update(PYTHONPATH=str(ROOT), WORLD_SIZE="2", RANK=rank)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # stdout to a pipe is block-buffered: lost without the flush; stderr and the log file write through.
    assert "printed before" in done.stdout and "stderr before" in done.stderr
    assert "logged before" in (tmp_path / "log.txt").read_text()
    worker = rank != "0"
    assert ("after" in done.stdout) != worker
    assert ("teardown ran" in done.stdout) != worker


@pytest.mark.slow
def test_two_processes_launched_without_use_cpu_are_refused(demo, tmp_path):
    """torchrun on a machine without GPUs and without --use_cpu: accelerate starts no process group,
    so each process would train its own copy into the same folder. Both must stop, saying why."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "train_trainer.py"), "--tiny", "true", "--stage", "pretrain", *data_args(demo),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--report_to", "none",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.count("add --use_cpu true") >= 2, result.stderr[-3000:]
    assert not (tmp_path / "out" / "run_summary.json").exists()


def test_arguments_from_one_yaml_file_and_flags_over_it(tmp_path):
    config = tmp_path / "stage.yaml"
    config.write_text(
        "tiny: true\nstage: pretrain\ndata_path: data/train.json\nimage_folder: data\n"
        f"output_dir: {tmp_path / 'out'}\nlearning_rate: 0.001\nper_device_train_batch_size: 8\n"
        "lr_scheduler_type: cosine\nreport_to: none\nmax_length: 512\n"
    )
    model_args, data, training = parse_args([str(config)])
    assert (model_args.tiny, model_args.stage) == (True, "pretrain")
    assert (data.data_path, data.max_length) == ("data/train.json", 512)
    assert (training.learning_rate, training.per_device_train_batch_size) == (1e-3, 8)
    assert training.lr_scheduler_type == "cosine"

    flags = ["--learning_rate", "2e-4", "--stage", "finetune", "--tuning", "lora"]
    model_args, data, training = parse_args([str(config), *flags])
    assert (model_args.stage, model_args.tuning, training.learning_rate) == ("finetune", "lora", 2e-4)
    assert data.data_path == "data/train.json"  # the rest still comes from the file
    assert (training.per_device_train_batch_size, training.lr_scheduler_type) == (8, "cosine")

    with pytest.raises(ValueError, match=r"--stage must be one of \('pretrain', 'finetune', 'audio_align'\), got 'align'"):
        parse_args([str(config), "--stage", "align"])
    with pytest.raises(ValueError, match=r"--tuning must be qlora, lora or full, got 'qlora4'"):
        parse_args(["--data_path", "x.json", "--tuning", "qlora4"])
    config.write_text("stage: pretrain\n")
    with pytest.raises(SystemExit):
        parse_args([str(config)])  # no data_path: argparse's usage error, not a crash later


def test_llava_instruct_rows_train_without_skipping(tmp_path):
    """llava_instruct_150k.json as it comes: COCO ids, JPEGs, multi-turn, <image> before or after, text-only rows."""
    images = tmp_path / "coco" / "train2017"
    images.mkdir(parents=True)
    colors = [(200, 30, 30), (30, 160, 40), (40, 60, 220), (230, 200, 10)]
    rows = []
    for i, color in enumerate(colors * 2):
        image_id = f"{33471 + 97 * i:012d}"
        picture = Image.new("RGB", (96 + 8 * i, 72), (255, 255, 255))
        picture.paste(color, (10, 10, 50, 50))
        picture.save(images / f"{image_id}.jpg", quality=85)
        first = "What are the colors of the bus in the image?"
        rows.append({"id": image_id, "image": f"{image_id}.jpg", "conversations": [
            {"from": "human", "value": f"{first}\n<image>" if i == 1 else f"<image>\n{first}"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ]})  # fmt: skip
    rows.append({"id": "text_only_1", "conversations": [
        {"from": "human", "value": "Hello, how are you today?"},
        {"from": "gpt", "value": "I am fine, thank you."},
    ]})  # fmt: skip
    (tmp_path / "llava_instruct.json").write_text(json.dumps(rows, indent=2))

    out = tmp_path / "run"
    summary = run("--tiny", "true", "--stage", "pretrain", "--data_path", tmp_path / "llava_instruct.json",
                  "--image_folder", images, "--output_dir", out, "--per_device_train_batch_size", 3,
                  "--learning_rate", 1e-3, "--num_train_epochs", 1, "--save_strategy", "no")
    assert summary["rows"] == len(rows) == 9 and summary["skipped_total"] == 0
    assert summary["steps"] == 3 and math.isfinite(summary["train_loss"])
    assert (out / "base" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()


# --- accelerate configs: parsed the way `accelerate launch` parses them (no GPUs needed) ------------


def launch_args(name: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(ROOT / "configs/accelerate" / name), "train_trainer.py"])
    return _validate_launch_command(args)[0]


def test_accelerate_ddp_and_deepspeed_configs_parse():
    ddp = launch_args("ddp.yaml")
    assert ddp.multi_gpu and not ddp.use_fsdp and not ddp.use_deepspeed
    zero3 = launch_args("deepspeed_zero3.yaml")
    assert zero3.use_deepspeed and zero3.zero_stage == 3 and zero3.zero3_init_flag and zero3.zero3_save_16bit_model


def test_accelerate_fsdp2_config_wraps_the_language_model_layers_only(tiny, monkeypatch):
    """The towers run only for batches with their media, so they stay in the root unit (configs/accelerate/fsdp.yaml)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    for key, value in prepare_multi_gpu_env(launch_args("fsdp.yaml")).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    plugin.set_auto_wrap_policy(tiny[0])  # raises if a class name is not in the model
    wrapped = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
    assert wrapped == {"Phi3DecoderLayer"}
    assert wrapped <= {type(m).__name__ for m in tiny[0].modules()}


def test_merge_dequantizes_weights_bitsandbytes_repacked_for_cpu_inference(base, demo):
    """After an eval-mode forward, bitsandbytes may keep a CPU-only packed layout; the merge must still read it."""
    from transformers import TrainingArguments

    from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration
    from processing_multimodal import MultimodalProcessor
    from phi3mm.training import ModelArguments, copy_dequantized_weights, prepare_for_training, quantization_config

    args = ModelArguments(model_name_or_path=str(base), stage="finetune", tuning="qlora", bnb_compute_dtype="float32")
    quantized = Phi3ProjectorForConditionalGeneration.from_pretrained(base, quantization_config=quantization_config(args))
    processor = MultimodalProcessor.from_pretrained(base, trust_remote_code=True)
    rows = read_rows(demo / "eval.json")
    rows = [r for r in rows if "image" in r][:2] + [r for r in rows if "audio" in r][:2]  # both towers run
    dataset = LlavaDataset(rows, processor, demo, demo)
    batch = MultimodalCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    batch.pop("labels")
    reference = Phi3ProjectorForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in reference.state_dict().items()}
    before = copy_dequantized_weights(reference, quantized)
    weights = {k: v.clone() for k, v in reference.state_dict().items()}

    model = prepare_for_training(quantized, args, TrainingArguments(output_dir="unused", report_to="none")).eval()
    with torch.no_grad():
        model(**batch)  # may repack the 4-bit weights for bitsandbytes' bf16 CPU kernel
    assert copy_dequantized_weights(reference, model) == before > 0
    # The packed layout keeps absmax in bf16, so the round trip is close (bf16 rounding of the
    # scale), not bit-exact; the NF4 error it must not be confused with is far larger.
    round_trip = max((v - weights[k]).abs().max().item() for k, v in reference.state_dict().items())
    nf4_error = max((weights[k] - original[k]).abs().max().item() for k in weights)
    assert round_trip < nf4_error / 5, (round_trip, nf4_error)


def test_a_qlora_run_keeps_its_4bit_layers_off_the_bf16_cpu_kernel(base, tmp_path, monkeypatch):
    """On a CPU with AVX512-BF16 (the check is patched to say so), bitsandbytes would repack the 4-bit
    weights at the first eval-mode forward; under FSDP that broke the sharded merge check. The loader
    switches it off for the whole run."""
    import bitsandbytes.nn.modules

    from phi3mm.training import ModelArguments, load_base, quantized_linears

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    args = ModelArguments(model_name_or_path=str(base), stage="finetune", tuning="qlora", bnb_compute_dtype="float32")
    model, _, _ = load_base(args, tmp_path)
    linears = quantized_linears(model)
    assert linears and not any(module.support_avx512bf16_for_cpu for _, module in linears)


@pytest.mark.parametrize("stage, tuning", [("finetune", "qlora"), ("finetune", "full"), ("pretrain", "qlora")])
def test_every_trainable_parameter_gets_a_gradient_when_the_vision_tower_trains(base, demo, stage, tuning):
    """DDP (without find_unused_parameters) fails on a trainable parameter that gets no gradient:
    the tower's last layer and post-layernorm feed no feature, so they must stay frozen."""
    from transformers import TrainingArguments

    from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration
    from processing_multimodal import MultimodalProcessor
    from phi3mm.training import ModelArguments, prepare_for_training, quantization_config

    args = ModelArguments(model_name_or_path=str(base), stage=stage, tuning=tuning, bnb_compute_dtype="float32",
                          train_vision_tower=True, train_audio_tower=True)  # fmt: skip
    quantize = stage == "finetune" and tuning == "qlora"
    model = Phi3ProjectorForConditionalGeneration.from_pretrained(
        base, quantization_config=quantization_config(args) if quantize else None, dtype=torch.float32)
    model = prepare_for_training(model, args, TrainingArguments(output_dir="unused", report_to="none"))
    processor = MultimodalProcessor.from_pretrained(base, trust_remote_code=True)
    rows = read_rows(demo / "eval.json")
    rows = [r for r in rows if "image" in r][:2] + [r for r in rows if "audio" in r][:2]  # both towers run
    dataset = LlavaDataset(rows, processor, demo, demo)
    batch = MultimodalCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    model(**batch).loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any("vision_tower" in name and "layers.0." in name for name in trainable)
    assert [name for name, p in trainable.items() if p.grad is None] == []


def test_eval_loss_during_training_keeps_the_best_adapter_and_a_resume_reports_the_whole_run(demo, base, tmp_path):
    out = tmp_path / "eval"
    common = [*qlora_args(base, rank=8), *data_args(demo), "--eval_data_path", demo / "eval.json", "--output_dir", out,
              "--learning_rate", "2e-3", "--per_device_train_batch_size", "4", "--logging_steps", "1",
              "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
              "--load_best_model_at_end", "true", "--max_eval_samples", "8", "--merge", "false"]  # fmt: skip
    first = run(*common, "--max_steps", "4")
    assert [step for step, _ in first["eval_losses"]] == [2, 4]
    best_step = min(first["eval_losses"], key=lambda pair: pair[1])[0]
    assert first["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    best = load_file(out / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(best[k], saved[k]) for k in best), "the adapter saved at the end is the best one"

    # Resumed from step 2 to step 6: the summary and the plot cover steps 1-6, not only 3-6.
    resumed = run(*common, "--max_steps", "6", "--resume_from_checkpoint", out / "checkpoint-2")
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert [step for step, _ in resumed["eval_losses"]] == [2, 4, 6]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["first_logged_loss"] == first["first_logged_loss"]


def test_model_card_metadata_is_true_to_the_run():
    from phi3mm.model_card import card_metadata, render_model_card

    components = {"text": "microsoft/Phi-3.5-mini-instruct", "vision": "openai/clip-vit-large-patch14-336",
                  "audio": "openai/whisper-small"}
    summary = {"stage": "finetune", "tuning": "qlora", "steps": 10, "rows": 5, "skipped_total": 0}
    metadata = card_metadata(summary, components, ["data/llava_instruct_150k.json"])
    assert metadata["base_model"] == list(components.values())
    assert metadata["license"] == "other" and metadata["license_name"] == "apache-2.0 and mit"
    assert metadata["datasets"] == ["liuhaotian/LLaVA-Instruct-150K"] and "qlora" in metadata["tags"]
    pretrain = card_metadata({**summary, "stage": "pretrain", "tuning": "projectors"}, components, [])
    assert not {"qlora", "lora", "peft"} & set(pretrain["tags"]) and "datasets" not in pretrain
    card = render_model_card(summary, components, [], {"learning rate": 2e-4}, "me/phi3mm")
    assert 'repo = "me/phi3mm"' in card and "REPO" not in card and "COMMIT" not in card
    assert "images=[" in card and "audio=[" in card and "## Limitations" in card
    assert "speech_aligned" not in card
    aligned = render_model_card({**summary, "stage": "audio_align", "tuning": "audio projector"}, components, [], {}, "me/x")
    assert "`speech_aligned: true` in config.json" in aligned


def test_image_token_pooling_flag_changes_a_composite_checkpoint_for_the_run_and_the_saved_model(demo, base, tmp_path):
    from transformers import AutoProcessor

    out = tmp_path / "pooled"
    seen = []
    from modeling_phi3_projector import Phi3ProjectorModel

    original = Phi3ProjectorModel.get_image_features

    def spy(self, pixel_values=None, vision_features=None):
        features = original(self, pixel_values, vision_features)
        seen.append(features.shape[1])
        return features

    Phi3ProjectorModel.get_image_features = spy
    try:
        run(*qlora_args(base, rank=8), *data_args(demo), "--output_dir", out, "--image_token_pooling", "2",
            "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_strategy", "no")  # fmt: skip
    finally:
        Phi3ProjectorModel.get_image_features = original
    assert seen and set(seen) == {4}  # 16 tiny patches pooled 2x2 while training
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["image_token_pooling"] == 2
    assert AutoProcessor.from_pretrained(out / "model", trust_remote_code=True).image_seq_length == 4
    assert json.loads((out / "model" / "processor_config.json").read_text())["image_seq_length"] == 4
    with pytest.raises(ValueError, match="image_token_pooling"):  # 5 is more than the 4 x 4 grid's side
        run(*qlora_args(base, rank=8), *data_args(demo), "--output_dir", tmp_path / "bad", "--image_token_pooling", "5",
            "--max_steps", "1")  # fmt: skip


@pytest.mark.parametrize("name", ["pretrain.yaml", "finetune.yaml", "audio_align.yaml"])
def test_the_recipe_files_parse(name):
    model_args, data, training = parse_args([str(ROOT / "configs" / name), "--bf16", "false"])
    assert model_args.stage == name.removesuffix(".yaml") and data.data_path and training.learning_rate > 0
