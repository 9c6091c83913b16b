"""BENCHMARKS.md from the results of a run: the template's fixed prose, the tables, computed sentences.

`BENCHMARKS.template.md` holds what is true of every run (the method, the GPU command, what the
figures mean); this module fills in the figures and every sentence that draws a conclusion, each
computed from them: a difference is called one only when every round shows it by both clocks.
"""

from __future__ import annotations

from pathlib import Path
from string import Template

from phi3mm.bench import audio

TEMPLATE = Path(__file__).with_name("BENCHMARKS.template.md")
MIN_ROUNDS = 3  # fewer rounds never make a difference


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if abs(n) >= 10 * 2**20 else f"{n / 2**20:.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _side(r: dict) -> int:
    """-1 if every round is below 1.0 by both clocks, 1 if every round is above, else 0 (noise)."""
    if r["rounds"] < MIN_ROUNDS:
        return 0
    return -1 if r["max"] < 1 and r["cpu"]["max"] < 1 else 1 if r["min"] > 1 and r["cpu"]["min"] > 1 else 0


def _noise(r: dict) -> str:
    if r["rounds"] < MIN_ROUNDS:
        return f"{r['rounds']} round(s), too few to tell"
    return "rounds on both sides of 1.0" + ("" if r["min"] <= 1 <= r["max"] else " by CPU time")


def compare(r: dict, what: str) -> str:
    """A time ratio ours / LLaVA in words, with its spread."""
    spread = f"ratio {r['median']:.3f}, rounds {r['min']:.3f}-{r['max']:.3f}, CPU time {r['cpu']['median']:.3f}"
    if side := _side(r):
        return (f"{what}: ours takes {abs(1 - r['median']):.1%} {'less' if side < 0 else 'more'} time than LLaVA "
                f"in every one of {r['rounds']} rounds ({spread})")  # fmt: skip
    return f"{what}: no difference beyond noise ({_noise(r)}; {spread})"


def speedup(r: dict) -> str:
    """A speed-up (time before / time after) in words, with its spread."""
    spread = f"rounds {r['min']:.2f}-{r['max']:.2f}, CPU time {r['cpu']['median']:.2f}x"
    if side := _side(r):
        return f"{r['median']:.2f}x faster ({spread})" if side > 0 else f"{1 / r['median']:.2f}x slower ({spread})"
    return f"no faster beyond noise ({r['median']:.2f}x, {_noise(r)}; {spread})"


def summary(results: dict) -> list[str]:
    lines = []
    for name, r in results["sizes"].items():
        t, pf, vf = r["train"], r["prefill"], r["train"]["vision_features"]
        whole = min(vf["share_of_tower_removed"], vf["share_of_tower_removed_cpu"]) >= 0.9 and not vf["tower_calls_with_features"]
        lines += [
            f"- **{name}**, {compare(t['ratio_ours_llava'], 'training step')}; model FLOPs "
            f"{t['flop_ratio_ours_llava']:.3f}x.",
            f"- **{name}**, {compare(r['qlora']['ratio_ours_llava'], 'QLoRA step')}.",
            *(f"- **{name}**, {compare(g['ratio_decode_time_ours_llava'], f'decode, {precision}')}."
              for precision, g in r["generation"]["precisions"].items()),
            f"- **{name}**, precomputed features take {vf['share_of_tower_removed']:.0%} of the tower's time off the "
            f"step ({vf['share_of_tower_removed_cpu']:.0%} by CPU time; the tower ran {vf['tower_calls_with_features']} "
            f"times): {'its whole cost' if whole else 'short of the 90% goal by one clock or both'}; the tower is "
            f"{vf['tower_share_of_step']:.0%} of the step.",
            f"- **{name}**, with pooling 2 the language model's prefill is {speedup(pf['pool2_speedup_features'])}, "
            f"{'meeting' if pf['pool2_speedup_features']['median'] >= 3 else 'short of'} the 3x goal (FLOPs predict "
            f"{pf['pool2_flop_ratio']['features']:.2f}x); with the tower {pf['pool2_speedup']['median']:.2f}x "
            f"({pf['pool2_flop_ratio']['tower']:.2f}x predicted).",
        ]  # fmt: skip
        if name == "phi35":
            peak = r["qlora"]["runs"]["ours"]["peak_memory"]
            lines.append(f"- **{name}**, QLoRA peak memory {peak / 1e9:.2f} GB: {'within' if peak <= 10e9 else 'over'} "
                         "the 10 GB goal.")  # fmt: skip
    pad = results["padding"]
    lines.append(f"- Length grouping keeps padding efficiency at {pad['grouped']:.1%} at batch {pad['batch_size']} "
                 f"({'meeting' if pad['grouped'] >= 0.95 else 'short of'} the 95% goal); random batches "
                 f"{pad['random']:.1%}.")  # fmt: skip
    return lines


