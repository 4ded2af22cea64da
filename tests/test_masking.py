"""BERT's dynamic masking: rates, special positions, labels, whole words, determinism."""

from __future__ import annotations

import pytest
import torch
from conftest import wiki_head
from omegaconf import OmegaConf

from lmlab.errors import LmlabError
from lmlab.masking import (IGNORE_INDEX, check_probabilities, chosen_rows, fixed_row_count, mask_tokens,
                           word_starts)
from lmlab.tasks.mlm import MaskedLMModule, continuation_table, word_marker

VOCAB = 1000
MASK_ID = 4
SPECIAL_IDS = (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK] as in a WordPiece vocabulary
SHAPE = (64, 2048)  # 131,072 positions


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ordinary ids (never a special id) with [CLS] at 0, [SEP] at -1 and padding tails."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_IDS), VOCAB, SHAPE, generator=g)
    ids[:, 0] = 2
    ids[:, -1] = 3
    ids[::4, -300:] = 0  # padding in a quarter of the rows
    special = torch.isin(ids, torch.tensor(SPECIAL_IDS))
    return ids, special


def _shares(ids, special, masked, labels):
    chosen = labels != IGNORE_INDEX
    n_chosen = int(chosen.sum())
    is_mask = chosen & (masked == MASK_ID)
    unchanged = chosen & (masked == ids)
    # A random replacement may draw the original id (prob 1/VOCAB) or the [MASK] id; both are tiny.
    random = chosen & ~is_mask & ~unchanged
    return (
        n_chosen / int((~special).sum()),
        int(is_mask.sum()) / n_chosen,
        int(random.sum()) / n_chosen,
        int(unchanged.sum()) / n_chosen,
    )


def test_default_rates_labels_and_specials():
    ids, special = _batch()
    original = ids.clone()
    g = torch.Generator().manual_seed(7)
    masked, labels = mask_tokens(ids, special, mask_token_id=MASK_ID, vocab_size=VOCAB, generator=g)

    assert torch.equal(ids, original), "input_ids must not be modified in place"
    assert masked.shape == ids.shape and labels.shape == ids.shape
    assert int((~special).sum()) > 100_000

    chosen = labels != IGNORE_INDEX
    # Special positions ([CLS], [SEP], padding) are never chosen and never altered.
    assert not (chosen & special).any()
    assert torch.equal(masked[special], ids[special])
    # Labels: the original id where chosen, -100 everywhere else.
    assert torch.equal(labels[chosen], ids[chosen])
    assert (labels[~chosen] == IGNORE_INDEX).all()
    # Positions not chosen keep their token.
    assert torch.equal(masked[~chosen], ids[~chosen])

    rate, to_mask, to_random, unchanged = _shares(ids, special, masked, labels)
    assert abs(rate - 0.15) < 0.005, rate
    assert abs(to_mask - 0.80) < 0.015, to_mask
    assert abs(to_random - 0.10) < 0.015, to_random
    assert abs(unchanged - 0.10) < 0.015, unchanged
    # Random replacements are real vocabulary ids.
    assert int(masked.min()) >= 0 and int(masked.max()) < VOCAB


@pytest.mark.parametrize(
    "mlm, mask_p, random_p",
    [(0.3, 0.8, 0.1), (0.15, 0.5, 0.5), (0.4, 0.0, 0.0), (0.2, 1.0, 0.0)],
)
def test_non_default_rates_are_respected(mlm, mask_p, random_p):
    ids, special = _batch(seed=1)
    g = torch.Generator().manual_seed(11)
    masked, labels = mask_tokens(
        ids, special, mask_token_id=MASK_ID, vocab_size=VOCAB, mlm_probability=mlm,
        mask_replace_prob=mask_p, random_replace_prob=random_p, generator=g,
    )
    assert not ((labels != IGNORE_INDEX) & special).any()
    rate, to_mask, to_random, unchanged = _shares(ids, special, masked, labels)
    assert abs(rate - mlm) < 0.005, rate
    assert abs(to_mask - mask_p) < 0.015, to_mask
    assert abs(to_random - random_p) < 0.015, to_random
    assert abs(unchanged - (1 - mask_p - random_p)) < 0.015, unchanged


