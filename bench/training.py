"""4. Training: a TAGI distillation step against a plain PEFT LoRA step on the same batch; time and peak memory.

distill step (as `TagiTrainer` stage "distill" computes it): the student forward with instruction ids (the base
encoder encodes each unique instruction once, the hypernetwork generates the weights, the decoder fuses the
instruction states), the teacher forward on the same frozen base under `apply_task_weights(meta LoRA)` reading
instruction + input with no gradient, KL on the label-token logits (T = 2, weight 5), ΔW alignment against a bank of
per-task teacher LoRAs (weight sigmoid(L_ins)), backward, AdamW step (hypernetwork parameters).

lora step: a plain PEFT LoRA (q, v, same r) reading instruction + input (the meta-train alternative), CE, backward,
AdamW step (LoRA parameters).

Peak memory: each variant runs in a fresh subprocess (`python -m bench.training --worker ...`).
CUDA: `torch.cuda.max_memory_allocated()` over model load + steps (all tensors the process allocates).
CPU: torch's CPU tensors are invisible to tracemalloc, so the figure is resident memory: the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs after the model is loaded) minus its RSS before the model was built
(i.e. after the imports). It counts weights, activations, gradients, optimizer states and whatever the allocator
keeps; the interpreter and libraries are left out. Without clear_refs it falls back to ru_maxrss.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import (
    Sizes,
    count_params,
    interleaved,
    lora_model,
    progress,
    ratio_entry,
    reset_peak_rss,
    status_kib,
    summary,
    tagi_model,
    tokens,
    value_ratio,
)

TIME_GOAL = 2.0
MEMORY_GOAL = 1.25
VARIANTS = ("distill", "lora")
ROOT = Path(__file__).resolve().parents[1]


def make_batch(s: Sizes, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    b = s.train_batch
    task_of_row = torch.arange(b) % s.train_tasks
    task_instructions = tokens(s.train_tasks, s.instruction_len, s, generator)
    instructions = task_instructions[task_of_row]
    inputs = tokens(b, s.input_len, s, generator)
    labels = tokens(b, s.output_len, s, generator)
    teacher = torch.cat([instructions, inputs], dim=1)
    batch = {
        "input_ids": inputs,
        "attention_mask": torch.ones_like(inputs),
        "instruction_input_ids": instructions,
        "instruction_attention_mask": torch.ones_like(instructions),
        "teacher_input_ids": teacher,
        "teacher_attention_mask": torch.ones_like(teacher),
        "labels": labels,
        "task_index": task_of_row,
    }
    return {k: v.to(device) for k, v in batch.items()}


def _random_bank(targets, n: int, r: int, seed: int, device: torch.device):
    """A bank of n LoRAs for the TAGI targets, B random (a trained teacher is not zero); returned detached."""
    from peft_tagi.teachers import LoraBank

    torch.manual_seed(seed)
    bank = LoraBank(targets, n, r)
    with torch.no_grad():
        for param in bank.lora_B.values():
            param.normal_(0.0, 0.02)
    weights = {}
    for name in bank.names:
        key = name.replace(".", "__")
        weights[name] = (bank.lora_A[key].detach().to(device), bank.lora_B[key].detach().to(device))
    return weights


def setup_distill(s: Sizes, device: torch.device, cache: bool = True):
    """The student/teacher model, its teachers and optimizer; returns (step function, model, optimizer)."""
    from peft_tagi import TaskWeights
    from peft_tagi.losses import bank_alignment_loss, kd_kl_loss, label_token_logits

    model = tagi_model(s, device, fusion=True, cache=cache)
    tagi = model.base_model
    targets = tagi.target_specs
    meta = _random_bank(targets, 1, s.r, seed=3, device=device)
    meta_weights = TaskWeights(weights=meta, row_index=None, states=None, states_mask=None)
    bank = _random_bank(targets, s.train_tasks, s.r, seed=4, device=device)
    scaling = tagi.tagi_config.scaling
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = make_batch(s, device)
    model.train()

    def step():
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
            instruction_input_ids=batch["instruction_input_ids"],
            instruction_attention_mask=batch["instruction_attention_mask"],
        )  # fmt: skip
        model.eval()  # no dropout in the teacher
        with torch.no_grad(), tagi.apply_task_weights(meta_weights):
            teacher_logits = model(
                input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                labels=batch["labels"],
            ).logits  # fmt: skip
        model.train()
        labels = batch["labels"]
        kl = kd_kl_loss(
            label_token_logits(out.logits, labels, False), label_token_logits(teacher_logits, labels, False), 2.0
        )
        generated = tagi.last_task_weights
        ins = bank_alignment_loss(generated.weights, generated.row_index, batch["task_index"], bank, scaling, scaling)
        loss = out.loss + 5.0 * kl + torch.sigmoid(ins.detach()) * ins
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model, optimizer


def setup_lora(s: Sizes, device: torch.device, cache: bool = True):
    model = lora_model(s, device, cache=cache)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = make_batch(s, device)
    model.train()

    def step():
        out = model(
            input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
            labels=batch["labels"],
        )  # fmt: skip
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step, model, optimizer


SETUPS = {"distill": setup_distill, "lora": setup_lora}


# ---------------------------------------------------------------------------------------------------- memory


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Exact bytes of the persistent tensors: all parameters, trainable ones, and the optimizer state."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    optim = sum(
        t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)
    )
    return {"parameters": params, "trainable_parameters": trainable, "gradients_max": trainable, "optimizer": optim}


def memory_worker(variant: str, s: Sizes, device: torch.device) -> dict:
    """Measure one variant's peak memory in this (fresh) process: load, then `memory_steps` training steps."""
    gc.collect()
    result: dict = {"variant": variant, "steps": s.memory_steps}
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step, model, optimizer = SETUPS[variant](s, device, cache=False)
        gc.collect()
        loaded = torch.cuda.memory_allocated(device)
        for _ in range(s.memory_steps):
            step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        result.update(
            method="torch.cuda.max_memory_allocated over model load + steps",
            peak_bytes=peak - start,
            loaded_bytes=loaded - start,
            peak_above_loaded_bytes=peak - loaded,
        )
    else:
        # Import everything the set-up imports, and touch the matmul kernels, before the baseline is read.
        from peft import LoraConfig, get_peft_model  # noqa: F401
        from transformers import T5Config, T5ForConditionalGeneration  # noqa: F401

        import peft_tagi.losses  # noqa: F401
        import peft_tagi.teachers  # noqa: F401

        torch.ones(8, 8) @ torch.ones(8, 8)
        gc.collect()
        start = status_kib("VmRSS")
        step, model, optimizer = SETUPS[variant](s, device, cache=False)
        gc.collect()
        loaded = status_kib("VmRSS")
        load_peak = status_kib("VmHWM")
        exact = reset_peak_rss() and start is not None
        for _ in range(s.memory_steps):
            step()
        if exact:
            peak = status_kib("VmHWM")  # the peak of the steps (model-load transients are reported apart)
            method = "peak RSS during the steps (VmHWM, reset after load) - RSS after imports"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            start = start or 0
            method = "ru_maxrss - RSS after imports (peak includes model-load transients)"
        result.update(
            method=method,
            peak_bytes=(peak - start) * 1024,
            loaded_bytes=(loaded - start) * 1024,
            peak_above_loaded_bytes=(peak - loaded) * 1024,
            load_transient_peak_bytes=(load_peak - start) * 1024 if load_peak else None,
        )
    result["state_bytes"] = _state_bytes(model, optimizer)
    result["trainable_params"] = count_params(model, trainable_only=True)
    return result