def run_section(results: dict) -> list[str]:
    m, load, rates = results["machine"], results["load_average"], results["matmul_rates"]
    threads, cores = m["torch_threads"], m["usable_cpus"]
    if max(load) > cores:
        note = ("other work took CPU time during the run, so absolute times are inflated; the per-round ratios, "
                "CPU time's the steadiest, are what to read")
    elif max(load) > threads + 0.5:
        note = f"other work ran alongside this run's {threads} thread(s), within the {cores} cores"
    else:
        note = f"nothing but this run's {threads} thread(s) loaded the machine"  # fmt: skip
    return [
        f"- Command: `{results['command']}`, {results['date']}, {results['seconds'] / 60:.1f} min in all.",
        f"- Machine: {m['cpu']}, {cores} usable cores, {m['memory_gb']} GiB RAM" + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']} ({threads} thread(s)), transformers {m['transformers']}, bitsandbytes "
        f"{m.get('bitsandbytes', '-')}, Python {m['python']}.",
        f"- Device {results['device']}, weights {next(iter(results['sizes'].values()))['dtype']}. A {rates['n']}x{rates['n']} matmul "
        f"runs at {rates['float32'] / 1e9:.1f} GFLOP/s in float32 and {rates['bfloat16'] / 1e9:.1f} in bfloat16: "
        + ("bf16 generation is measured and the 4-bit layers compute in bf16 (the training default)." if results["fast_bf16"]
           else "bf16 runs at less than half the float32 rate here, so bf16 generation is left out and the 4-bit layers "
           "compute in float32 (on a CPU with bf16 instructions they would use the training default, bf16)."),
        f"- Load average (1 min) at the start and after each section: {', '.join(map(str, load))}; max {max(load)} "
        f"on {cores} cores: {note}.",
    ]  # fmt: skip


def _table(header: str, rows: list[str]) -> list[str]:
    return ["", header, "|---" * (header.count("|") - 1) + "|", *rows]


def size_section(name: str, r: dict) -> list[str]:
    c, p, t, pf, g, nc, q = (r[k] for k in ("config", "parameters", "train", "prefill", "generation", "no_cache", "qlora"))
    lines = [
        "", f"## Size `{name}`", "",
        f"Phi-3 {c['text_width']} wide x {c['text_layers']} layers (MLP {c['text_intermediate']}, {c['vocab_size']} "
        f"rows); CLIP {c['vision_width']} wide x {c['vision_layers']} layers, {c['image_size']} px / patch "
        f"{c['patch_size']}: {r['image_tokens']} image tokens ({r['image_tokens_pool2']} with pooling 2). Parameters "
        f"{_count(p['total'])}: tower {_count(p['vision_tower'])}, projector {_count(p['projector'])}, language model "
        f"{_count(p['language_model'])}, head {_count(p['lm_head'])}. Timed rounds a measurement: {r['repeats']} "
        f"({nc['runs']['loop_no_cache']['repeats']} for the loop without cache); {r['seconds']:.0f} s in all.",
        "", f"### Training step, batch {t['batch_size']} x {t['seq_len']} tokens",
    ]  # fmt: skip
    rows = []
    for key, label in (("ours", "ours | pixels"), ("llava", "LLaVA | pixels"), ("ours_features", "ours | precomputed features"),
                       ("ours_pool2", f"ours, pooling 2 | pixels ({t['pooled_seq_len']} tokens)")):  # fmt: skip
        x = t["runs"][key]
        rows.append(f"| {label} | {_ms(x['seconds'])} | {x['samples_per_s']:.2f} | {_mib(x['peak_memory'])} "
                    f"({_mib(x['weights_bytes'])} + {_mib(x['memory_increase'])}) | {x['flops'] / 1e9:,.1f} G | {x['mfu']:.1%} |")  # fmt: skip
    lines += _table("| model | input | step | samples/s | peak memory (weights + step) | model FLOPs | MFU |", rows)
    mfu = t["runs"]["ours"]["mfu"]
    lines += [
        "", f"- {compare(t['ratio_ours_llava'], 'Step')}; model FLOPs predict {t['flop_ratio_ours_llava']:.3f}x.",
        f"- The tower's forward alone: {_ms(t['runs']['vision_tower_forward']['seconds'])}. With pooling 2 the step is "
        f"{speedup(t['pool2_step_speedup'])}.",
        f"- Arithmetic limit {t['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; at {mfu:.0%} MFU our step is "
        + ("bound by arithmetic." if mfu >= 0.5 else "bound by per-call overhead more than by arithmetic, so its "
           "ratios say more than its times."),
        "", f"### Prefill, {pf['prompt_tokens']}-token prompt with one image ({pf['pooled_prompt_tokens']} with pooling 2)",
    ]  # fmt: skip
    labels = {"ours": "ours | pixels", "llava": "LLaVA | pixels", "ours_pool2": "ours, pooling 2 | pixels",
              "ours_features": "ours | precomputed features", "ours_pool2_features": "ours, pooling 2 | precomputed features"}
    lines += _table("| model | input | prefill |", [f"| {labels[k]} | {_ms(x['seconds'])} |" for k, x in pf["runs"].items()])
    lines += [
        "", f"- {compare(pf['ratio_ours_llava'], 'Prefill')}.",
        f"- With pooling 2 the prefill is {speedup(pf['pool2_speedup'])} with the tower (FLOPs predict "
        f"{pf['pool2_flop_ratio']['tower']:.2f}x), {speedup(pf['pool2_speedup_features'])} for the language model "
        f"alone ({pf['pool2_flop_ratio']['features']:.2f}x predicted); 4x fewer image tokens cannot give 4x: the tower "
        f"encodes every patch either way and the {pf['text_tokens']} text tokens are not pooled.",
        "", f"### Generation, greedy `generate`, {g['new_tokens']} new tokens with the KV cache",
    ]  # fmt: skip
    rows = [f"| {precision} | {label} | {_mib(x['weights_bytes'])} | {_ms(x['ttft_s'])} | {x['decode_tokens_per_s']:.1f} |"
            for precision, gp in g["precisions"].items()
            for label, x in (("ours", gp["runs"]["ours"]), ("LLaVA", gp["runs"]["llava"]))]  # fmt: skip
    lines += _table("| precision | model | weights | TTFT | decode tokens/s |", rows) + [""]
    lines += [f"- {precision}: {compare(gp['ratio_ttft_ours_llava'], 'TTFT')}." for precision, gp in g["precisions"].items()]
    a, b = nc["runs"]["generate_kv_cache"], nc["runs"]["loop_no_cache"]
    lines += [
        f"- Without the KV cache (a loop re-running the whole forward per token, as earlier projects did) "
        f"{nc['new_tokens']} tokens take {_ms(b['seconds'])}, with it {_ms(a['seconds'])}: "
        f"`generate` is {speedup(nc['speedup_total'])}.",
        "", f"### QLoRA step, batch {q['batch_size']} x {q['seq_len']}", "",
        f"4-bit NF4 base, LoRA r={q['lora_r']} on every Phi-3 linear, projector trained ({_count(q['trainable_parameters'])} "
        f"trainable), as `phi3mm.training.prepare_for_training` sets it up; gradient checkpointing "
        f"{'on' if q['gradient_checkpointing'] else 'off'}, autocast {q['autocast'] or 'none'}, the 4-bit layers "
        f"computing in {q['bnb_compute_dtype']}.",
    ]  # fmt: skip
    rows = [f"| {label} | {_ms(x['seconds'])} | {x['samples_per_s']:.2f} | {_mib(x['peak_memory'])} "
            f"({_mib(x['weights_bytes'])} + {_mib(x['memory_increase'])}) |"
            for label, x in (("ours", q["runs"]["ours"]), ("LLaVA", q["runs"]["llava"]))]  # fmt: skip
    return lines + _table("| model | step | samples/s | peak memory (weights + step) |", rows)


