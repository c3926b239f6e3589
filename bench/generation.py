"""2. Adapter generation latency: one instruction -> `TaskAdapter`, against one encoder forward of that instruction.

`generate_adapter` = encoding the instruction with the base encoder (adapters off) + the hypernetwork + copying the
weights (and, with fusion, the instruction states) into a `TaskAdapter`. The reference is the plain base model's
encoder on the same instruction: the least any method that reads the instruction must spend.
"""

from __future__ import annotations

import torch

from bench.common import (
    Sizes,
    count_params,
    interleaved,
    plain_model,
    progress,
    ratio_entry,
    summary,
    tagi_model,
    tokens,
)

GOAL = 1.5


def run(s: Sizes, device: torch.device, repeats: int | None = None) -> dict:
    repeats = s.generation_repeats if repeats is None else repeats
    generator = torch.Generator().manual_seed(0)
    instruction = tokens(1, s.instruction_len, s, generator).to(device)
    mask = torch.ones_like(instruction)
    tagi = tagi_model(s, device, fusion=True)
    base = plain_model(s, device)
    encoder = base.get_encoder()
    hypernetwork = tagi.base_model.hypernetwork
    with torch.no_grad():
        states = encoder(input_ids=instruction, attention_mask=mask).last_hidden_state
        fns = {
            "generate_adapter": lambda: tagi.base_model.generate_adapter(instruction, mask),
            "encoder_forward": lambda: encoder(input_ids=instruction, attention_mask=mask),
            "hypernetwork_only": lambda: hypernetwork(states, mask),
        }
        times = interleaved(fns, repeats, max(s.warmup, 1 if repeats > 1 else 0), device, label="generation")
    ratios = {
        "generate_adapter/encoder_forward": ratio_entry(times, "generate_adapter", "encoder_forward", GOAL),
        "hypernetwork_only/encoder_forward": ratio_entry(times, "hypernetwork_only", "encoder_forward"),
    }
    details = {
        "instruction_len": s.instruction_len,
        "r": s.r,
        "hypernetwork_params": count_params(tagi.base_model.tagi_hypernetwork),
        "base_params": count_params(base),
        "encoder_params": count_params(encoder),
    }
    progress("  generation done")
    return {
        "description": (
            f"One instruction of {s.instruction_len} tokens -> TaskAdapter (generate_adapter: encode + hypernetwork "
            f"+ copy, r={s.r}) against one forward of the base encoder on that instruction."
        ),
        "absolute": {name: summary(values) for name, values in times.items()},
        "ratios": ratios,
        "details": details,
        "notes": [
            f"hypernetwork: {details['hypernetwork_params'] / 1e6:.1f}M parameters; base model "
            f"{details['base_params'] / 1e6:.1f}M (encoder {details['encoder_params'] / 1e6:.1f}M incl. embeddings)"
        ],
    }
