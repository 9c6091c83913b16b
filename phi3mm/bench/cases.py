"""What the benchmark measures, ours against transformers' LLaVA holding the same weights.

`SIZES` are the models (shape options of `phi3mm.build.make_tiny_components`, and the work per
case); `prepare_models` builds ours, exports it with `export_llava`, loads both back from disk and
adds a pooling-2 copy. Each `bench_*` function is one case and returns its figures as plain data:
training step (from pixels, from precomputed vision features, with pooling 2), prefill, `generate`
(fp32 / bf16 / 4-bit), a loop without KV cache, and a QLoRA step as the training library sets it up.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList, TrainingArguments

from modeling_phi3_projector import Phi3ProjectorForConditionalGeneration
from phi3mm.bench.flops import matmul_fn, pooling_flop_ratio, training_step_flops
from phi3mm.bench.timing import interleave, paired_ratio, summarize, sync
from phi3mm.build import build_model_and_processor, make_tiny_components, save_checkpoint
from phi3mm.data import IGNORE_INDEX
from phi3mm.export_llava import export_llava
from phi3mm.training import ModelArguments, prepare_for_training, quantization_config


@dataclass(frozen=True)
class Size:
    name: str
    components: dict  # shape options of `make_tiny_components`
    batch_size: int  # rows a training step
    seq_len: int  # tokens a training row: a header, the image block, text
    new_tokens: int  # tokens generated a decode measurement
    nocache_tokens: int  # tokens of the loop without KV cache (it re-runs everything per token)
    repeats: int  # timed rounds a measurement, unless --repeats says otherwise
    gradient_checkpointing: bool = False
    lora_r: int = 16


SIZES = {
    # make_tiny_components' defaults (the tests' shapes): 16 image tokens, millisecond steps.
    "tiny": Size("tiny", {}, batch_size=4, seq_len=64, new_tokens=16, nocache_tokens=16, repeats=15),
    # ~95M parameters with LLaVA-1.5's image shape (336 px, patch 14: 576 tokens), so the tower's
    # share and the image block's weight in the sequence are realistic; one row a step keeps the
    # run within minutes on two cores. Five rounds: with three, the step's noise hid the tower's removal.
    "small": Size("small",
                  {"hidden_size": 768, "num_layers": 8, "num_attention_heads": 12, "intermediate_size": 3072,
                   "vision_hidden_size": 512, "vision_layers": 6, "vision_attention_heads": 8,
                   "vision_intermediate_size": 2048, "image_size": 336, "patch_size": 14},
                  batch_size=1, seq_len=640, new_tokens=16, nocache_tokens=4, repeats=5),
    # Phi-3.5-mini (3.8B) with CLIP-L/336 (0.3B), random weights, at the training configs' shape:
    # batch 4 x 1024 with gradient checkpointing and LoRA r=128. GPU only.
    "phi35": Size("phi35",
                  {"hidden_size": 3072, "num_layers": 32, "num_attention_heads": 32, "intermediate_size": 8192,
                   "vision_hidden_size": 1024, "vision_layers": 24, "vision_attention_heads": 16,
                   "vision_intermediate_size": 4096, "image_size": 336, "patch_size": 14, "vocab_size": 32064},
                  batch_size=4, seq_len=1024, new_tokens=64, nocache_tokens=16, repeats=5,
                  gradient_checkpointing=True, lora_r=128),
}  # fmt: skip


@dataclass
class Models:
    size: Size
    ours: torch.nn.Module
    llava: torch.nn.Module
    pooled: torch.nn.Module  # ours with image_token_pooling=2: same components, same projector
    prompt: dict  # a chat prompt with one image, as our processor makes it
    pooled_prompt: dict  # the same with the pooled model's image block
    folders: tuple[Path, Path]  # ours, LLaVA
    dtype: torch.dtype
    bnb_compute_dtype: str  # of the 4-bit layers: the training default bfloat16 where the machine runs it at speed


def prompt_inputs(processor, device: str) -> dict[str, torch.Tensor]:
    """One chat prompt with an image and a ~30-token question, as the processor makes it."""
    image = np.full((96, 96, 3), 255, np.uint8)
    image[30:70, 10:50] = (220, 30, 30)
    question = "Look at the image carefully. What color is the shape, what shape is this, and is it on the left or the right?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       images=[Image.fromarray(image)], return_tensors="pt")  # fmt: skip
    return {k: inputs[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values")}


def prepare_models(size: Size, work_dir: Path, device: str, dtype: torch.dtype, bnb_compute_dtype: str) -> Models:
    """Components -> our checkpoint -> its LLaVA export; both loaded back from disk, and the pooled model."""
    paths = make_tiny_components(work_dir / "components", with_audio=False, device=device, dtype=dtype, **size.components)
    model, processor = build_model_and_processor(paths["text"], paths["vision"], dtype=dtype)
    ours_dir = save_checkpoint(model, processor, work_dir / "ours")
    llava_dir = export_llava(ours_dir, work_dir / "llava", overwrite=True, log=lambda line: None)
    del model
    ours = Phi3ProjectorForConditionalGeneration.from_pretrained(ours_dir, dtype=dtype).to(device)
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=dtype).to(device)
    pooled, pooled_processor = build_model_and_processor(paths["text"], paths["vision"], dtype=dtype, image_token_pooling=2)
    pooled_state = pooled.to(device).state_dict()
    for name, tensor in ours.state_dict().items():  # the pooling step must be the only difference
        if not torch.equal(tensor, pooled_state[name]):
            raise RuntimeError(f"the pooled model's {name} differs from ours")
    return Models(size, ours, llava, pooled, prompt_inputs(processor, device), prompt_inputs(pooled_processor, device),
                  (ours_dir, llava_dir), dtype, bnb_compute_dtype)  # fmt: skip


def training_batch(config, size: Size, device: str, n_text: int | None = None, seed: int = 0) -> dict:
    """Rows of a header, one image block and `n_text` text tokens (default: up to `size.seq_len`), the
    last quarter trained (an answer); no padding. The seed fixes text and pixels whatever the block's
    length, so pooling 1 and 2 see the same rows."""
    n_text = n_text or size.seq_len - 3 - config.image_seq_length
    if n_text < 8:
        raise ValueError(f"seq_len {size.seq_len} leaves no room for text after {config.image_seq_length} image tokens")
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(10, 256, (size.batch_size, n_text), generator=generator)  # byte ids: no special tokens
    side = config.vision_config.image_size
    pixels = torch.randn(size.batch_size, 3, side, side, generator=generator)
    ids = torch.cat([torch.tensor([[5, 6, 7] + [config.image_token_id] * config.image_seq_length] * size.batch_size), text], 1)
    labels = torch.cat([torch.full_like(ids[:, : -(n_text // 4)], IGNORE_INDEX), ids[:, -(n_text // 4) :]], 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}
    return {k: v.to(device) for k, v in batch.items()}


def train_step_fn(model, batch: dict, device: str, autocast: torch.dtype | None = None):
    """Forward with the loss, backward, gradients dropped: every step allocates them again, so its
    peak memory counts them (as a training run's first step does). Each model computes the loss as
    its own trainer asks: ours with `skip_logits=True` (what MultimodalTrainer passes), LLaVA in full."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    options = {"skip_logits": True} if "skip_logits" in inspect.signature(base.forward).parameters else {}

    def step():
        with torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext():
            loss = model(**batch, use_cache=False, **options).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return {"loss": loss.item()}

    return step


def set_training(models, on: bool, gradient_checkpointing: bool) -> None:
    """LLaVA-1.5's stage 2 without LoRA (LM and projector trained, tower frozen), or back to eval."""
    for model in models:
        model.train(on).requires_grad_(on)
        model.model.vision_tower.requires_grad_(False)
        model.config.use_cache = not on
        if gradient_checkpointing and on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gradient_checkpointing:
            model.gradient_checkpointing_disable()


def step_figures(run: dict, model, batch_size: int) -> dict:
    weights = int(model.get_memory_footprint())
    return run | {"samples_per_s": batch_size / run["seconds"], "weights_bytes": weights,
                  "peak_memory": weights + run["memory_increase"]}  # fmt: skip


def bench_training(m: Models, device: str, repeats: int) -> dict:
    """Training steps: ours, LLaVA, ours from precomputed features, ours pooled; the tower alone; a matmul."""
    size, config = m.size, m.ours.config
    batch = training_batch(config, size, device)
    pool_batch = training_batch(m.pooled.config, size, device, n_text=size.seq_len - 3 - config.image_seq_length)
    with torch.no_grad():
        features = m.ours.model.select_vision_features(batch["pixel_values"])
    feature_batch = {k: v for k, v in batch.items() if k != "pixel_values"} | {"vision_features": features}
    calls = []  # the tower's runs, seen at its patch embedding (ours runs the tower's parts, not its forward)
    hook = m.ours.model.vision_tower.embeddings.register_forward_hook(lambda *_: calls.append(1))

    def counting_tower_calls(step):
        def run():
            before = len(calls)
            return step() | {"tower_calls": len(calls) - before}

        return run

    def tower():
        with torch.no_grad():
            m.ours.model.select_vision_features(batch["pixel_values"])

    matmul, matmul_flops = matmul_fn(device, m.dtype)  # the arithmetic limit, timed under the same load
    set_training((m.ours, m.llava, m.pooled), True, size.gradient_checkpointing)
    records = interleave({"ours": counting_tower_calls(train_step_fn(m.ours, batch, device)),
                          "llava": train_step_fn(m.llava, batch, device),
                          "ours_features": counting_tower_calls(train_step_fn(m.ours, feature_batch, device)),
                          "ours_pool2": train_step_fn(m.pooled, pool_batch, device),
                          "vision_tower_forward": tower, "matmul": matmul}, repeats, device, memory=True)  # fmt: skip
    set_training((m.ours, m.llava, m.pooled), False, size.gradient_checkpointing)
    hook.remove()
    runs = {name: summarize(recs) for name, recs in records.items()}
    rate = matmul_flops / runs["matmul"]["seconds"]
    supervised = int((batch["labels"][0, 1:] != IGNORE_INDEX).sum())  # positions whose next token is trained
    flops = {  # LLaVA runs every tower layer and the head at every position
        "ours": training_step_flops(config, size.batch_size, size.seq_len, head_tokens=supervised),
        "llava": training_step_flops(config, size.batch_size, size.seq_len, tower_layers=config.vision_config.num_hidden_layers),
        "ours_features": training_step_flops(config, size.batch_size, size.seq_len, "features", head_tokens=supervised),
        "ours_pool2": training_step_flops(m.pooled.config, size.batch_size, pool_batch["input_ids"].shape[1],
                                          head_tokens=supervised),
    }  # fmt: skip
    for name, model in (("ours", m.ours), ("llava", m.llava), ("ours_features", m.ours), ("ours_pool2", m.pooled)):
        total = flops[name]["total"]
        runs[name] = step_figures(runs[name], model, size.batch_size) | {"flops": total, "mfu": total / rate / runs[name]["seconds"]}
    rounds = list(zip(records["ours"], records["ours_features"], records["vision_tower_forward"]))

    def tower_removed(clock):  # per round: the time features saved, as a share of the tower's own time
        return statistics.median((p[clock] - f[clock]) / t[clock] for p, f, t in rounds)

    return {
        "batch_size": size.batch_size, "seq_len": size.seq_len, "pooled_seq_len": pool_batch["input_ids"].shape[1],
        "gradient_checkpointing": size.gradient_checkpointing, "matmul_flops_per_s": rate, "runs": runs,
        "flop_ratio_ours_llava": flops["ours"]["total"] / flops["llava"]["total"],
        "ratio_ours_llava": paired_ratio(records["ours"], records["llava"]),
        "pool2_step_speedup": paired_ratio(records["ours"], records["ours_pool2"]),
        "vision_features": {
            "tower_share_of_step": runs["vision_tower_forward"]["seconds"] / runs["ours"]["seconds"],
            "share_of_tower_removed": tower_removed("seconds"), "share_of_tower_removed_cpu": tower_removed("cpu_seconds"),
            "tower_calls_with_pixels": sum(r["tower_calls"] for r in records["ours"]),
            "tower_calls_with_features": sum(r["tower_calls"] for r in records["ours_features"]),
        },
    }  # fmt: skip


def bench_prefill(m: Models, device: str, repeats: int) -> dict:
    """One forward over the prompt with the cache on and the last logits only (generate's first step)."""
    with torch.inference_mode():
        features = {"vision_features": m.ours.model.select_vision_features(m.prompt["pixel_values"])}

    def prefill(model, inputs, use_features=False):
        inputs = {k: v for k, v in inputs.items() if k != "pixel_values"} | features if use_features else inputs

        def run():
            with torch.inference_mode():
                model(**inputs, use_cache=True, logits_to_keep=1)

        return run

    records = interleave({"ours": prefill(m.ours, m.prompt), "llava": prefill(m.llava, m.prompt),
                          "ours_pool2": prefill(m.pooled, m.pooled_prompt), "ours_features": prefill(m.ours, m.prompt, True),
                          "ours_pool2_features": prefill(m.pooled, m.pooled_prompt, True)}, repeats, device)  # fmt: skip
    text_tokens = m.prompt["input_ids"].shape[1] - m.ours.config.image_seq_length
    return {
        "prompt_tokens": m.prompt["input_ids"].shape[1], "pooled_prompt_tokens": m.pooled_prompt["input_ids"].shape[1],
        "text_tokens": text_tokens, "runs": {name: summarize(recs) for name, recs in records.items()},
        "ratio_ours_llava": paired_ratio(records["ours"], records["llava"]),
        # speed-ups (pooling 1 time / pooling 2 time), with the tower and for the language model alone
        "pool2_speedup": paired_ratio(records["ours"], records["ours_pool2"]),
        "pool2_speedup_features": paired_ratio(records["ours_features"], records["ours_pool2_features"]),
        "pool2_flop_ratio": pooling_flop_ratio(m.ours.config, m.pooled.config, text_tokens),
    }  # fmt: skip


class _TokenClock(LogitsProcessor):
    """Wall and CPU time stamps of each generated token's logits (once a step, before the choice)."""

    def __init__(self, device: str):
        self.device, self.stamps = device, [(time.perf_counter(), time.process_time())]

    def __call__(self, input_ids=None, scores=None):
        sync(self.device)
        self.stamps.append((time.perf_counter(), time.process_time()))
        return scores

    def timing(self) -> dict:
        """TTFT, and decode tokens/s: tokens after the first / the time from the first to the last."""
        (wall0, cpu0), (wall1, cpu1), (wall_n, cpu_n) = self.stamps[0], self.stamps[1], self.stamps[-1]
        n = len(self.stamps) - 2
        return {"ttft_s": wall1 - wall0, "ttft_cpu_s": cpu1 - cpu0, "decode_tokens_per_s": n / (wall_n - wall1),
                "decode_tokens_per_cpu_s": n / max(cpu_n - cpu1, 1e-9)}  # fmt: skip


def generate_fn(model, inputs: dict, new_tokens: int, device: str):
    """Greedy `generate` of exactly `new_tokens` tokens with the KV cache."""

    def run():
        clock = _TokenClock(device)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           logits_processor=LogitsProcessorList([clock]), use_cache=True)  # fmt: skip
        return clock.timing()

    return run


