"""The training library: arguments, base loading, quantization, LoRA and freezing, the Trainer,
resume checks, the merge into dequantized NF4 weights, and the run's summary, loss plot and card.

`train(model_args, data_args, training_args)` runs one stage end to end; `train_trainer.py` (the
command), `phi3mm.demo` and `phi3mm.bench` call it and the pieces below. The argument dataclasses
live here, as TRL keeps `SFTConfig` in its library, so the command imports the library and never
the other way round.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import BitsAndBytesConfig, Trainer, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import set_seed
from transformers.training_args import ParallelMode

from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration
from phi3mm.build import build_model_and_processor, build_tiny_model, save_checkpoint
from phi3mm.data import DECODE_REASONS, LlavaDataset, MultimodalCollator, read_rows, row_media
from processing_multimodal import MultimodalProcessor

logger = logging.getLogger(__name__)

PROJECTORS = ("multi_modal_projector", "audio_projector")
STAGES = ("pretrain", "finetune", "audio_align")
AUDIO_LORA_TARGETS = r"model\.audio_tower\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)"
LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3's fused linears: not q_proj/k_proj/...


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A composite checkpoint (hub id or folder)."})
    text_model: str = field(default="microsoft/Phi-3.5-mini-instruct", metadata={"help": "Phi-3 LM, when no composite."})
    vision_model: str = field(default="openai/clip-vit-large-patch14-336", metadata={"help": "CLIP checkpoint."})
    audio_model: str | None = field(default="openai/whisper-small", metadata={"help": "Whisper checkpoint; 'none' for no audio."})
    tiny: bool = field(default=False, metadata={"help": "Build tiny random components offline (the demo, tests)."})
    tiny_hidden_size: int = field(default=64, metadata={"help": "Width of the tiny language model."})
    tiny_audio_window_seconds: int = field(default=30, metadata={"help": "Window of the tiny Whisper (30 as the real one)."})
    tiny_tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer of the tiny LM (folder or hub id; default: a small byte-level one). `real` takes Phi-3.5's from phi3mm.real_parts."})
    image_token_pooling: int | None = field(default=None, metadata={"help": "2 pools 576 image tokens to 144 (default: the checkpoint's, 1 for a new model); changes a composite checkpoint's setting for the run and the saved model."})
    audio_stack_factor: int = field(default=5, metadata={"help": "Encoder frames per audio token (50 / k tokens per second)."})
    stage: str = field(default="finetune", metadata={"help": "'pretrain': projectors only, LM frozen; 'finetune': LM adapter + projectors; 'audio_align': the audio projector by distillation from the text path (phi3mm.align)."})
    tuning: str = field(default="qlora", metadata={"help": "How the LM is tuned in 'finetune': qlora | lora | full (in 'audio_align' the LM stays frozen; qlora keeps it in 4 bits)."})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank (LLaVA-1.5 uses 128)."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha (LLaVA-1.5 uses 256)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    bnb_compute_dtype: str = field(default="bfloat16", metadata={"help": "Compute dtype of the 4-bit layers."})
    projector_lr: float | None = field(default=None, metadata={"help": "Projector learning rate (default: the main one)."})
    train_vision_tower: bool = field(default=False, metadata={"help": "Also train the CLIP tower (kept frozen by default)."})
    train_audio_tower: bool = field(default=False, metadata={"help": "Also train the Whisper encoder."})
    audio_lora_r: int = field(default=0, metadata={"help": "'audio_align': LoRA of this rank on the Whisper encoder (0: none)."})
    merge: bool = field(default=True, metadata={"help": "Merge LoRA into a full-precision copy at the end."})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {STAGES}, got {self.stage!r}")
        if self.tuning not in ("qlora", "lora", "full"):
            raise ValueError(f"--tuning must be qlora, lora or full, got {self.tuning!r}")
        if self.audio_model in ("none", ""):
            self.audio_model = None


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA-format JSON / JSON Lines, or a saved datasets folder."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the rows' image paths are relative to."})
    audio_folder: str | None = field(default=None, metadata={"help": "Folder the rows' audio paths are relative to."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Held-out rows: eval loss during training (with --eval_strategy), accuracy at the end."})
    max_length: int = field(default=2048, metadata={"help": "Longest sequence; whole turns are dropped to fit."})
    strict: bool = field(default=False, metadata={"help": "A bad row stops the run instead of being skipped."})
    vision_cache_dir: str | None = field(default=None, metadata={"help": "Precomputed vision features (phi3mm.vision_cache)."})
    audio_cache_dir: str | None = field(default=None, metadata={"help": "Precomputed Whisper encoder output (phi3mm.audio_cache)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many rows."})
    audio_column: str = field(default="audio", metadata={"help": "'audio_align': the ASR rows' audio column."})
    text_column: str = field(default="text", metadata={"help": "'audio_align': the ASR rows' transcript column."})
    align_loss: str = field(default="kl", metadata={"help": "'audio_align': kl (distillation from the text path) or ce (transcription)."})
    align_temperature: float = field(default=1.0, metadata={"help": "'audio_align': softmax temperature of the KL loss."})
    rehearsal_data_path: str | None = field(default=None, metadata={"help": "'audio_align': rows the model already answers through its ears (e.g. sound questions), trained with cross-entropy beside the alignment rows so it keeps them (phi3mm.align)."})


def quantization_config(model_args: ModelArguments) -> BitsAndBytesConfig:
    """NF4 with double quantization; the towers, projectors and head stay in full precision."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, model_args.bnb_compute_dtype),
        # The dtype of the tensors the 4-bit weights are packed into (uint8 by default). FSDP shards float tensors
        # only: accelerate leaves uint8 ones whole on every process. Stored in the compute dtype, as PEFT's
        # FSDP-QLoRA guide does, they are sharded like the rest (configs/accelerate/README.md).
        bnb_4bit_quant_storage=getattr(torch, model_args.bnb_compute_dtype),
        # Matched from the start of the module name (transformers 5), hence the "model." prefix.
        llm_int8_skip_modules=[f"model.{name}" for name in ("vision_tower", "audio_tower", *PROJECTORS)] + ["lm_head"],
    )


