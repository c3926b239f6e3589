"""1. Inference for one task of n instances: the instruction read once (TAGI) against the instruction read n times.

Variants, all with the same batching and the same decoding work (greedy `generate` of exactly output_len tokens, as
users serve, or a teacher-forced forward over the output tokens):

(a) concat:   the base model + a plain PEFT LoRA (q, v), reading [instruction ; input] for every instance
              (meta-train style, as Tk-Instruct).
(b) tagi:     TAGI with instruction fusion: `generate_adapter` once (its time is part of the task's total), then
              one `use_adapter` block around all batches, inputs alone; the decoder cross-attends to the instruction,
              whose cross-attention keys and values are projected once for the task and shared by every row
              (`peft_tagi/fusion.py`: the cross-attention cache holds the input part only).
(c) merged:   a TAGI model without fusion: `generate_adapter` once, then one `use_adapter(adapter, merge=True)`
              block around all batches (all of it timed, merging and restoring the weights included).
(d) base:     the base model on the input alone: the floor, which (a) and (b) can approach but not pass.

`run` measures one batch size and one decoding mode; `run_serving` runs the headline grid: `generate` at every batch
size of `Sizes.serving_batch_sizes`, then the teacher-forced forward at `Sizes.batch_size` as a secondary row.
"""

from __future__ import annotations

import dataclasses

import torch

from bench.common import (
    Sizes,
    decoder_inputs,
    interleaved,
    lora_model,
    plain_model,
    progress,
    ratio_entry,
    summary,
    tagi_model,
    timed,
    tokens,
)

VARIANTS = ("a_concat_lora", "b_tagi_fusion", "c_tagi_merged", "d_base_input_only")
GOAL_B_OVER_A = 0.55  # the limit is d/a, 0.48 at the full sizes with generate at batch 10
GOAL_B_OVER_D = 1.15
GOAL_C_OVER_D = 1.02


def _decode_fn(s: Sizes, decode: str):
    if decode == "forward":

        def run(model, ids, mask, dec):
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits

    elif decode == "generate":

        def run(model, ids, mask, dec):
            return model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=s.output_len, min_new_tokens=s.output_len,
                do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=1,
            )  # fmt: skip

    else:
        raise ValueError(f"decode must be 'forward' or 'generate', got {decode!r}")
    return run


