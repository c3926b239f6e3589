"""3. A mixed-task batch: every input from another task, each row with its own adapter, in one forward pass.

The per-example adapters are a `TaskWeights` with one (A, B) pair per task and a `row_index`, applied with
`tagi.apply_task_weights` (the `TagiLinear` layers gather each row's pair and use batched matmuls). They are generated
once, before timing (a server caches one adapter per task). The reference is the same batch through a model with one
LoRA merged into its weights, which costs exactly the plain base model (merging changes values, not shapes), so the
plain base model stands for it.
"""

from __future__ import annotations

import torch

from bench.common import (
    Sizes,
    interleaved,
    lora_model,
    plain_model,
    progress,
    ratio_entry,
    summary,
    tagi_model,
    tokens,
)

GOAL = 1.3


def run(s: Sizes, device: torch.device, repeats: int | None = None) -> dict:
    from peft_tagi import TaskWeights

    repeats = s.mixed_repeats if repeats is None else repeats
    n = s.mixed_tasks
    generator = torch.Generator().manual_seed(0)
    instructions = tokens(n, s.instruction_len, s, generator).to(device)
    inputs = tokens(n, s.input_len, s, generator).to(device)
    labels = tokens(n, s.output_len, s, generator).to(device)
    mask = torch.ones_like(inputs)
    tagi = tagi_model(s, device, fusion=True)
    base = plain_model(s, device)
    lora = lora_model(s, device)
    with torch.no_grad():
        generated = tagi.base_model.task_weights_from_instructions(instructions, torch.ones_like(instructions))
    n_tasks = next(iter(generated.weights.values()))[0].shape[0]
    if n_tasks != n:
        raise RuntimeError(f"expected {n} distinct tasks, the random instructions gave {n_tasks}")
    # One adapter per row, no instruction states: the cost of per-example LoRA alone.
    per_example = TaskWeights(weights=generated.weights, row_index=generated.row_index, states=None, states_mask=None)
    # The same with instruction fusion: the decoder also attends to each row's instruction states.
    per_example_fusion = generated

    def forward_under(weights):
        def fn():
            with tagi.base_model.apply_task_weights(weights):
                return tagi(input_ids=inputs, attention_mask=mask, labels=labels).loss

        return fn

    fns = {
        "per_example_adapters": forward_under(per_example),
        "merged_lora": lambda: base(input_ids=inputs, attention_mask=mask, labels=labels).loss,
        "per_example_adapters_fusion": forward_under(per_example_fusion),
        "single_lora_unmerged": lambda: lora(input_ids=inputs, attention_mask=mask, labels=labels).loss,
    }
    with torch.no_grad():
        times = interleaved(fns, repeats, max(s.warmup, 1 if repeats > 1 else 0), device, label="mixed batch")
    ratios = {
        "per_example/merged": ratio_entry(times, "per_example_adapters", "merged_lora", GOAL),
        "per_example_fusion/merged": ratio_entry(
            times,
            "per_example_adapters_fusion",
            "merged_lora",
            GOAL,
            note=(
                "fusion adds cross-attention to each row's instruction states; their keys / values were projected "
                "once per task in the warm-up round and are cached with the task weights, as a server keeps them"
            ),
        ),  # fmt: skip
        "single_lora_unmerged/merged": ratio_entry(times, "single_lora_unmerged", "merged_lora"),
        "per_example/single_lora_unmerged": ratio_entry(times, "per_example_adapters", "single_lora_unmerged"),
    }
    progress("  mixed batch done")
    return {
        "description": (
            f"{n} inputs ({s.input_len} tokens) from {n} tasks with per-example adapters (TaskWeights of {n} entries "
            f"+ row_index, r={s.r}), forward with {s.output_len} label tokens, against the same batch under one merged "
            "LoRA (= the plain base model's cost)."
        ),
        "absolute": {name: summary(values) for name, values in times.items()},
        "ratios": ratios,
        "details": {"tasks": n, "input_len": s.input_len, "output_len": s.output_len, "r": s.r},
        "notes": ["adapters generated before timing (cached per task, as a server would)"],
    }
