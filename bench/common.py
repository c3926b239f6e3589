"""What every benchmark shares: sizes per mode, model builders, random batches, interleaved timing, reporting.

Timing rule: the variants compared in one table run in the same loop, round after round (the order rotates each
round), so that whatever else the machine is doing hits all of them alike. A ratio is the median over rounds of the
per-round ratio (paired); the absolute figures are medians over rounds. On CUDA every timed call is bracketed by
`torch.cuda.synchronize()`.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import peft_tagi  # noqa: F401  (registers TAGI with PEFT)

# ---------------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Every size a benchmark uses. `FULL` is the reference; `QUICK` and `SMOKE` shrink it (see `deviations`)."""

    mode: str
    # model: t5-small-like, random weights
    d_model: int = 512
    d_ff: int = 2048
    d_kv: int = 64
    num_heads: int = 8
    num_layers: int = 6
    num_decoder_layers: int = 6
    vocab_size: int = 32128
    # lengths of SNI Def+2Pos
    instruction_len: int = 256
    input_len: int = 64
    output_len: int = 16
    # 1. inference: one task of n_instances, in batches of batch_size (the same batching for every variant)
    n_instances: int = 100
    batch_size: int = 10
    serving_batch_sizes: tuple[int, ...] = (1, 10, 100)  # the generate rows of benchmark 1
    # 3. mixed-task batch
    mixed_tasks: int = 32
    # 4. training: a batch of train_batch examples from train_tasks tasks
    train_batch: int = 8
    train_tasks: int = 4
    memory_steps: int = 2
    # adapters (lora_alpha = 2 r everywhere, as r=32 / alpha=64 in the paper's set-up)
    r: int = 32
    hypernetwork_hidden_size: int = 256
    module_embedding_dim: int = 64
    # timing
    repeats: int = 5  # timed rounds of inference and training
    generation_repeats: int = 20  # adapter generation is fast: more rounds
    mixed_repeats: int = 10
    warmup: int = 1  # untimed rounds first
    # 5. scaling: a sweep over r at the base instruction length, and over the length at the base r
    scaling_r: tuple[int, ...] = (8, 32, 128)
    scaling_t: tuple[int, ...] = (64, 256, 1024)
    scaling_repeats: int = 3
    scaling_n_instances: int | None = None  # instances per task in the scaling sweep (None: n_instances)
    scaling_memory: bool = True  # training peak memory at every point (two subprocesses each)

    @property
    def lora_alpha(self) -> int:
        return 2 * self.r

    def deviations(self) -> dict[str, tuple]:
        """Fields that differ from the full sizes: {name: (this mode's value, full value)}."""
        full = FULL
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "mode":
                continue
            mine, ref = getattr(self, f.name), getattr(full, f.name)
            if mine != ref:
                out[f.name] = (mine, ref)
        return out

    def model_key(self) -> tuple:
        return (
            self.d_model, self.d_ff, self.d_kv, self.num_heads, self.num_layers, self.num_decoder_layers,
            self.vocab_size,
        )  # fmt: skip

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_alpha"] = self.lora_alpha
        return d


FULL = Sizes(mode="full")
# Quick mode is the review run: under 150 s on 2 idle cores. Benchmark 1 keeps its headline row (generate at batch 10)
# and its forward row on 30 instances; `generate` at batch 1 and 100 is the full run's (most of its 11 minutes), and
# so is the 1024-token point of the scaling sweep.
QUICK = Sizes(
    mode="quick",
    num_layers=2,
    num_decoder_layers=2,
    n_instances=30,
    serving_batch_sizes=(10,),
    train_batch=4,
    train_tasks=2,
    repeats=3,
    generation_repeats=5,
    mixed_repeats=3,
    scaling_t=(64, 256, 512),
    scaling_repeats=2,
    scaling_n_instances=20,
    scaling_memory=False,
)
SMOKE = Sizes(
    mode="smoke",
    d_model=32,
    d_ff=64,
    d_kv=8,
    num_heads=4,
    num_layers=1,
    num_decoder_layers=1,
    vocab_size=128,
    instruction_len=16,
    input_len=8,
    output_len=4,
    n_instances=4,
    batch_size=2,
    serving_batch_sizes=(1, 2),
    mixed_tasks=4,
    train_batch=2,
    train_tasks=2,
    r=4,
    hypernetwork_hidden_size=16,
    module_embedding_dim=8,
    repeats=1,
    generation_repeats=1,
    mixed_repeats=1,
    warmup=0,
    scaling_r=(2, 4),
    scaling_t=(8, 16),
    scaling_repeats=1,
    scaling_memory=False,
)
MODES = {"full": FULL, "quick": QUICK, "smoke": SMOKE}


# ---------------------------------------------------------------------------------------------------- models

_TEMPLATES: dict[tuple, torch.nn.Module] = {}


def _new_t5(s: Sizes):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=s.vocab_size, d_model=s.d_model, d_ff=s.d_ff, d_kv=s.d_kv, num_heads=s.num_heads,
        num_layers=s.num_layers, num_decoder_layers=s.num_decoder_layers, dropout_rate=0.1,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


def base_model(s: Sizes, cache: bool = True):
    """A random-weight T5 of the benchmark's shape, on the CPU, in eval mode.

    With `cache`, the first one built is kept and later calls return deep copies (fast: random init of a 60M model
    is the slow part). Memory measurements pass `cache=False` so that no template inflates the process.
    """
    if not cache:
        return _new_t5(s)
    key = s.model_key()
    if key not in _TEMPLATES:
        _TEMPLATES[key] = _new_t5(s)
    return copy.deepcopy(_TEMPLATES[key])


def clear_templates() -> None:
    _TEMPLATES.clear()
    gc.collect()