def _words_batch(seed: int = 0):
    """Ids where ids >= 500 are continuation pieces (##x), so words are one or more pieces long.

    Returns the ids, the special mask, the continuation table and each position's word number
    (-1 for special tokens), worked out here independently of ``word_starts``.
    """
    g = torch.Generator().manual_seed(seed)
    continuation = torch.zeros(VOCAB, dtype=torch.bool)
    continuation[500:] = True
    shape = (32, 2048)
    is_piece = torch.rand(shape, generator=g) < 0.55
    ids = torch.where(
        is_piece, torch.randint(500, VOCAB, shape, generator=g), torch.randint(5, 500, shape, generator=g)
    )
    ids[:, 0] = 2  # [CLS]
    ids[:, -1] = 3  # [SEP]
    ids[:, 1] = 600  # a ## piece right after [CLS] still opens a word of its own
    ids[5, 700] = 3  # a [SEP] in the middle, followed by a piece
    ids[5, 701] = 777
    special = torch.isin(ids, torch.tensor(SPECIAL_IDS))
    opens = ~continuation[ids]
    opens[:, 1:] |= special[:, :-1]
    opens |= special
    word = torch.cumsum(opens.long(), dim=1) - 1
    word[special] = -1
    return ids, special, continuation, word


def test_word_starts():
    continuation = torch.zeros(10, dtype=torch.bool)
    continuation[7:] = True
    ids = torch.tensor([[2, 8, 5, 7, 9, 6, 3, 7]])
    special = torch.isin(ids, torch.tensor([2, 3]))
    starts = word_starts(ids, continuation, special)
    assert starts.tolist() == [[True, True, True, False, False, True, True, True]]


def test_whole_word_masking_chooses_words_together():
    ids, special, continuation, word = _words_batch()
    starts = word_starts(ids, continuation, special)
    g = torch.Generator().manual_seed(3)
    masked, labels = mask_tokens(
        ids, special, mask_token_id=MASK_ID, vocab_size=VOCAB, starts=starts, generator=g,
    )
    chosen = labels != IGNORE_INDEX
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], ids[chosen])

    # Per word: how many pieces it has and how many of them were chosen.
    rows, cols = ids.shape
    index = (word.clamp(min=0) + torch.arange(rows).unsqueeze(1) * cols)[~special]
    pieces = torch.zeros(rows * cols).index_add_(0, index, torch.ones(index.numel()))
    picked = torch.zeros(rows * cols).index_add_(0, index, chosen[~special].float())
    present = pieces > 0
    pieces, picked = pieces[present], picked[present]
    partial = (picked > 0) & (picked < pieces)
    assert int(partial.sum()) == 0, f"{int(partial.sum())} words were masked only in part"

    n_words = int(present.sum())
    assert n_words > 20_000
    word_rate = int((picked == pieces).sum()) / n_words
    assert abs(word_rate - 0.15) < 0.01, word_rate
    # Multi-piece words were chosen too, so grouping was really exercised.
    assert int(((picked == pieces) & (pieces >= 3)).sum()) > 500
    # Among chosen pieces the 80/10/10 split still holds.
    n_chosen = int(chosen.sum())
    assert abs(int((chosen & (masked == MASK_ID)).sum()) / n_chosen - 0.8) < 0.015



