"""Model FLOPs of what the benchmark runs, counted from a config, and the machine's matmul rate.

Forward is 2 x matmul weights x tokens plus attention (4 x layers x width x seq^2, the full square
as PaLM counts it); backward is twice the forward for what is trained. Recomputation under gradient checkpointing is not counted (model
FLOPs, not hardware FLOPs). MFU = these FLOPs / the rate of one large square matmul / the time.
The matmul rates of float32 and bfloat16 also tell whether this machine computes in bf16 at speed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from phi3mm.bench.timing import interleave


def text_matmul_params(text_config) -> int:
    """Weights of the Phi-3 body and head that multiply every token (not the embedding lookup)."""
    d, inter, layers = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    head_dim = getattr(text_config, "head_dim", None) or d // text_config.num_attention_heads
    q, kv = text_config.num_attention_heads * head_dim, text_config.num_key_value_heads * head_dim
    per_layer = d * (q + 2 * kv) + q * d + d * 2 * inter + inter * d  # qkv_proj, o_proj, gate_up_proj, down_proj
    return layers * per_layer + d * text_config.vocab_size  # + lm_head


def vision_matmul_params(vision_config, layers: int | None = None) -> int:
    """Weights of the CLIP tower that multiply every token: patch embedding and `layers` layers (all)."""
    d, inter = vision_config.hidden_size, vision_config.intermediate_size
    layers = vision_config.num_hidden_layers if layers is None else layers
    return vision_config.num_channels * vision_config.patch_size**2 * d + layers * (4 * d * d + 2 * d * inter)


def attention_flops(layers: int, width: int, seq_len: int) -> int:
    """Forward attention-score and weighted-sum FLOPs of one sequence."""
    return 4 * layers * width * seq_len**2


def vision_tower_flops(config, layers: int | None = None) -> int:
    """Forward FLOPs of one image through the tower's first `layers` layers. Ours runs up to the
    feature layer (`config.vision_layers_used`, the default); LLaVA runs them all."""
    vision = config.vision_config
    layers = config.vision_layers_used if layers is None else layers
    tokens = config.patches_per_side**2 + 1  # the tower always sees the CLS token
    return 2 * vision_matmul_params(vision, layers) * tokens + attention_flops(layers, vision.hidden_size, tokens)


def projector_flops(config) -> int:
    """Forward FLOPs of the projector for one image (it runs before pooling, on every patch)."""
    d_text, d_vision = config.text_config.hidden_size, config.vision_config.hidden_size
    return 2 * (d_vision * d_text + d_text * d_text) * config.image_seq_length * config.image_token_pooling**2


def training_step_flops(config, batch_size: int, seq_len: int, vision: str = "tower", tower_layers: int | None = None,
                        head_tokens: int | None = None) -> dict[str, int]:
    """Model FLOPs of one training step (forward + backward) with one image a row, by part.

    The LM and projector are trained; the tower is frozen: forward only with `vision="tower"`
    (`tower_layers` as in `vision_tower_flops`), nothing with `"features"`. The head runs on
    `head_tokens` tokens a row (None: all `seq_len`).
    """
    text = config.text_config
    head = text.hidden_size * text.vocab_size
    head_tokens = seq_len if head_tokens is None else head_tokens
    lm_forward = batch_size * (2 * (text_matmul_params(text) - head) * seq_len + 2 * head * head_tokens
                               + attention_flops(text.num_hidden_layers, text.hidden_size, seq_len))
    flops = {
        "language_model": 3 * lm_forward,
        "projector": 3 * projector_flops(config) * batch_size,
        "vision_tower": batch_size * vision_tower_flops(config, tower_layers) if vision == "tower" else 0,
    }
    return flops | {"total": sum(flops.values())}


def prefill_flops(config, prompt_tokens: int, vision: str = "tower") -> int:
    """Model FLOPs of one prefill forward with one image: every prompt token through the LM body,
    the head for the last one only, the projector and (with `vision="tower"`) the tower."""
    text = config.text_config
    head = text.hidden_size * text.vocab_size
    flops = 2 * (text_matmul_params(text) - head) * prompt_tokens + 2 * head + projector_flops(config)
    flops += attention_flops(text.num_hidden_layers, text.hidden_size, prompt_tokens)
    return flops + (vision_tower_flops(config) if vision == "tower" else 0)


def pooling_flop_ratio(config_pool1, config_pool2, text_tokens: int) -> dict[str, float]:
    """Prefill FLOPs with pooling 1 over pooling 2, for one image and `text_tokens` of text."""
    one, two = config_pool1.image_seq_length + text_tokens, config_pool2.image_seq_length + text_tokens
    return {vision: prefill_flops(config_pool1, one, vision) / prefill_flops(config_pool2, two, vision)
            for vision in ("tower", "features")}  # fmt: skip


def matmul_fn(device: str, dtype: torch.dtype, n: int | None = None) -> tuple[Callable[[], None], int]:
    """One large square matmul (the machine's practical arithmetic ceiling) and its FLOPs."""
    n = n or (8192 if device == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    def run():
        a @ b

    return run, 2 * n**3


def matmul_rates(device: str, n: int = 512) -> dict:
    """FLOP/s of an n x n matmul in float32 and in bfloat16: a CPU without bf16 instructions runs
    bf16 tens of times slower, which decides whether bf16 cases are worth measuring on it."""
    fns = {name: matmul_fn(device, getattr(torch, name), n) for name in ("float32", "bfloat16")}
    records = interleave({name: fn for name, (fn, _) in fns.items()}, 3, device)
    rates = {name: flops / statistics.median(r["seconds"] for r in records[name]) for name, (_, flops) in fns.items()}
    return rates | {"n": n}