def real_part(name: str | None, part: str) -> str | None:
    """`real` is the part (`phi35_tokenizer`, `whisper_base`) `phi3mm.real_parts` writes, fetched if missing."""
    if name == "real":
        from phi3mm.real_parts import ensure_real_parts

        return str(ensure_real_parts(None, (part,), log=lambda _: None)[part])
    return name


def load_base(model_args: ModelArguments, output_dir: Path):
    """(model, processor, base folder): the composite checkpoint, or one assembled from components.

    An assembled model is saved to `output_dir/base` first, because QLoRA and the final merge both
    load the base from a folder (4-bit for training, full precision for merging).
    """
    if model_args.model_name_or_path:
        base = model_args.model_name_or_path
    else:
        base = output_dir / "base"
        if not (base / "config.json").is_file():
            if model_args.tiny:
                model, processor = build_tiny_model(
                    output_dir / "components",
                    hidden_size=model_args.tiny_hidden_size,
                    audio_window_seconds=model_args.tiny_audio_window_seconds,
                    tokenizer=real_part(model_args.tiny_tokenizer, "phi35_tokenizer"),
                    image_token_pooling=model_args.image_token_pooling or 1,
                    audio_stack_factor=model_args.audio_stack_factor,
                    with_audio=model_args.audio_model is not None,
                )
            else:
                model, processor = build_model_and_processor(
                    model_args.text_model,
                    model_args.vision_model,
                    model_args.audio_model,
                    image_token_pooling=model_args.image_token_pooling or 1,
                    audio_stack_factor=model_args.audio_stack_factor,
                )
            # Written aside and renamed when whole: a run killed mid-write must not leave a `base`
            # with a config.json that the next run would take for a finished one.
            partial = output_dir / "base.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(base, ignore_errors=True)
            save_checkpoint(model, processor, partial)
            os.replace(partial, base)
    quantize = model_args.stage in ("finetune", "audio_align") and model_args.tuning == "qlora"
    model = Phi3ProjectorForConditionalGeneration.from_pretrained(
        base, quantization_config=quantization_config(model_args) if quantize else None, dtype=torch.float32,
        use_safetensors=True,  # never unpickle weights: a pytorch_model.bin can run code as it loads
    )
    if quantize:
        # For the whole run: its evaluations and the merge check then see what training computed.
        use_compute_dtype_on_cpu(model)
    # The code is this repository's own; trust_remote_code only keeps the sub-processor loaders
    # from asking about the auto_map in the folder's config.
    processor = MultimodalProcessor.from_pretrained(base, trust_remote_code=True)
    pooling = model_args.image_token_pooling
    if pooling is not None and pooling != model.config.image_token_pooling:
        # Pooling changes no weight: the run (and the model it saves) pools with the new factor,
        # and the processor expands <image> to the matching number of tokens.
        changed = model.config.to_dict() | {"image_token_pooling": pooling}
        type(model.config).from_dict(changed)  # validates: the factor must divide the patch grid
        model.config.image_token_pooling = pooling
        processor.follow_config(model.config)
    return model, processor, str(base)