# -- word boundaries of real tokenizers (lmlab.tasks.mlm.continuation_table) -----------------------
TOKENIZER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def wiki_lines(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    path = wiki_head(tmp_path_factory.mktemp("wiki"), 300)
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _trained(backend, trainer, lines: list[str]):
    """``backend`` trained on ``lines`` and wrapped as transformers wraps a saved tokenizer."""
    from transformers import PreTrainedTokenizerFast

    backend.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def metaspace_tokenizer(wiki_lines: list[str]):
    """A Unigram tokenizer with SentencePiece's Metaspace pre-tokenizer ('▁the'), as T5 and ALBERT have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=2000, special_tokens=TOKENIZER_SPECIALS, unk_token="[UNK]")
    return _trained(backend, trainer, wiki_lines)


def _rows(tokenizer, lines: list[str], rows: int = 64, length: int = 128) -> torch.Tensor:
    """(rows, length) blocks [CLS] ... [SEP] of the lines' pieces, as MLM packing makes them."""
    ids = [i for line in lines for i in tokenizer(line, add_special_tokens=False)["input_ids"]]
    body = length - 2
    assert len(ids) >= rows * body, "too little text for the rows"
    return torch.tensor([[tokenizer.cls_token_id, *ids[k:k + body], tokenizer.sep_token_id]
                         for k in range(0, rows * body, body)])


def test_metaspace_pieces_with_the_marker_start_words(metaspace_tokenizer):
    tok = metaspace_tokenizer
    sentence = "The unbelievably quick fox jumped over seventeen lazy dogs"
    pieces = tok.tokenize(sentence)
    assert len(pieces) > len(sentence.split()), pieces  # some words are split: grouping is exercised
    ids = torch.tensor([[tok.cls_token_id, *tok.convert_tokens_to_ids(pieces), tok.sep_token_id]])
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    table = continuation_table(tok)
    assert not table[tok.all_special_ids].any()
    starts = word_starts(ids, table, special)[0, 1:-1].tolist()
    # Grouped at the starts, the pieces spell the sentence's words; [CLS] and [SEP] join none.
    words: list[str] = []
    for piece, start in zip(pieces, starts):
        if start:
            words.append(piece)
        else:
            words[-1] += piece
    assert [word.replace("▁", "") for word in words] == sentence.split()


def test_metaspace_whole_word_masking_keeps_the_rate_in_every_row(metaspace_tokenizer, wiki_lines):
    # Before '▁' was known every piece counted as a continuation: ~3 words per 128-token row, and a
    # row was masked whole or not at all.
    tok = metaspace_tokenizer
    ids = _rows(tok, wiki_lines)
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    starts = word_starts(ids, continuation_table(tok), special)
    assert int((starts & ~special).sum(1).min()) > 30  # dozens of words in every row
    _, labels = mask_tokens(ids, special, mask_token_id=tok.mask_token_id, vocab_size=len(tok), starts=starts,
                            generator=torch.Generator().manual_seed(0))
    share = (labels != IGNORE_INDEX).sum(1) / (~special).sum(1)  # (rows,)
    assert abs(float(share.mean()) - 0.15) < 0.03, share
    assert bool(((share > 0) & (share < 0.4)).all()), share


def test_the_word_marker_is_the_vocabularys_convention_not_a_stray_piece():
    wordpiece = [f"w{i}" for i in range(60)] + [f"##p{i}" for i in range(40)]
    # GPT-2's byte-level vocabulary holds '##' and '###' (Markdown headings) among its 'Ġ' pieces.
    byte_level = [f"Ġw{i}" for i in range(60)] + [f"p{i}" for i in range(40)] + ["##", "###"]
    metaspace = [f"▁w{i}" for i in range(60)] + [f"p{i}" for i in range(40)] + ["##"]
    assert word_marker(wordpiece) == "##"
    assert word_marker(byte_level) == "Ġ"
    assert word_marker(metaspace) == "▁"
    assert word_marker([f"w{i}" for i in range(100)] + ["##"]) is None  # one stray piece is no convention
    assert word_marker([]) is None


class _ByteLevelVocab:
    """What continuation_table reads from a tokenizer: a byte-level vocabulary with a stray '##'."""

    all_special_tokens = ["<s>", "</s>", "<mask>"]

    def get_vocab(self) -> dict[str, int]:
        pieces = ["<s>", "</s>", "<mask>", "Ġthe", "Ġrun", "ner", "s", "##", "Ġ"] + [f"Ġw{i}" for i in range(20)]
        return {piece: i for i, piece in enumerate(pieces)}

    def __len__(self) -> int:
        return len(self.get_vocab())


def test_byte_level_pieces_without_the_marker_continue_words():
    table = continuation_table(_ByteLevelVocab())
    assert table[:9].tolist() == [False, False, False, False, False, True, True, True, False]
    assert not table[9:].any()


def test_a_tokenizer_without_word_boundaries_is_refused_for_whole_word_masking_only(wiki_lines):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertForMaskedLM

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = _trained(backend, trainers.WordLevelTrainer(vocab_size=500, special_tokens=TOKENIZER_SPECIALS), wiki_lines)
    with pytest.raises(LmlabError) as info:
        continuation_table(tok)
    message = str(info.value)
    assert "config key 'task.whole_word_mask'" in message and "marks no word boundaries" in message
    assert "task.whole_word_mask=false" in message

    bert = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=len(tok)))
    task = {"nsp": False, "mlm_probability": 0.15, "mask_replace_prob": 0.8, "random_replace_prob": 0.1}
    empty = OmegaConf.create({})
    # Token masking reads no word boundaries: the same tokenizer serves it.
    module = MaskedLMModule(bert, tok, OmegaConf.create({**task, "whole_word_mask": False}), empty, empty)
    assert module.continuation is None
    with pytest.raises(LmlabError, match="task.whole_word_mask"):
        MaskedLMModule(bert, tok, OmegaConf.create({**task, "whole_word_mask": True}), empty, empty)

