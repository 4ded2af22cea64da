"""BERT's dynamic masking, done on the device at every step.

Each position outside special tokens is chosen with probability ``mlm_probability``; a chosen
position becomes [MASK] with probability ``mask_replace_prob``, a random token with probability
``random_replace_prob`` and stays as it is otherwise. With whole-word masking the choice is made
per word, and all subword pieces of a chosen word are masked together. The random tokens are
drawn from ``replacement_ids`` when given (the task passes the ordinary, non-special ids: a random
[CLS], [SEP], [PAD] or [MASK] in the middle of a text is no "random word"); Hugging Face's
DataCollatorForLanguageModeling draws from the whole vocabulary, specials included.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def word_starts(input_ids: torch.Tensor, continuation: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """True where a token begins a word, and at special tokens (words of their own that are never
    chosen). ``continuation[v]`` is True for pieces that continue a word: WordPiece's '##x', and the
    pieces without SentencePiece's '▁' or byte-level BPE's 'Ġ' (``lmlab.tasks.mlm.continuation_table``).
    """
    starts = ~continuation[input_ids] | special
    # A piece right after a special token still opens a new word.
    starts[:, 1:] |= special[:, :-1]
    starts[:, 0] = True
    return starts


@dataclass(frozen=True)
class Draws:
    """The random numbers one masking reads, each shaped like the input ids."""

    choose: torch.Tensor  # uniform: a position (or the word it starts) is chosen below mlm_probability
    how: torch.Tensor  # uniform: [MASK], a random token or unchanged
    token: torch.Tensor  # the random token ids (indices into mask_tokens' replacement_ids when it has them)


def row_seeded_draws(input_ids: torch.Tensor, vocab_size: int, seed: int) -> Draws:
    """Draws that depend on each row's own tokens and ``seed`` only, for validation.

    A generator seeded per batch gives a row other masks when the batching changes (another
    eval batch size, another number of processes), and the validation loss with them; seeding by
    the row's content keeps its masks, so val/loss compares across batchings. Drawn on the CPU,
    one small generator per row: validation reads the ids on the host anyway.
    """
    rows = input_ids.detach().to("cpu", torch.int64)
    choose, how, token = [], [], []
    for row in rows:
        key = int.from_bytes(hashlib.blake2b(row.numpy().tobytes(), digest_size=8).digest(), "little")
        generator = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + key) % 2**63)
        choose.append(torch.rand(row.shape, generator=generator))
        how.append(torch.rand(row.shape, generator=generator))
        token.append(torch.randint(vocab_size, row.shape, generator=generator))
    device = input_ids.device
    return Draws(torch.stack(choose).to(device), torch.stack(how).to(device),
                 torch.stack(token).to(device, input_ids.dtype))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one training step's masks in one process: a function of the run's seed, the
    process's global rank and the step's micro-batch index only.

    Drawn from torch's default generator, which ``seed_everything`` seeds alike in every process,
    the masks of all DDP ranks would be the same draws (the same positions in each rank's rows).
    Seeded by the step instead of continued from a saved state, a resumed run draws the masks of
    the run it continues whatever the checkpoint holds.
    """
    key = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") >> 1  # below 2**63: manual_seed's range


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
    max_chosen: int | None = None,
    draws: Draws | None = None,
    replacement_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked inputs and labels (IGNORE_INDEX where nothing is predicted); ``input_ids`` is kept.

    The random numbers come from ``draws`` when given (``row_seeded_draws``), else from
    ``generator`` (or torch's default one), drawn on the device.

    ``replacement_ids`` (R,): the ids a random replacement is drawn from, uniformly; ``None`` draws
    from the whole vocabulary ``[0, vocab_size)``. With it, ``draws.token`` are indices into it
    (``row_seeded_draws(..., len(replacement_ids), ...)``).

    ``max_chosen`` caps the number of chosen positions in the batch (the first ones in row-major
    order are kept): what :func:`chosen_rows` reads must fit in its fixed size. A position over the
    cap is neither corrupted nor predicted, as if it had not been drawn.
    """
    shape, device = input_ids.shape, input_ids.device
    draw = draws.choose if draws is not None else torch.rand(shape, device=device, generator=generator)
    if starts is not None:
        # Every piece takes the draw of the piece that starts its word.
        word_index = torch.cumsum(starts.long(), dim=1) - 1  # (B, T), in [0, T)
        draw = draw.gather(1, word_index)
    chosen = (draw < mlm_probability) & ~special
    if max_chosen is not None:
        chosen &= chosen.flatten().cumsum(0).view(shape) <= max_chosen
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    choices = vocab_size if replacement_ids is None else len(replacement_ids)
    if draws is not None:
        how, random_ids = draws.how, draws.token
    else:
        how = torch.rand(shape, device=device, generator=generator)
        random_ids = torch.randint(choices, shape, device=device, generator=generator, dtype=input_ids.dtype)
    if replacement_ids is not None:
        random_ids = replacement_ids.to(input_ids.dtype)[random_ids]  # (B, T): index -> id
    to_mask = chosen & (how < mask_replace_prob)
    to_random = chosen & (how >= mask_replace_prob) & (how < mask_replace_prob + random_replace_prob)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def fixed_row_count(positions: int, mlm_probability: float, whole_words: bool) -> int:
    """Rows enough for the chosen positions among ``positions`` tokens, short of a freak draw.

    The count is binomial (mean n·p): the mean plus 8 standard deviations is exceeded about once in
    10^15 batches. Whole words are drawn together, which widens the spread: twice the deviation
    covers words of up to four pieces on average (mean square). Rounded up to a multiple of 8 for
    the matmuls; never more than ``positions``.
    """
    mean = positions * mlm_probability
    spread = math.sqrt(positions * mlm_probability * (1 - mlm_probability)) * (2 if whole_words else 1)
    return min(positions, 8 * math.ceil((mean + 8 * spread + 16) / 8))


def chosen_rows(chosen: torch.Tensor, rows: int) -> torch.Tensor:
    """Flat indices (``rows``,) of the chosen positions of ``chosen`` (B, T), in order, then unchosen ones.

    ``x.flatten(0, 1)[chosen.flatten()]`` reads the same chosen rows, but a boolean index has a
    size only the device knows: on a GPU the host stops there until the GPU has caught up (twice per
    step, and again in the backward pass), and a compiled head sees a new shape at every step.
    A stable sort that puts the chosen positions first has a fixed size. The padding rows are
    unchosen positions, whose label is IGNORE_INDEX, so a loss with ``ignore_index`` and an accuracy
    against the labels leave them out. At most ``rows`` positions may be chosen (``max_chosen``).
    """
    return torch.argsort(chosen.flatten().logical_not(), stable=True)[:rows]


def check_probabilities(mlm_probability: float, mask_replace_prob: float,
                        random_replace_prob: float) -> tuple[str, str] | None:
    """(the config key at fault, what is wrong with it), or None when the three settings are usable."""
    if not 0 < mlm_probability < 1:
        return "task.mlm_probability", f"{mlm_probability} must be between 0 and 1, exclusive (BERT uses 0.15)"
    for key, value in (("mask_replace_prob", mask_replace_prob), ("random_replace_prob", random_replace_prob)):
        if not 0 <= value <= 1:
            return f"task.{key}", f"{value} must be between 0 and 1"
    if mask_replace_prob + random_replace_prob > 1 + 1e-9:
        return "task.mask_replace_prob", (
            f"task.mask_replace_prob + task.random_replace_prob = {mask_replace_prob + random_replace_prob:g} "
            "exceeds 1; the rest (1 - both) is the share of chosen tokens left unchanged, so the two "
            "must add up to at most 1 (BERT: 0.8 and 0.1)")
    return None