def no_cache_loop_fn(model, inputs: dict, new_tokens: int, device: str):
    """Greedy generation as earlier projects wrote it: the whole forward (tower, every token, all
    logits) again for each new token."""

    def run():
        clock, ids, mask = _TokenClock(device), inputs["input_ids"], inputs["attention_mask"]
        with torch.inference_mode():
            for _ in range(new_tokens):
                logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False).logits
                next_id = logits[:, -1].argmax(-1, keepdim=True)
                clock()
                ids, mask = torch.cat([ids, next_id], 1), torch.cat([mask, torch.ones_like(next_id)], 1)
        return clock.timing()

    return run


MODEL_CLASSES = (Phi3ProjectorForConditionalGeneration, LlavaForConditionalGeneration)


def load_both(m: Models, device: str, precision: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and LLaVA as loaded, or loaded again from their folders in bf16 or 4-bit (the training
    library's NF4 config, computing in `m.bnb_compute_dtype`)."""
    if precision == "4bit":
        kwargs = {"quantization_config": quantization_config(ModelArguments(bnb_compute_dtype=m.bnb_compute_dtype)),
                  "dtype": m.dtype}
        kwargs |= {"device_map": {"": 0}} if device == "cuda" else {}
        return tuple(cls.from_pretrained(folder, **kwargs) for cls, folder in zip(MODEL_CLASSES, m.folders))
    if precision == "bf16" and m.dtype != torch.bfloat16:
        return tuple(cls.from_pretrained(f, dtype=torch.bfloat16).to(device) for cls, f in zip(MODEL_CLASSES, m.folders))
    return m.ours, m.llava


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_generation(m: Models, device: str, repeats: int, precisions: list[str]) -> dict:
    """TTFT and decode tokens/s with `generate`, ours vs LLaVA, for each precision."""
    n = m.size.new_tokens
    results = {"prompt_tokens": m.prompt["input_ids"].shape[1], "new_tokens": n, "precisions": {}}
    for precision in precisions:
        ours, llava = load_both(m, device, precision)
        inputs = m.prompt | {"pixel_values": m.prompt["pixel_values"].to(ours.model.vision_tower.dtype)}
        records = interleave({"ours": generate_fn(ours.eval(), inputs, n, device),
                              "llava": generate_fn(llava.eval(), inputs, n, device)}, repeats, device)  # fmt: skip
        runs = {name: summarize(records[name]) | {"weights_bytes": int(model.get_memory_footprint())}
                for name, model in (("ours", ours), ("llava", llava))}  # fmt: skip
        results["precisions"][precision] = {
            "runs": runs,
            "ratio_ttft_ours_llava": paired_ratio(records["ours"], records["llava"], "ttft_s", "ttft_cpu_s"),
            # time a decoded token, ours / LLaVA: the inverse of the tokens/s ratio
            "ratio_decode_time_ours_llava": paired_ratio(records["llava"], records["ours"], "decode_tokens_per_s",
                                                         "decode_tokens_per_cpu_s"),
        }  # fmt: skip
        del ours, llava
        release(device)
    return results


def bench_no_cache(m: Models, device: str, repeats: int) -> dict:
    """Ours: `generate` with the KV cache against the loop without it, the same number of tokens."""
    n = m.size.nocache_tokens
    records = interleave({"generate_kv_cache": generate_fn(m.ours, m.prompt, n, device),
                          "loop_no_cache": no_cache_loop_fn(m.ours, m.prompt, n, device)}, repeats, device, warmup=0)
    return {"new_tokens": n, "runs": {name: summarize(recs) for name, recs in records.items()},
            "speedup_total": paired_ratio(records["loop_no_cache"], records["generate_kv_cache"])}  # fmt: skip


def bench_qlora(m: Models, device: str, repeats: int) -> dict:
    """A QLoRA step as the training library sets it up (`prepare_for_training`): 4-bit NF4 base,
    LoRA on every Phi-3 linear, the projector trained in full, bf16 autocast on a GPU."""
    size = m.size
    model_args = ModelArguments(tiny=True, lora_r=size.lora_r, lora_alpha=2 * size.lora_r, lora_dropout=0.0,
                                bnb_compute_dtype=m.bnb_compute_dtype)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # it prints its counts
        training_args = TrainingArguments(output_dir=tmp, activation_checkpointing=size.gradient_checkpointing,
                                          use_cpu=device == "cpu", report_to=[])  # fmt: skip
        ours, llava = (prepare_for_training(model, model_args, training_args) for model in load_both(m, device, "4bit"))
    for model in (ours, llava):
        model.train().config.use_cache = False
    batch = training_batch(m.ours.config, size, device)
    autocast = torch.bfloat16 if device == "cuda" else None
    records = interleave({"ours": train_step_fn(ours, batch, device, autocast),
                          "llava": train_step_fn(llava, batch, device, autocast)}, repeats, device, memory=True)
    result = {"batch_size": size.batch_size, "seq_len": size.seq_len, "lora_r": size.lora_r,
              "trainable_parameters": sum(p.numel() for p in ours.parameters() if p.requires_grad),
              "gradient_checkpointing": size.gradient_checkpointing, "autocast": "bfloat16" if autocast else None,
              "bnb_compute_dtype": m.bnb_compute_dtype, "runs": {name: step_figures(summarize(records[name]), model, size.batch_size)
                       for name, model in (("ours", ours), ("llava", llava))},
              "ratio_ours_llava": paired_ratio(records["ours"], records["llava"])}  # fmt: skip
    del ours, llava
    release(device)
    return result