def test_seeded_generator_is_deterministic():
    ids, special = _batch(seed=2)
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(1234)
        outs.append(mask_tokens(ids, special, mask_token_id=MASK_ID, vocab_size=VOCAB, generator=g))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    g = torch.Generator().manual_seed(1235)
    other = mask_tokens(ids, special, mask_token_id=MASK_ID, vocab_size=VOCAB, generator=g)
    assert not torch.equal(outs[0][1], other[1])


def test_a_cap_on_the_chosen_count_keeps_the_first_ones_and_leaves_the_rest_untouched():
    ids, special = _batch(seed=4)
    ids, special = ids[:4, :256], special[:4, :256]
    draw = dict(mask_token_id=MASK_ID, vocab_size=VOCAB)
    free_masked, free_labels = mask_tokens(ids, special, generator=torch.Generator().manual_seed(5), **draw)
    n = int((free_labels != IGNORE_INDEX).sum())
    assert n > 100
    # A cap at or above the count changes nothing: the same draws, the same result.
    for cap in (n, n + 1, ids.numel()):
        masked, labels = mask_tokens(ids, special, generator=torch.Generator().manual_seed(5), max_chosen=cap, **draw)
        assert torch.equal(masked, free_masked) and torch.equal(labels, free_labels)
    # Below it: the first `cap` chosen positions (row-major) keep their label and corruption, and the
    # others are neither predicted nor corrupted.
    cap = n - 37
    masked, labels = mask_tokens(ids, special, generator=torch.Generator().manual_seed(5), max_chosen=cap, **draw)
    free_chosen = (free_labels != IGNORE_INDEX).flatten()
    first = free_chosen & (free_chosen.cumsum(0) <= cap)
    assert torch.equal((labels != IGNORE_INDEX).flatten(), first)
    assert torch.equal(masked.flatten()[first], free_masked.flatten()[first])
    assert torch.equal(masked.flatten()[~first], ids.flatten()[~first])


def test_chosen_rows_reads_the_chosen_positions_in_order_then_unlabelled_padding():
    ids, special = _batch(seed=6)
    ids, special = ids[:8, :512], special[:8, :512]
    rows = fixed_row_count(ids.numel(), 0.15, whole_words=False)
    for seed in range(5):
        _, labels = mask_tokens(ids, special, mask_token_id=MASK_ID, vocab_size=VOCAB,
                                generator=torch.Generator().manual_seed(seed), max_chosen=rows)
        chosen = labels != IGNORE_INDEX
        index = chosen_rows(chosen, rows)
        n = int(chosen.sum())
        assert index.shape == (rows,) and n < rows
        assert torch.equal(index[:n], chosen.flatten().nonzero().flatten())  # what a boolean index reads
        assert (labels.flatten()[index[n:]] == IGNORE_INDEX).all()  # the padding: ignored by the loss
        assert index.unique().numel() == rows  # distinct rows: index_select's backward adds each once