def padding_section(pad: dict) -> list[str]:
    kinds = "; ".join(f"{name} {k['share']:.0%} (median {k['median_length']:.0f})" for name, k in pad["kinds"].items())
    return [
        f"{pad['rows']:,} rows written as LLaVA-1.5's instruction mix is shaped, with real image files, read by "
        f"`phi3mm.data.LlavaDataset`, whose `lengths` (the chat template tokenized, {pad['image_tokens']} tokens an "
        f"image) the batches are scored on. Kinds of row, share and median tokens: {kinds}. All rows: mean "
        f"{pad['mean_length']:.0f}, median {pad['median_length']:.0f}, p99 {pad['p99_length']:.0f}, longest "
        f"{pad['max_length']}. The tokenizer is {pad['tokenizer']}; the text is English words of the tiny tokenizer's "
        f"corpus, {pad['tokens_per_word']:.2f} tokens a word (`phi3mm/bench/padding.py`).",
        *_table(f"| batching, batch {pad['batch_size']} | padding efficiency |",
                [f"| random | {pad['random']:.1%} |",
                 f"| length-grouped (`LengthGroupedSampler`, as `MultimodalTrainer` batches) | {pad['grouped']:.1%} |"]),
        "", f"Grouping cuts the tokens computed per real token from {1 / pad['random']:.2f} to {1 / pad['grouped']:.2f}.",
    ]  # fmt: skip


def render_markdown(results: dict) -> str:
    """BENCHMARKS.md from the results of `phi3mm.bench.run` (every figure comes from there)."""
    gpu = (f"Measured on {results['machine']['gpu']} (the tables above)." if results["device"] == "cuda" else
           "**No GPU was available for this run; no GPU figures are given here.**")  # fmt: skip
    sizes = [line for name, r in results["sizes"].items() for line in size_section(name, r)]
    audio_section = results.get("audio", {"skipped": "measured on the CPU runs only"})
    return Template(TEMPLATE.read_text()).substitute(
        summary="\n".join(summary(results)), run="\n".join(run_section(results)), sizes="\n".join(sizes),
        padding="\n".join(padding_section(results["padding"])), gpu=gpu,
        audio=f"## Audio\n\nSkipped: {audio_section['skipped']}.\n" if "skipped" in audio_section else audio.render(audio_section),
    )  # fmt: skip