def plain_model(s: Sizes, device: torch.device, cache: bool = True):
    """The base model itself (also stands for a model with one LoRA merged: merging changes values, not cost)."""
    return base_model(s, cache).to(device).eval()


def tagi_model(s: Sizes, device: torch.device, fusion: bool = True, cache: bool = True):
    """`get_peft_model(base, TagiConfig(...))` with r = s.r; the B heads get random weights so that ΔW ≠ 0."""
    from peft import get_peft_model

    from peft_tagi import TagiConfig

    config = TagiConfig(
        task_type="SEQ_2_SEQ_LM", r=s.r, lora_alpha=s.lora_alpha, instruction_fusion=fusion,
        hypernetwork_hidden_size=s.hypernetwork_hidden_size, module_embedding_dim=s.module_embedding_dim,
        max_instruction_length=max(1024, s.instruction_len),
    )  # fmt: skip
    model = get_peft_model(base_model(s, cache), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.base_model.tagi_hypernetwork.named_parameters():
            if ".heads_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.to(device).eval()


def lora_model(s: Sizes, device: torch.device, cache: bool = True):
    """A plain PEFT LoRA on q and v with the same r and alpha (B random, so that it is not a no-op)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=s.r, lora_alpha=s.lora_alpha, target_modules=["q", "v"], lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"
    )
    model = get_peft_model(base_model(s, cache), config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.to(device).eval()


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def hypernetwork_params(model) -> int:
    return count_params(model.base_model.tagi_hypernetwork)


# ---------------------------------------------------------------------------------------------------- data


def tokens(n: int, length: int, s: Sizes, generator: torch.Generator) -> torch.Tensor:
    """Random token ids (n, length), avoiding pad (0), eos (1) and unk (2)."""
    return torch.randint(3, s.vocab_size, (n, length), generator=generator)


def decoder_inputs(n: int, s: Sizes, generator: torch.Generator) -> torch.Tensor:
    """Teacher-forced decoder inputs (n, output_len): the start token, then output_len - 1 random tokens."""
    ids = tokens(n, s.output_len, s, generator)
    ids[:, 0] = 0
    return ids


# ---------------------------------------------------------------------------------------------------- memory


def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...), None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM (the peak resident set) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device, label: str = ""
) -> dict[str, list[float]]:
    """Run every variant `warmup` times untimed, then `repeats` rounds in which each variant runs once.

    The order rotates every round so that no variant always runs first (cold caches) or last.
    Returns {variant: [seconds per round]}.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(fns[name], device))
        if label:
            progress(f"  {label}: round {i + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def summary(values: list[float], unit: str = "s") -> dict:
    return {"median": median(values), "min": float(min(values)), "max": float(max(values)), "n": len(values),
            "values": [float(v) for v in values], "unit": unit}  # fmt: skip


def ratio_entry(
    times: dict[str, list[float]], num: str, den: str, goal_max: float | None = None, note: str | None = None
) -> dict:
    """Paired ratio num/den: the median over rounds of num[i] / den[i]; also the ratio of the medians."""
    per_round = [a / b for a, b in zip(times[num], times[den])]
    value = median(per_round)
    entry = {
        "value": value,
        "ratio_of_medians": median(times[num]) / median(times[den]),
        "per_round": per_round,
        "numerator": num,
        "denominator": den,
        "goal_max": goal_max,
        "met": None if goal_max is None else bool(value <= goal_max),
    }
    if note:
        entry["note"] = note
    return entry


def value_ratio(num: float, den: float, num_name: str, den_name: str, goal_max: float | None = None, note=None):
    """A ratio of two single figures (memory, or a once-per-task cost): no rounds to pair."""
    value = num / den
    entry = {
        "value": value,
        "numerator": num_name,
        "denominator": den_name,
        "goal_max": goal_max,
        "met": None if goal_max is None else bool(value <= goal_max),
    }
    if note:
        entry["note"] = note
    return entry


# ---------------------------------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_tagi": peft_tagi.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpus_available": available_cpus(),
        "dtype": "float32",
    }
    try:
        env["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


# ---------------------------------------------------------------------------------------------------- output


def progress(message: str) -> None:
    print(message, flush=True)


def fmt_seconds(x: float) -> str:
    if x >= 1:
        return f"{x:.3f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.2f} ms"
    return f"{x * 1e6:.1f} us"


def fmt_value(summary_: dict) -> str:
    unit = summary_.get("unit", "s")
    if unit == "s":
        return fmt_seconds(summary_["median"])
    if unit == "bytes":
        return f"{summary_['median'] / 2**20:.1f} MiB"
    return f"{summary_['median']:.4g} {unit}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def verdict(entry: dict) -> str:
    if entry.get("goal_max") is None:
        return ""
    return "met" if entry["met"] else "MISSED"


def print_result(title: str, result: dict) -> None:
    """Print one benchmark: what it measures, its absolute figures (medians) and its ratios against the goals."""
    print(f"\n=== {title} ===")
    print(result["description"])
    rows = [[name, fmt_value(s), f"{s['n']}"] for name, s in result["absolute"].items()]
    print(table(["variant", "median", "rounds"], rows))
    print()
    rows = []
    for name, e in result["ratios"].items():
        goal = "" if e.get("goal_max") is None else f"<= {e['goal_max']:g}"
        rows.append([name, f"{e['value']:.3f}", goal, verdict(e)])
    print(table(["ratio", "value", "goal", ""], rows))
    for note in result.get("notes", []):
        print(f"note: {note}")
    missed = [name for name, e in result["ratios"].items() if e.get("met") is False]
    if missed:
        print("GOAL MISSED: " + "; ".join(f"{n} = {result['ratios'][n]['value']:.3f} > {result['ratios'][n]['goal_max']:g}"
                                          for n in missed))  # fmt: skip


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