def test_fixed_row_count_is_the_mean_plus_eight_deviations_and_never_above_the_positions():
    # 64 x 512 (BERT-base's benchmark batch): mean 4,915.2, deviation 64.6.
    assert fixed_row_count(32768, 0.15, whole_words=False) == 5456  # ceil(4915.2 + 517.1 + 16) to a multiple of 8
    assert fixed_row_count(32768, 0.15, whole_words=True) == 5968  # twice the deviation
    assert fixed_row_count(20, 0.15, whole_words=False) == 20
    for n in (1, 7, 100, 4096, 10**6):
        rows = fixed_row_count(n, 0.15, whole_words=False)
        assert rows % 8 == 0 or rows == n
        assert n * 0.15 < rows <= n
    # The count it must hold, drawn: far below it in 2,000 batches of 64 x 512 (the largest of these
    # is 5,163, the mean plus 3.8 deviations).
    counts = (torch.rand(2000, 32768, generator=torch.Generator().manual_seed(0)) < 0.15).sum(1)
    assert int(counts.max()) < 4915 + 5 * 64.6 < 5456


def test_check_probabilities():
    assert check_probabilities(0.15, 0.8, 0.1) is None
    assert check_probabilities(0.15, 1.0, 0.0) is None
    too_much = check_probabilities(0.15, 0.9, 0.2)
    assert too_much and "exceeds 1" in too_much
    for bad in (0.0, 1.5):
        message = check_probabilities(bad, 0.8, 0.1)
        assert message and "mlm_probability" in message
    negative = check_probabilities(0.15, -0.1, 0.1)
    assert negative and "mask_replace_prob" in negative


def test_validation_masks_follow_each_row_not_its_batch() -> None:
    # val/loss must not move with data.eval_batch_size or the number of processes.
    from omegaconf import OmegaConf

    from lmlab.masking import row_seeded_draws
    from lmlab.tasks.mlm import VAL_MASK_SEED, build_module
    from test_perf_models import BertTok, _tiny_bert

    ids = torch.randint(5, 50, (4, 64), generator=torch.Generator().manual_seed(0))
    whole = row_seeded_draws(ids, 50, VAL_MASK_SEED)
    for i in range(4):
        alone = row_seeded_draws(ids[i : i + 1], 50, VAL_MASK_SEED)
        for field in ("choose", "how", "token"):
            assert torch.equal(getattr(whole, field)[i], getattr(alone, field)[0]), (i, field)
    assert not torch.equal(whole.choose, row_seeded_draws(ids, 50, VAL_MASK_SEED + 1).choose)
    assert not torch.equal(whole.choose[0], whole.choose[1])  # rows differ, so do their draws

    cfg = OmegaConf.create({"task": {"nsp": False, "whole_word_mask": False, "mlm_probability": 0.15,
                                     "mask_replace_prob": 0.8, "random_replace_prob": 0.1, "fixed_size_gather": False},
                            "optimizer": {}, "scheduler": {}, "model": {"compile": False}})
    module = build_module(cfg, _tiny_bert(), BertTok()).eval()

    def loss_and_count(batches: list[torch.Tensor]) -> tuple[float, int]:
        total, count = 0.0, 0
        with torch.no_grad():
            for b in batches:
                r = module._forward({"input_ids": b}, draws=row_seeded_draws(b, module.vocab_size, VAL_MASK_SEED))
                total, count = total + float(r["mlm_sum"]), count + int(r["count"])
        return total, count

    one_batch, two_batches = loss_and_count([ids]), loss_and_count([ids[:2], ids[2:]])
    assert one_batch[1] == two_batches[1] > 0
    assert one_batch[0] == pytest.approx(two_batches[0], rel=1e-5)