def run(
    s: Sizes, device: torch.device, decode: str = "forward", variants=VARIANTS, repeats: int | None = None
) -> dict:
    repeats = s.repeats if repeats is None else repeats
    generator = torch.Generator().manual_seed(0)
    n, bs = s.n_instances, s.batch_size
    instruction = tokens(1, s.instruction_len, s, generator).to(device)
    instruction_mask = torch.ones_like(instruction)
    inputs = tokens(n, s.input_len, s, generator)
    dec = decoder_inputs(n, s, generator)
    concat = torch.cat([instruction.cpu().expand(n, -1), inputs], dim=1)

    def batches(ids):
        out = []
        for start in range(0, n, bs):
            chunk = ids[start : start + bs].to(device)
            out.append((chunk, torch.ones_like(chunk), dec[start : start + bs].to(device)))
        return out

    input_batches, concat_batches = batches(inputs), batches(concat)
    decode_batch = _decode_fn(s, decode)

    def run_batches(model, batch_list):
        for ids, mask, d in batch_list:
            decode_batch(model, ids, mask, d)

    fns, details, notes = {}, {}, []
    generation_times: list[float] = []
    c_generation_times: list[float] = []
    with torch.no_grad():
        if "a_concat_lora" in variants:
            lora = lora_model(s, device)
            fns["a_concat_lora"] = lambda: run_batches(lora, concat_batches)
        if "b_tagi_fusion" in variants:
            tagi_b = tagi_model(s, device, fusion=True)

            def task_b():
                holder = {}

                def generate():
                    holder["adapter"] = tagi_b.base_model.generate_adapter(instruction, instruction_mask)[0]

                generation_times.append(timed(generate, device))  # synchronised: part of the task's total
                with tagi_b.base_model.use_adapter(holder["adapter"]):
                    run_batches(tagi_b, input_batches)

            fns["b_tagi_fusion"] = task_b
        if "c_tagi_merged" in variants:
            tagi_c = tagi_model(s, device, fusion=False)

            def task_c():
                holder = {}

                def generate():
                    holder["adapter"] = tagi_c.base_model.generate_adapter(instruction, instruction_mask)[0]

                c_generation_times.append(timed(generate, device))
                with tagi_c.base_model.use_adapter(holder["adapter"], merge=True):
                    run_batches(tagi_c, input_batches)

            fns["c_tagi_merged"] = task_c
        if "d_base_input_only" in variants:
            base = plain_model(s, device)
            fns["d_base_input_only"] = lambda: run_batches(base, input_batches)

        times = interleaved(fns, repeats, s.warmup, device, label="inference")

    absolute = {name: summary(values) for name, values in times.items()}
    ratios = {}
    if "b_tagi_fusion" in times and "a_concat_lora" in times:
        ratios["b/a tagi_vs_concat"] = ratio_entry(times, "b_tagi_fusion", "a_concat_lora", GOAL_B_OVER_A)
    if "c_tagi_merged" in times and "d_base_input_only" in times:
        # Serving at the floor is the claim for (c); the adapter's generation is a once-per-task cost shown apart.
        generated = c_generation_times[-len(times["c_tagi_merged"]) :]
        serving = {"c_serving": [c - g for c, g in zip(times["c_tagi_merged"], generated)], **times}
        absolute["c_serving_part"] = summary(serving["c_serving"])
        absolute["c_adapter_generation_part"] = summary(generated)
        ratios["c/d merged_vs_base"] = ratio_entry(
            serving, "c_serving", "d_base_input_only", GOAL_C_OVER_D,
            note="serving: merge + all batches + restoring the weights (generate_adapter, once per task, excluded)",
        )  # fmt: skip
        ratios["c_total/d"] = ratio_entry(
            times, "c_tagi_merged", "d_base_input_only", note="the task's total, generate_adapter included"
        )
    if "b_tagi_fusion" in times and "d_base_input_only" in times:
        ratios["b/d tagi_vs_base"] = ratio_entry(times, "b_tagi_fusion", "d_base_input_only", GOAL_B_OVER_D)
    if "a_concat_lora" in times and "d_base_input_only" in times:
        ratios["a/d concat_vs_base"] = ratio_entry(times, "a_concat_lora", "d_base_input_only")
        ratios["d/a base_vs_concat (limit)"] = ratio_entry(
            times, "d_base_input_only", "a_concat_lora", note="the least b/a can be: the input alone"
        )
    if generation_times:
        # the warm-up calls also generated adapters: keep the timed rounds only
        generation_times = generation_times[-len(times["b_tagi_fusion"]) :]
        absolute["b_adapter_generation_part"] = summary(generation_times)
        details["b_generation_share_of_task"] = float(
            absolute["b_adapter_generation_part"]["median"] / absolute["b_tagi_fusion"]["median"]
        )
    t, i = s.instruction_len, s.input_len
    details.update(
        {
            "decode": decode,
            "n_instances": n,
            "batch_size": bs,
            "instruction_len": t,
            "input_len": i,
            "output_len": s.output_len,
            "r": s.r,
            "encoder_token_ratio_b_over_a": (t + n * i) / (n * (t + i)),
            "instances_per_s": {name: n / absolute[name]["median"] for name in times},
        }
    )
    notes.append(
        f"per task of {n} instances in batches of {bs}; the decoder of (a) and (b) attends to {t + i} states "
        f"each; (a) encodes and projects to cross-attention keys / values {t + i} tokens per instance, (b) {i} plus "
        f"the instruction's {t} once per task; encoder tokens (t + n*i)/(n*(t + i)) = "
        f"{details['encoder_token_ratio_b_over_a']:.3f}"
    )
    progress(f"  inference done ({decode})")
    return {
        "description": (
            f"One task of {n} instances, batch {bs}, {decode} over {s.output_len} output tokens: (a) plain LoRA reading "
            f"instruction ({t}) + input ({i}); (b) TAGI, adapter generated once (included), fusion states cached; "
            "(c) TAGI without fusion, adapter generated once and merged for the block (included); (d) base model, "
            "input only (the floor)."
        ),
        "absolute": absolute,
        "ratios": ratios,
        "details": details,
        "notes": notes,
    }


def run_serving(s: Sizes, device: torch.device, repeats: int | None = None) -> dict:
    """The serving grid: `generate` at each of `s.serving_batch_sizes` (the headline rows), then the teacher-forced
    forward at `s.batch_size` (secondary). The top-level ratios and times are those of `generate` at
    `s.batch_size`; every row is in `rows`, each with its own interleaved rounds."""
    rows = []
    batch_sizes = sorted(set(s.serving_batch_sizes) | {s.batch_size})
    for decode, batch_size in [("generate", bs) for bs in batch_sizes] + [("forward", s.batch_size)]:
        progress(f"  inference: {decode} at batch {batch_size}")
        result = run(dataclasses.replace(s, batch_size=batch_size), device, decode=decode, repeats=repeats)
        rows.append({"decode": decode, "batch_size": batch_size, **result})
    headline = next(r for r in rows if r["decode"] == "generate" and r["batch_size"] == s.batch_size)
    headline_ratios = ("b/a tagi_vs_concat", "b/d tagi_vs_base", "c/d merged_vs_base", "d/a base_vs_concat (limit)")
    table_rows = {
        f"{r['decode']} batch {r['batch_size']}": {name: r["ratios"][name]["value"] for name in headline_ratios}
        | {name: r["absolute"][name]["median"] for name in VARIANTS}
        for r in rows
    }
    return {
        **headline,
        "description": (
            f"Serving one task: greedy generate at batch sizes {batch_sizes} (headline: batch "
            f"{s.batch_size}) and a teacher-forced forward at batch {s.batch_size}. " + headline["description"]
        ),
        "rows": rows,
        "table": table_rows,
    }
