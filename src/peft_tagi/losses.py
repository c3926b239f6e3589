"""Distillation losses: temperature-scaled KL on label tokens, and ΔW alignment computed in low-rank form."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_token_logits(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Logits (N, L, V) at the positions that predict a label token (labels != -100) -> (K, V).

    For a causal LM the logit at position t predicts token t + 1, so positions are shifted; the label tokens come out
    in the same order for a student and a teacher that share the label sequence, whatever their prompts.
    """
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits[labels != -100]


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher_T ‖ student_T), averaged over tokens. Inputs: (K, V) label-token logits, same order.

    The T² factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student and teacher label-token logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}. The teacher must share the vocabulary and see the same labels."
        )
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature**2


def lowrank_delta_distance(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    ref_A: torch.Tensor,
    ref_B: torch.Tensor,
    ref_scaling: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """(ΔW − ΔW')² per task with ΔW = s·B·A, from r×r Gram matrices: no (out × in) product is ever formed.

    `reduction="mean"` averages over the out × in entries of ΔW: the element-wise MSE of the paper's parameter loss,
    of order 1e-3 for trained adapters, comparable to the CE and KL terms. `"sum"` gives the squared Frobenius norm
    ‖ΔW − ΔW'‖²_F, out · in times larger (about 1e2 for t5-small-sized modules, where sigmoid(L) ≈ 1 lets it dominate).

    Shapes: A (T, r, in), B (T, out, r), A' (T, r', in), B' (T, out, r') -> (T,).
    ‖BA‖² = ⟨BᵀB, AAᵀ⟩ and ⟨BA, B'A'⟩ = ⟨BᵀB', AA'ᵀ⟩, each an r×r (or r×r') inner product. Aligning ΔW rather than
    A and B separately is gauge-invariant: (A, B) -> (M·A, B·M⁻¹) leaves the loss unchanged.
    """
    # own + ref - 2·cross cancels: computed in float32 even under bf16/fp16 autocast or with half-precision inputs.
    with torch.autocast(lora_A.device.type, enabled=False):
        dtype = torch.promote_types(lora_A.dtype, torch.float32)
        lora_A, lora_B, ref_A, ref_B = (t.to(dtype) for t in (lora_A, lora_B, ref_A, ref_B))
        gram_B = lora_B.transpose(1, 2) @ lora_B  # (T, r, r)
        gram_A = lora_A @ lora_A.transpose(1, 2)
        ref_gram_B = ref_B.transpose(1, 2) @ ref_B  # (T, r', r')
        ref_gram_A = ref_A @ ref_A.transpose(1, 2)
        cross_B = lora_B.transpose(1, 2) @ ref_B  # (T, r, r')
        cross_A = lora_A @ ref_A.transpose(1, 2)  # (T, r, r')
        own = (gram_B * gram_A).sum((1, 2)) * scaling**2
        ref = (ref_gram_B * ref_gram_A).sum((1, 2)) * ref_scaling**2
        cross = (cross_B * cross_A).sum((1, 2)) * (scaling * ref_scaling)
        distance = (own + ref - 2 * cross).clamp_min(0.0)
    if reduction == "sum":
        return distance
    if reduction == "mean":
        return distance / (lora_B.shape[1] * lora_A.shape[2])
    raise ValueError(f"reduction must be 'mean' (per ΔW entry) or 'sum' (Frobenius), got {reduction!r}.")


def bank_alignment_loss(
    generated_weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    row_index: torch.Tensor,
    entry_index: torch.Tensor,
    bank: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
    bank_scaling: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """ΔW alignment of generated weights to the bank entry of each task (`reduction` as in `lowrank_delta_distance`).

    Shapes: generated A (T, r, in), B (T, out, r) for T unique instructions; `row_index` (batch,) maps rows to them;
    `entry_index` (batch,) is each row's bank entry, -1 when the bank has none (such tasks are left out); bank A
    (G, r', in), B (G, out, r').
    """
    n_tasks = next(iter(generated_weights.values()))[0].shape[0]
    entry_of_task = torch.full((n_tasks,), -1, dtype=torch.long, device=entry_index.device)
    entry_of_task[row_index] = entry_index
    index = entry_of_task.clamp_min(0)
    reference = {name: (a[index], b[index]) for name, (a, b) in bank.items()}
    return delta_alignment_loss(
        generated_weights, reference, scaling, bank_scaling, valid=entry_of_task >= 0, reduction=reduction
    )


def delta_alignment_loss(
    generated: dict[str, tuple[torch.Tensor, torch.Tensor]],
    reference: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
    ref_scaling: float,
    valid: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean over tasks (where `valid`, shape (T,)) of the mean over modules of the ΔW distance: per-entry MSE with
    `reduction="mean"`, ‖ΔW_gen − ΔW_ref‖²_F with `"sum"`."""
    distances = torch.stack(
        [
            lowrank_delta_distance(*generated[name], scaling, *reference[name], ref_scaling, reduction=reduction)
            for name in generated
        ]
    ).mean(0)  # (T,)
    if valid is not None:
        if not valid.any():
            return distances.sum() * 0.0
        distances = distances[valid]
    return distances.mean()