def prepare_for_training(model, model_args: ModelArguments, training_args: TrainingArguments):
    """Freeze and unfreeze per stage, add LoRA where asked; returns the model to train."""
    model.requires_grad_(False)
    if model_args.stage == "audio_align":
        return prepare_for_audio_alignment(model, model_args, training_args)
    if model_args.stage == "finetune" and model_args.tuning in ("qlora", "lora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if model_args.tuning == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(training_args.activation_checkpointing)
            )
        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(LORA_TARGETS)})",
            modules_to_save=trained_in_full(model, model_args),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        check_lora_coverage(model)
    else:  # with LoRA, PEFT trains (and saves) its modules_to_save copies itself
        if model_args.stage == "finetune":  # full fine-tuning of the LM
            model.model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
        for name in trained_in_full(model, model_args):
            getattr(model.model, name).requires_grad_(True)
    # Tower parts no feature depends on would get no gradient, which DDP rejects. (The benchmark
    # also prepares transformers' LLaVA here, which has no such list.)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in getattr(base.model, "unused_vision_modules", list)():
        module.requires_grad_(False)
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(full_numel(p) for p in model.parameters())
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return model


def prepare_for_audio_alignment(model, model_args: ModelArguments, training_args: TrainingArguments):
    """The audio projector trains (and LoRA on the Whisper encoder, or the encoder in full, when
    asked); the language model and the vision side stay frozen, so the teacher is the LM as it is."""
    if model.model.audio_tower is None:
        raise ValueError("--stage audio_align needs a model with an audio tower; this one has none (config.audio_config is None)")
    if model_args.tuning == "qlora":
        if model_args.audio_lora_r <= 0:
            raise ValueError(
                "--stage audio_align with --tuning qlora keeps the language model in 4 bits, and Trainer trains a 4-bit "
                "model only through adapters: add --audio_lora_r 8 (LoRA on the Whisper encoder, the projector in full), "
                "or use --tuning full (the language model stays frozen either way)"
            )
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(training_args.activation_checkpointing))
        model.requires_grad_(False)
    if model_args.audio_lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=model_args.audio_lora_r, lora_alpha=2 * model_args.audio_lora_r, lora_dropout=model_args.lora_dropout,
                          target_modules=AUDIO_LORA_TARGETS, modules_to_save=["audio_projector"])  # fmt: skip
        model = get_peft_model(model, lora)
    else:
        model.model.audio_projector.requires_grad_(True)
        if model_args.train_audio_tower:
            model.model.audio_tower.requires_grad_(True)
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    print(f"trainable params: {trainable:,} || all params: {sum(full_numel(p) for p in model.parameters()):,}")
    return model


def full_numel(param: torch.nn.Parameter) -> int:
    """Elements of the whole parameter (ZeRO-3 leaves only a partition, often empty, in `param`)."""
    return getattr(param, "ds_numel", param.numel())


def save_aligned(trained, base: str, processor, out_dir: Path, dtype) -> None:
    """The base in full precision with the trained audio tower and projector: the language model did
    not train, so its original weights are the right ones (not the 4-bit copy the run held)."""
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()
    full = Phi3ProjectorForConditionalGeneration.from_pretrained(base, dtype=dtype, use_safetensors=True)
    for name in ("audio_tower", "audio_projector"):
        getattr(full.model, name).load_state_dict(getattr(trained.model, name).state_dict())
    full.config.speech_aligned = True  # the chat app sends spoken questions to the model's own ears
    save_checkpoint(full, processor, out_dir)


def trained_in_full(model, model_args: ModelArguments) -> list[str]:
    """Submodules of `model.model` trained in full: the projectors, and the towers when asked."""
    names = list(PROJECTORS)
    names += ["vision_tower"] if model_args.train_vision_tower else []
    names += ["audio_tower"] if model_args.train_audio_tower else []
    return [name for name in names if getattr(model.model, name, None) is not None]


def check_lora_coverage(model) -> None:
    """Every layer's four Phi-3 linears carry LoRA: a misnamed target would silently train nothing."""
    n_layers = model.base_model.model.config.text_config.num_hidden_layers
    for target in LORA_TARGETS:
        hits = [n for n, _ in model.named_modules() if n.endswith(f".{target}.lora_A")]
        if len(hits) != n_layers:
            raise ValueError(f"LoRA reached {len(hits)} of {n_layers} '{target}' layers")


