"""One GPU check: bf16 + gradient-checkpointing distill steps of a t5-large-shaped model, peak memory against
bench/memory.py's prediction, and a quick inference benchmark (bench/inference.py). Writes `gpu_check.json`.

    python -m bench.gpu_check --out OUT_DIR                          # CUDA, t5-large shape (bench/gpu_check.sh)
    python -m bench.gpu_check --device cpu --tiny --out OUT_DIR      # the plumbing on a tiny shape (tests)

The model is random, built from a T5 v1.1-large config (no download). Peak memory is
`torch.cuda.max_memory_allocated()` over the steps with the model and batch on the device (on the CPU: the live
tensor bytes of bench.memory.LiveTensorTracker), compared with `bench.memory.predict` for the same workload.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from bench import inference, memory
from bench.common import MODES, environment

GPU_WORKLOAD = memory.Workload(batch_size=8, instruction_len=512, input_len=256, output_len=64, num_groups=64)
TINY_WORKLOAD = memory.Workload(
    batch_size=4, instruction_len=24, input_len=16, output_len=8, num_groups=6, unique_instructions=2, r=8,
    hypernetwork_hidden_size=32, module_embedding_dim=16,
)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny T5 shape and workload instead of t5-large")
    parser.add_argument("--steps", type=int, default=3, help="distill steps measured")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu --tiny for the plumbing")
    started = time.perf_counter()
    if args.tiny:
        shape, config, workload = "t5-tiny", memory.VALIDATION_SHAPES["t5-small-ish"](), TINY_WORKLOAD
    else:
        shape, config, workload = "t5-large", memory.MODELS["t5-large"](), GPU_WORKLOAD
    report: dict = {"device": str(device), "shape": shape, "workload": dataclasses.asdict(workload),
                    "dtype": args.dtype, "checkpointing": args.checkpointing, "environment": environment(device)}  # fmt: skip
    print(f"distill steps: {shape}, {args.dtype}, checkpointing {'on' if args.checkpointing else 'off'}, "
          f"{dataclasses.asdict(workload)}", flush=True)  # fmt: skip
    measured = memory.measure(config, workload, "distill", args.dtype, args.checkpointing, args.steps, str(device))
    predicted = memory.predict(config, workload, "distill", args.dtype, args.checkpointing)
    peak = measured.get("cuda_peak", measured["peak"])
    report["distill"] = {
        "measured": measured,
        "measured_peak_bytes": peak,
        "measured_method": "torch.cuda.max_memory_allocated" if "cuda_peak" in measured else "LiveTensorTracker",
        "predicted": predicted,
        "predicted_over_measured": predicted["peak"] / peak,
        "finite_losses": all(torch.isfinite(torch.tensor(measured["losses"])).tolist()),
    }
    print(f"peak {peak / 2**30:.3f} GiB measured, {predicted['peak'] / 2**30:.3f} GiB predicted "
          f"(ratio {predicted['peak'] / peak:.3f}); losses {measured['losses']}", flush=True)  # fmt: skip

    sizes = MODES["smoke" if args.tiny else "quick"]
    sizes = dataclasses.replace(sizes, repeats=1 if args.tiny else 3)
    result = inference.run(sizes, device)
    report["inference"] = {"mode": sizes.mode, **result}
    for name, entry in result["ratios"].items():
        print(
            f"inference {name}: {entry['value']:.3f}"
            + (f" (goal <= {entry['goal_max']})" if entry.get("goal_max") else "")
        )
    report["wall_time_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
