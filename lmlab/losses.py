"""Cross-entropy over a vocabulary without materialising the (tokens x vocabulary) logits.

A language model's last step, ``loss = CE(hidden @ W.T, targets)``, is the most memory-hungry part
of a small model's training step: the logits, their log-softmax and its gradient are three
(N, V) tensors, and on a CPU the time goes into writing and re-reading them (and zero-filling the
gradient), not into arithmetic. ``linear_cross_entropy`` walks the rows in chunks whose logits fit
in cache: per chunk it computes the logits, the loss and, in the same pass, the gradients with
respect to the hidden states and the weight (softmax minus one-hot times W, and its transpose
times the hidden states). Backward then only scales the stored gradients. The FLOPs are the same
three matrix multiplies as the plain loss; what goes away is the memory traffic.

The same idea is behind Liger-Kernel's fused linear cross-entropy and Apple's cut cross-entropy;
this is a plain-PyTorch version that works on any device.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Bytes of float32 logits per chunk: small enough to stay in a CPU's cache, large enough for
# matrix multiplies that run at full speed; on a GPU the point is memory, so chunks are larger.
CPU_CHUNK_BYTES = 8 * 2**20
GPU_CHUNK_BYTES = 512 * 2**20


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    """How many rows of hidden states one chunk holds on this device."""
    budget = CPU_CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES
    return max(32, budget // (4 * vocab_size))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # Under autocast (bf16-mixed) the projection would run in the autocast dtype; do the same.
    device = hidden.device.type
    try:
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        if device == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
    return hidden.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int,
                dtype: torch.dtype, grad_enabled: bool) -> torch.Tensor:
        # hidden (N, D), weight (V, D), targets (N,) with IGNORE_INDEX for positions without a target.
        # needs_input_grad says only whether the inputs require grad, also under no_grad and
        # inference_mode (evaluation), where the gradients would be two wasted products per chunk.
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: float32 at least
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows].to(dtype)  # (n, D)
            target = targets[start : start + rows]
            keep = (target != IGNORE_INDEX).to(acc)[:, None]  # (n, 1): 0 on rows without a target
            safe = target.clamp(min=0)
            logits = (h @ w.t()).to(acc)  # (n, V): the only vocabulary-sized buffer, reused in place
            peak = logits.amax(dim=1, keepdim=True)
            picked = logits.gather(1, safe[:, None]) - peak
            exps = logits.sub_(peak).exp_()  # exp(logit - max), overwriting the logits
            norm = exps.sum(dim=1, keepdim=True)
            total += ((norm.log() - picked) * keep).sum()
            if need_grad:
                # d loss / d logit = keep * (exps / norm - one_hot(target)). The row scale and the
                # one-hot part are applied to the (n, D) operands of the two products instead of the
                # (n, V) gradient, which saves two passes over it.
                e = exps.to(dtype)
                row_scale, row_keep = (keep / norm).to(dtype), keep.to(dtype)
                grad_hidden[start : start + rows] = (e @ w) * row_scale - w[safe] * row_keep
                if dtype == acc:
                    grad_weight.addmm_(e.t(), h * row_scale)  # accumulates in place, no (V, D) temporary
                else:
                    grad_weight += (e.t() @ (h * row_scale)).to(acc)
                grad_weight.index_add_(0, safe, -(h * row_keep).to(acc))
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype)
        return grad_hidden * scale, grad_weight * grad_output.to(grad_weight.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")``, chunked.

    ``hidden`` is (N, D), ``weight`` the (V, D) output projection (no bias), ``targets`` (N,).
    The result is a float32 (float64 for float64 inputs) scalar; its gradients equal the unchunked
    loss's to rounding.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, D) and targets (N,), got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    rows = rows or chunk_rows(weight.shape[0], hidden.device)
    # Read here: inside forward, autograd has switched gradients off.
    grad_enabled = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows, _compute_dtype(hidden), grad_enabled)


# Model types whose causal-LM logits are exactly ``lm_head(body(...)[0])``, with a bias-free head
# (no logit scaling or soft-capping in between); tests/test_perf_models.py checks them.
PLAIN_HEADS = ("gpt2",)


def split_lm_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """(body, output weight) of a causal LM whose loss ``linear_cross_entropy`` can compute, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEADS:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or not isinstance(body, torch.nn.Module):
        return None
    return body, head.weight