def checkpoint_is_complete(folder: str | os.PathLike) -> bool:
    """Whether `checkpoint-N` was written to the end.

    Trainer writes a checkpoint file by file (weights, optimizer, scheduler, RNG state) and
    `trainer_state.json` last, and removes older checkpoints only after that: a folder whose state
    file reads back with its own step is whole; a run killed mid-save leaves one that is not.
    """
    folder = Path(folder)
    step = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return step is not None and state.get("global_step") == int(step.group(1))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir` (transformers' get_last_checkpoint takes
    the newest folder, whole or not); None when there is none."""
    folders = [f for f in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", f.name) and f.is_dir()]
    for folder in sorted(folders, key=lambda f: int(f.name.split("-")[1]), reverse=True):
        if checkpoint_is_complete(folder):
            return str(folder)
        logger.warning("skipping %s: incomplete, the run stopped while writing it", folder)
    return None


def resolve_resume(resume: str | None, output_dir: Path) -> str | None:
    """--resume_from_checkpoint: a checkpoint folder, `true` / `last` (the last complete one in
    OUTPUT_DIR, an error if none), or `auto` (the same, or a fresh start if none: one command line
    for a job that may be preempted and restarted)."""
    if resume is None or str(resume).lower() in ("", "false", "none"):
        return None
    if str(resume).lower() in ("true", "last", "auto"):
        last = last_complete_checkpoint(output_dir) if output_dir.is_dir() else None
        if last is None and str(resume).lower() != "auto":
            raise ValueError(f"--resume_from_checkpoint {resume}: no complete checkpoint in {output_dir}")
        logger.info("resuming from %s", last or "scratch (no complete checkpoint yet)")
        return last
    if Path(resume).name.startswith("checkpoint-") and not checkpoint_is_complete(resume):
        last = last_complete_checkpoint(Path(resume).parent)
        raise ValueError(
            f"{resume} is incomplete (no readable trainer_state.json for its step): the run stopped while "
            f"writing it. Resume from {last or 'scratch'} instead (--resume_from_checkpoint auto picks it)."
        )
    return resume


class MultimodalTrainer(Trainer):
    """`Trainer` with the logits-free training loss, length grouping from precomputed lengths and a
    projector learning rate."""

    def __init__(self, *args, projector_lr: float | None = None, align_loss: str | None = None,
                 align_temperature: float = 1.0, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.align_loss, self.align_temperature = align_loss, align_temperature

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            # accelerate turns FSDP on only for GPU-like devices: with --use_cpu it would quietly run DDP.
            # torch's fully_shard shards CPU tensors over gloo, so switch this run's state to FSDP
            # (PartialState too: every later AcceleratorState() copies its distributed_type back).
            plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
            if state.mixed_precision != "no":
                plugin.set_mixed_precision(state.mixed_precision)
            state.fsdp_plugin = plugin
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True

    def _prepare_for_training(self, *args, **kwargs):
        model, dataloader = super()._prepare_for_training(*args, **kwargs)
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            # A batch without images (or audio) leaves a projector without a gradient on one process
            # while another has one: FSDP2 reduce-scatters zeros for it, or the processes' collectives
            # would differ (DDP's find_unused_parameters, for shards).
            model.set_reduce_scatter_unused_params(True)
        return model, dataloader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.align_loss == "kl":  # the audio alignment stage: the student's KL to the teacher
            from phi3mm.align import distillation_loss

            loss = distillation_loss(model, inputs, self.align_temperature, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss
        # Training steps need only the loss: the head runs at the supervised positions alone (the
        # full logits of every image and prompt token are the largest activation of a step).
        # Evaluation asks for the outputs and gets the logits as usual.
        if model.training and not return_outputs:
            inputs = {**inputs, "skip_logits": True}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        # A folder for this step may be left from a run that resumed from an earlier checkpoint:
        # its old trainer_state.json goes first, or a save cut off half-way would pass as complete.
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            (folder / "trainer_state.json").unlink(missing_ok=True)
        super()._save_checkpoint(model, trial)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        if self.projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            is_projector = any(p in name for p in PROJECTORS)
            key = (is_projector, name in decay)
            groups.setdefault(key, []).append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(
            [
                {"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0,
                 **({"lr": self.projector_lr} if is_projector else {})}
                for (is_projector, decayed), params in groups.items()
            ],
            **optimizer_kwargs,
        )
        return self.optimizer


def plot_loss(losses: list[tuple[int, float]], eval_losses: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(*zip(*losses), marker=".", label="training")
    if eval_losses:
        axis.plot(*zip(*eval_losses), marker="o", label="evaluation")
        axis.legend()
    axis.set(xlabel="step", ylabel="loss", title=title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def skipped_over_ranks(dataset: LlavaDataset) -> Counter:
    """Skipped rows by reason over all processes: every process checks every row up front (the same
    counts), but each meets decoding failures only in the rows it draws, so those are united."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dataset.skipped
    failed = {index: code for index, code in enumerate(dataset.failures) if code}
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, failed)
    union = {index: code for rank in gathered for index, code in rank.items()}
    return dataset.checked + Counter(DECODE_REASONS[code - 1] for code in union.values())


def component_models(model_args: ModelArguments, base: str) -> dict:
    """The public components a checkpoint was built from (recorded in its config by the builder)."""
    from transformers import AutoConfig

    recorded = getattr(AutoConfig.from_pretrained(base, trust_remote_code=True), "component_models", None)
    if recorded:
        return dict(recorded)
    if model_args.model_name_or_path or model_args.tiny:
        return {}
    return {"text": model_args.text_model, "vision": model_args.vision_model, "audio": model_args.audio_model}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def logits_of(model, batches: list[dict]) -> list[torch.Tensor]:
    return [model(**batch).logits.float() for batch in batches]


@torch.no_grad()
def compare_logits(reference: list[torch.Tensor], candidate, batches: list[dict]) -> dict:
    """How far the merged model's logits are from the trained (4-bit + LoRA) model's (`reference`)."""
    max_diff, mean_diffs, agree = 0.0, [], []
    for a, batch in zip(reference, batches):
        b = candidate(**batch).logits.float()
        mask = batch["attention_mask"].bool()
        diff = (a - b).abs()[mask]
        max_diff = max(max_diff, diff.max().item())
        mean_diffs.append(diff.mean().item())
        agree.append((a.argmax(-1) == b.argmax(-1))[mask].float().mean().item())
    return {"max_abs_logit_diff": max_diff, "mean_abs_logit_diff": sum(mean_diffs) / len(mean_diffs),
            "top1_agreement": sum(agree) / len(agree)}


def quantized_linears(model) -> list[tuple[str, torch.nn.Module]]:
    import bitsandbytes as bnb

    return [(name, module) for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def use_compute_dtype_on_cpu(model) -> None:
    """Make 4-bit layers compute in their compute dtype on the CPU, as they do on a GPU.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 kernel the first time
    the layer runs in eval mode without grad; that kernel's rounding (~1e-2 on a logit) would hide
    what a merge comparison is meant to show. Under FSDP it is worse than rounding: the repacking
    rewrites the gathered weight and marks the layer's quant state as packed, the next forward
    gathers the standard layout again and reads it as packed (the sharded QLoRA merge check on
    such a CPU: top-1 agreement 51%, logits 8.9 apart).
    """
    for _, module in quantized_linears(model):
        module.support_avx512bf16_for_cpu = False


def copy_dequantized_weights(target, trained) -> int:
    """Overwrite `target`'s linears with the dequantized 4-bit weights of `trained`; returns how many.

    The adapter was trained against the NF4 weights, not the original ones: merging it into the
    original full-precision base would add the quantization error of every layer back in.
    """
    import bitsandbytes as bnb

    linears = quantized_linears(trained)
    for name, module in linears:
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            module.state_dict()  # saving restores bitsandbytes' standard layout from its CPU inference one
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        path = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        target.get_submodule(path).weight.data.copy_(weight)
    return len(linears)


def merge_and_save(trained, base: str, adapter_dir: Path, processor, out_dir: Path, samples: list[dict], dtype,
                   trained_logits: list[torch.Tensor] | None = None):  # fmt: skip
    """Dequantize the trained base into full precision, merge the adapter, compare, save. Returns the report.

    `trained_logits`: the trained model's logits on `samples`, when it is sharded over processes
    (FSDP / ZeRO-3) and this one cannot run it alone; `trained` is then its copy from the gathered
    adapter (see `gathered_model`).
    """
    from peft import PeftModel

    full = Phi3ProjectorForConditionalGeneration.from_pretrained(base, dtype=dtype, use_safetensors=True)
    full.config.image_token_pooling = trained.get_base_model().config.image_token_pooling  # as the run set it
    dequantized = copy_dequantized_weights(full, trained)
    merged = PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
    merged.eval()
    if trained_logits is None:
        trained.eval()
        use_compute_dtype_on_cpu(trained)
        trained_logits = logits_of(trained, samples)
    report = {**compare_logits(trained_logits, merged, samples), "dequantized_linears": dequantized}
    save_checkpoint(merged, processor, out_dir)
    return report


def sharding_report(trainer: Trainer) -> dict:
    """How this process holds the trained weights: with FSDP2 they are DTensors, with ZeRO-3
    partitioned parameters; `local_fraction` is the share of all elements this process stores."""
    from torch.distributed.tensor import DTensor

    params = list(trainer.model.parameters())
    local = full = sharded = 0
    for param in params:
        if isinstance(param, DTensor):
            sharded, local = sharded + 1, local + param.to_local().numel()
        elif hasattr(param, "ds_tensor"):
            sharded, local = sharded + 1, local + param.ds_tensor.numel()
        else:
            local += param.numel()
        full += full_numel(param)
    return {"distributed_type": trainer.accelerator.distributed_type.value, "sharded_parameters": sharded,
            "parameters": len(params), "local_fraction": round(local / full, 4)}  # fmt: skip


def is_sharded(trainer: Trainer) -> bool:
    """Whether the trained weights are split over the processes, so that no one process can run the model."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return trainer.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3)


def gathered_model(trainer: Trainer, base: str, adapter_dir: Path, quantization: BitsAndBytesConfig | None):
    """The trained model whole, on the main process (None on the others), from a sharded run.

    Every process must call it: the weights are gathered from all of them. With an adapter, it is
    the base loaded as the run loaded it (4-bit for QLoRA: the same NF4 weights, which the merge
    dequantizes) with the adapter that `Trainer.save_model` gathered and saved.
    """
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    state_dict = None if hasattr(unwrapped, "peft_config") else trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return None
    with unsharded_loading(trainer):
        model = Phi3ProjectorForConditionalGeneration.from_pretrained(
            base, quantization_config=quantization, dtype=torch.float32, use_safetensors=True
        )
        model.config.image_token_pooling = unwrapped.config.image_token_pooling  # as the run set it
        if state_dict is None:
            from peft import PeftModel

            return PeftModel.from_pretrained(model, adapter_dir)
        model.load_state_dict(state_dict)
        return model


def leave_process_group() -> None:
    """Unregister this process's process group once no collective is left (a no-op outside a
    distributed run). Local for gloo, so the processes need not wait for each other. It does not stop
    gloo's threads (see `end_worker_process`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_worker_process() -> None:
    """End a distributed run's non-main process (RANK > 0) at once when its part is done, without
    the interpreter's teardown; a no-op on the main process and outside a distributed run.

    Gloo's worker threads live as long as the process: neither destroy_process_group nor the
    backend's shutdown or abort stops them (torch 2.13). A process that tears its interpreter down
    around them now and then aborts ("terminate called without an active exception", SIGABRT),
    and the launcher then fails the run whose work was done. The main process, which saves and
    reports, exits normally; the others have nothing left to write, so their logs and streams are
    flushed and the process ends with status 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def unsharded_loading(trainer: Trainer):
    """A context in which from_pretrained builds an ordinary model: under ZeRO-3 transformers builds
    every model partitioned, a collective that the other processes would never join."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is None or not is_deepspeed_zero3_enabled():
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # (accelerate's zero3_init_context_manager leaves ZeRO-3 on in transformers)
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def open_caches(model, model_args: ModelArguments, data_args: DataArguments) -> tuple:
    """The vision and audio feature caches the run reads, checked against the towers' config and
    weights: a cache built from another tower (another seed, or one a stage with --train_*_tower
    changed) must not train on stale features, and a tower that trains cannot use one."""
    from phi3mm.audio_cache import AudioFeatureCache
    from phi3mm.vision_cache import VisionFeatureCache

    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    caches = []
    for cache_class, folder, trains, option in (
        (VisionFeatureCache, data_args.vision_cache_dir, model_args.train_vision_tower, "--train_vision_tower"),
        (AudioFeatureCache, data_args.audio_cache_dir, model_args.train_audio_tower or model_args.audio_lora_r > 0,
         "--train_audio_tower" if model_args.train_audio_tower else "--audio_lora_r"),
    ):  # fmt: skip
        if not folder:
            caches.append(None)
            continue
        flag = f"--{cache_class.modality.replace('image', 'vision')}_cache_dir"
        if trains:
            raise ValueError(
                f"{flag} holds features of a fixed tower, but {option} changes the tower at every step: drop "
                f"one of the two (train the tower from the media, or keep it frozen and use the cache)"
            )
        caches.append(cache_class(folder, base_model.config, fingerprint=cache_class.fingerprint(model)))
    return tuple(caches)


def check_media_for_zero3(rows: list[dict]) -> None:
    """ZeRO-3 gathers a tower's weights when the tower runs, from every process at once: a step in
    which one process's batch has audio (or images, or neither) and another's has not is a mismatch
    of collectives that kills the run. Refused up front: every row must carry the same media."""
    kinds = Counter(tuple(kind for kind in ("image", "audio") if row_media(row, kind, None)) for row in rows)
    if len(kinds) > 1:
        mix = ", ".join(f"{n} rows with {' + '.join(kind) or 'text only'}" for kind, n in sorted(kinds.items()))
        raise ValueError(
            f"DeepSpeed ZeRO-3 runs only data sets whose rows all carry the same media, because each process "
            f"gathers a tower's weights only when its batch uses that tower; this one mixes {mix}. Use "
            f"configs/accelerate/fsdp.yaml (FSDP2 keeps the towers in the root unit) or ddp.yaml, or split the data"
        )


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """One training stage end to end; returns the run summary (also written to OUTPUT_DIR)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and training_args.use_cpu:
        # accelerate turns DeepSpeed off under --use_cpu while transformers still builds the model
        # ZeRO-3-partitioned: DDP over partitioned weights.
        raise ValueError(
            "DeepSpeed does not run with --use_cpu true (accelerate turns it off): to run it on CPUs drop "
            "--use_cpu and add --ddp_backend gloo (DeepSpeed's CPU accelerator over a gloo process group)"
        )
    on_cpus = "add --ddp_backend gloo (not --use_cpu) to run DeepSpeed" if deepspeed else "add --use_cpu true to train"
    if launched > 1 and (training_args.world_size != launched or training_args.parallel_mode != ParallelMode.DISTRIBUTED):
        # torchrun / accelerate launch without GPUs: accelerate only goes multi-CPU when told to,
        # otherwise every process silently trains its own unsynchronised copy into one folder.
        raise ValueError(
            f"{launched} processes were launched but they are not one distributed run (world size "
            f"{training_args.world_size}): {on_cpus} on CPUs"
        )
    if is_deepspeed_zero3_enabled() and not model_args.model_name_or_path:
        raise ValueError(
            "DeepSpeed ZeRO-3 with zero3_init_flag builds every model partitioned over all processes at once, so one "
            "process cannot assemble the base alone: save it first (python -m phi3mm.build OUT for a tiny one, or a "
            "stage-1 run's OUT/model) and pass --model_name_or_path"
        )
    if data_args.rehearsal_data_path and model_args.stage != "audio_align":
        raise ValueError("--rehearsal_data_path belongs to --stage audio_align (the other stages train on every row anyway)")
    set_seed(training_args.seed)  # the LoRA init happens before Trainer seeds anything
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    training_args.remove_unused_columns = False  # the collator's media keys are not in any dataset column
    training_args.label_names = ["labels"]
    # One process assembles output_dir/base while the others wait; a saved checkpoint all load at once
    # (under ZeRO-3 loading is itself a collective that leaves each process its partition).
    assembling = training_args.main_process_first(desc="assembling the base model")
    with contextlib.nullcontext() if model_args.model_name_or_path else assembling:
        model, processor, base = load_base(model_args, output_dir)
    model.config.use_cache = False
    model = prepare_for_training(model, model_args, training_args)

    vision_cache, audio_cache = open_caches(model, model_args, data_args)
    folders = dict(image_folder=data_args.image_folder, audio_folder=data_args.audio_folder)
    options = dict(max_length=data_args.max_length, strict=data_args.strict, vision_cache=vision_cache, audio_cache=audio_cache)
    collator = MultimodalCollator(processor.tokenizer.pad_token_id)
    make_dataset = LlavaDataset
    if model_args.stage == "audio_align":
        from phi3mm.align import AlignmentCollator, AlignmentDataset

        options.update(audio_column=data_args.audio_column, text_column=data_args.text_column, loss=data_args.align_loss)
        make_dataset, collator = AlignmentDataset, AlignmentCollator(processor.tokenizer.pad_token_id)
    rehearsal = {"rehearsal_rows": read_rows(data_args.rehearsal_data_path)} if data_args.rehearsal_data_path else {}
    dataset = make_dataset(read_rows(data_args.data_path), processor, **folders, **options, **rehearsal)
    eval_dataset = None
    if data_args.eval_data_path and training_args.eval_strategy != "no":  # eval loss during training
        eval_rows = read_rows(data_args.eval_data_path)[: data_args.max_eval_samples]
        eval_dataset = make_dataset(eval_rows, processor, **folders, **options)
        training_args.prediction_loss_only = True  # no metric reads the logits: the eval loss is the figure
    if model_args.stage == "audio_align":
        # ASR rows without a continuation get the teacher's own, generated once (rank 0 first,
        # the others then read its cache) before any step.
        with training_args.main_process_first(desc="teacher continuations"):
            for data in (dataset, eval_dataset):
                if data is not None and data.fill_continuations(model, output_dir / "continuations.json"):
                    logger.info("generated the teacher's continuations for %d rows", len(data.rows))
    trainer = MultimodalTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        projector_lr=model_args.projector_lr,
        align_loss=data_args.align_loss if model_args.stage == "audio_align" else None,
        align_temperature=data_args.align_temperature,
    )
    if trainer.is_deepspeed_enabled and is_sharded(trainer) and training_args.world_size > 1:
        check_media_for_zero3(dataset.rows)
    resume = resolve_resume(training_args.resume_from_checkpoint, output_dir)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start

    # The whole run's log (Trainer restores the earlier part from the checkpoint on a resume).
    losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    eval_losses = [(entry["step"], entry["eval_loss"]) for entry in trainer.state.log_history if "eval_loss" in entry]
    skipped = skipped_over_ranks(dataset)
    summary = {
        "stage": model_args.stage,
        "tuning": {"finetune": model_args.tuning, "pretrain": "projectors"}.get(model_args.stage, "audio projector"),
        "steps": trainer.state.global_step,
        "resumed_from": resume,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0][1] if losses else None,
        "last_logged_loss": losses[-1][1] if losses else None,
        "eval_losses": eval_losses or None,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "train_seconds": round(seconds, 2),  # this process's part of the run
        "samples_per_second": result.metrics.get("train_samples_per_second"),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "rows": len(dataset.rows),
        **({"rehearsal_rows": sum(bool(row.get("rehearsal")) for row in dataset.rows)} if data_args.rehearsal_data_path else {}),
        "skipped_rows": dict(skipped),
        "skipped_total": sum(skipped.values()),
        "world_size": training_args.world_size,
        "sharding": sharding_report(trainer),
    }
    adapter_dir = output_dir / "adapter"
    if hasattr(model, "peft_config"):
        # Every process: under FSDP / ZeRO-3 Trainer.save_model gathers the sharded adapter first.
        trainer.save_model(str(adapter_dir))
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    merging = hasattr(model, "peft_config") and model_args.merge and model_args.stage == "finetune"
    samples = [trainer.data_collator([dataset[i] for i in range(j, min(j + 2, len(dataset)))]) for j in (0, 2) if j < len(dataset)] if merging else []  # fmt: skip
    trained, trained_logits = trainer.model, None
    if is_sharded(trainer):
        # No process holds the whole trained model: all of them run it on the merge check's samples
        # (the same batches everywhere, so the same collectives) and gather its weights, and the main
        # process carries on with an ordinary copy.
        if merging:
            trainer.model.eval()
            trained_logits = logits_of(trainer.model, samples)
        quantized = model_args.stage in ("finetune", "audio_align") and model_args.tuning == "qlora"
        trained = gathered_model(trainer, base, adapter_dir, quantization_config(model_args) if quantized else None)
    main_process = trainer.is_world_process_zero()
    leave_process_group()  # what is left is the main process's alone
    if not main_process:
        return summary

    model_dir = output_dir / "model"
    with unsharded_loading(trainer):
        if model_args.stage == "audio_align":
            save_aligned(trained, base, processor, model_dir, dtype)
        elif hasattr(model, "peft_config"):
            if model_args.merge:
                summary["merge"] = merge_and_save(trained, base, adapter_dir, processor, model_dir, samples, dtype, trained_logits)
                print(f"merged vs trained: {summary['merge']}")
        else:
            save_checkpoint(trained, processor, model_dir)

    if data_args.eval_data_path and (model_dir / "config.json").is_file():
        from phi3mm.evaluate import evaluate

        with unsharded_loading(trainer):
            final = Phi3ProjectorForConditionalGeneration.from_pretrained(model_dir, use_safetensors=True).eval()
        rows = read_rows(data_args.eval_data_path)[: data_args.max_eval_samples]
        summary["eval"] = evaluate(final, processor, rows, **folders)
        summary["eval_blank_media"] = evaluate(final, processor, rows, blank_media=True, **folders)
    if losses:
        plot_loss(losses, eval_losses, output_dir / "loss.png", f"stage {model_args.stage}")
    if model_dir.is_dir():
        from phi3mm.model_card import write_model_card

        write_model_card(model_dir, summary, model_args, data_args, training_args, component_models(model_args, base))
    (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if training_args.push_to_hub and model_dir.is_dir():
        from huggingface_hub import HfApi

        repo = training_args.hub_model_id or output_dir.name
        HfApi().create_repo(repo, exist_ok=True, private=training_args.hub_private_repo)
        HfApi().upload_folder(folder_path=str(model_dir), repo_id=repo, commit_message="Merged multimodal model")
    return summary


__all__ = [
    "DataArguments", "LORA_TARGETS", "ModelArguments", "MultimodalTrainer", "PROJECTORS", "checkpoint_is_complete",
    "copy_dequantized_weights", "last_complete_checkpoint", "load_base", "merge_and_save", "prepare_for_training",
    "quantization_config", "resolve_resume", "train", "use_compute_dtype_on_cpu",
]  # fmt: skip