def measure_memory(s: Sizes, device: torch.device, threads: int) -> dict[str, dict]:
    """Run each variant's memory worker in a fresh subprocess."""
    out = {}
    for variant in VARIANTS:
        sizes = json.dumps({k: v for k, v in s.to_dict().items() if k != "lora_alpha"})
        cmd = [sys.executable, "-m", "bench.training", "--worker", variant, "--sizes", sizes, "--device", str(device)]
        cmd += ["--threads", str(threads)]
        env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {variant} failed:\n{proc.stdout}\n{proc.stderr}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        out[variant] = json.loads(line[len("RESULT ") :])
    return out


# ---------------------------------------------------------------------------------------------------- benchmark


def run(s: Sizes, device: torch.device, threads: int, repeats: int | None = None, memory: bool = True) -> dict:
    repeats = s.repeats if repeats is None else repeats
    distill_step, distill_model, _ = setup_distill(s, device)
    lora_step, lora_model_, _ = setup_lora(s, device)
    fns = {"distill_step": distill_step, "lora_step": lora_step}
    times = interleaved(fns, repeats, s.warmup, device, label="training")
    details = {
        "train_batch": s.train_batch,
        "train_tasks": s.train_tasks,
        "instruction_len": s.instruction_len,
        "input_len": s.input_len,
        "output_len": s.output_len,
        "r": s.r,
        "trainable_params": {
            "distill": count_params(distill_model, trainable_only=True),
            "lora": count_params(lora_model_, trainable_only=True),
        },
    }
    del distill_model, lora_model_, fns, distill_step, lora_step
    gc.collect()
    absolute = {name: summary(values) for name, values in times.items()}
    ratios = {"distill/lora time": ratio_entry(times, "distill_step", "lora_step", TIME_GOAL)}
    notes = [
        f"batch of {s.train_batch} examples from {s.train_tasks} tasks; the LoRA model reads instruction + input "
        f"({s.instruction_len + s.input_len} tokens); the distill student reads the input ({s.input_len}) and "
        "its teacher instruction + input"
    ]
    if memory:
        mem = measure_memory(s, device, threads)
        details["memory"] = mem
        for variant in VARIANTS:
            absolute[f"{variant}_peak_memory"] = summary([float(mem[variant]["peak_bytes"])], unit="bytes")
        ratios["distill/lora peak memory"] = value_ratio(
            mem["distill"]["peak_bytes"], mem["lora"]["peak_bytes"], "distill_peak_memory", "lora_peak_memory",
            MEMORY_GOAL, note=mem["lora"]["method"],
        )  # fmt: skip
        ratios["distill/lora memory above loaded model"] = value_ratio(
            mem["distill"]["peak_above_loaded_bytes"], mem["lora"]["peak_above_loaded_bytes"],
            "distill_peak_above_loaded", "lora_peak_above_loaded",
        )  # fmt: skip
        d_state, l_state = mem["distill"]["state_bytes"], mem["lora"]["state_bytes"]
        notes.append(
            f"memory: {mem['lora']['method']}; {s.memory_steps} steps in a fresh process per variant. Persistent "
            f"state (exact): distill parameters {d_state['parameters'] / 2**20:.0f} MiB of which trainable "
            f"{d_state['trainable_parameters'] / 2**20:.0f} MiB (+ as much in gradients, optimizer "
            f"{d_state['optimizer'] / 2**20:.0f} MiB); lora parameters {l_state['parameters'] / 2**20:.0f} MiB, "
            f"trainable {l_state['trainable_parameters'] / 2**20:.1f} MiB, optimizer "
            f"{l_state['optimizer'] / 2**20:.1f} MiB. One copy of the base serves student and teacher."
        )
    progress("  training done")
    return {
        "description": (
            f"One training step on {s.train_batch} examples (instruction {s.instruction_len}, input {s.input_len}, "
            f"output {s.output_len}, r={s.r}): TAGI distill (student + teacher on the shared base, KL + ΔW "
            "alignment, AdamW) against a plain PEFT LoRA step reading instruction + input; plus peak memory."
        ),
        "absolute": absolute,
        "ratios": ratios,
        "details": details,
        "notes": notes,
    }


def _sizes_from_json(text: str) -> Sizes:
    data = json.loads(text)
    for key in ("scaling_r", "scaling_t"):
        data[key] = tuple(data[key])
    return Sizes(**data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Memory worker of the training benchmark (run by bench.run).")
    parser.add_argument("--worker", choices=VARIANTS, required=True)
    parser.add_argument("--sizes", required=True, help="Sizes as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    result = memory_worker(args.worker, _sizes_from_json(args.sizes), torch.device(args.device))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
