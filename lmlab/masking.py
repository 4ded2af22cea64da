"""BERT's dynamic masking, done on the device at every step.

Each position outside special tokens is chosen with probability ``mlm_probability``; a chosen
position becomes [MASK] with probability ``mask_replace_prob``, a random token with probability
``random_replace_prob`` and stays as it is otherwise. With whole-word masking the choice is made
per word, and all subword pieces of a chosen word are masked together.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def word_starts(input_ids: torch.Tensor, continuation: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """True where a token begins a word. ``continuation[v]`` is True for subword pieces (##x)."""
    starts = ~continuation[input_ids] | special
    # A piece right after a special token still opens a new word.
    starts[:, 1:] |= special[:, :-1]
    starts[:, 0] = True
    return starts


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    starts: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked inputs and labels (IGNORE_INDEX where nothing is predicted); ``input_ids`` is kept."""
    shape, device = input_ids.shape, input_ids.device
    draw = torch.rand(shape, device=device, generator=generator)
    if starts is not None:
        # Every piece takes the draw of the piece that starts its word.
        word_index = torch.cumsum(starts.long(), dim=1) - 1  # (B, T), in [0, T)
        draw = draw.gather(1, word_index)
    chosen = (draw < mlm_probability) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    how = torch.rand(shape, device=device, generator=generator)
    to_mask = chosen & (how < mask_replace_prob)
    to_random = chosen & (how >= mask_replace_prob) & (how < mask_replace_prob + random_replace_prob)
    random_ids = torch.randint(vocab_size, shape, device=device, generator=generator, dtype=input_ids.dtype)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def check_probabilities(mlm_probability: float, mask_replace_prob: float, random_replace_prob: float) -> str | None:
    """A message naming the problem, or None when the three settings are usable."""
    if not 0 < mlm_probability < 1:
        return f"task.mlm_probability={mlm_probability} must be between 0 and 1 (BERT uses 0.15)"
    for key, value in (("mask_replace_prob", mask_replace_prob), ("random_replace_prob", random_replace_prob)):
        if not 0 <= value <= 1:
            return f"task.{key}={value} must be between 0 and 1"
    if mask_replace_prob + random_replace_prob > 1 + 1e-9:
        return (f"task.mask_replace_prob + task.random_replace_prob = {mask_replace_prob + random_replace_prob:g} "
                "exceeds 1; the rest (1 - both) is the share of chosen tokens left unchanged, so the two "
                "must add up to at most 1 (BERT: 0.8 and 0.1)")
    return None
