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


def grouped_words(pieces: list[str], starts: list[bool]) -> list[str]:
    """The pieces joined into words at the positions ``word_starts`` marks as starting one."""
    words: list[str] = []
    for piece, start in zip(pieces, starts):
        if start:
            words.append(piece)
        else:
            words[-1] += piece
    return words



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
    words = grouped_words(pieces, starts)
    assert [word.replace("▁", "") for word in words] == sentence.split()


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_wordpiece_and_byte_level_pieces_group_into_the_words_they_spell(kind: str, wiki_lines: list[str]) -> None:
    # lmlab's own tokenizers: WordPiece marks continuations ('##ing'), byte-level BPE word starts ('Ġthe').
    from lmlab.tokenization import train_bpe, train_wordpiece

    if kind == "wordpiece":
        tok = train_wordpiece(wiki_lines, vocab_size=1000, min_frequency=2, lowercase=True)
        edge = tok.cls_token_id, tok.sep_token_id
    else:
        tok = train_bpe(wiki_lines, vocab_size=600, min_frequency=2)
        edge = tok.eos_token_id, tok.eos_token_id  # documents are joined by <|endoftext|>
    sentence = "the unbelievably quick fox jumped over seventeen lazy dogs"
    pieces = tok.tokenize(sentence)
    assert len(pieces) > len(sentence.split()), pieces  # words are split: grouping is exercised
    ids = torch.tensor([[edge[0], *tok.convert_tokens_to_ids(pieces), edge[1]]])
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    starts = word_starts(ids, continuation_table(tok), special)[0, 1:-1].tolist()
    words = grouped_words(pieces, starts)
    assert [w.replace("##", "").replace("Ġ", "") for w in words] == sentence.split()


def test_a_chinese_wordpiece_vocabulary_is_taken_by_its_declared_prefix() -> None:
    # Its ideographs are words of their own, so few pieces carry '##' (2% on 3,000 MSRA sentences,
    # below word_marker's 5%): the WordPiece model's own continuing_subword_prefix says the convention.
    from test_tokenization import _chinese_sentences

    from lmlab.tokenization import train_wordpiece

    tok = train_wordpiece(_chinese_sentences(3000), vocab_size=8000, min_frequency=2, lowercase=True)
    ordinary = [t for t in tok.get_vocab() if t not in tok.all_special_tokens]
    assert word_marker(ordinary) is None  # the share alone would refuse whole-word masking
    table = continuation_table(tok)
    sentence = "北京2008年奥运会"
    pieces = tok.tokenize(sentence)
    assert any(p.startswith("##") for p in pieces), pieces  # '2008' is a word of several pieces
    ids = torch.tensor([[tok.cls_token_id, *tok.convert_tokens_to_ids(pieces), tok.sep_token_id]])
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    words = grouped_words(pieces, word_starts(ids, table, special)[0, 1:-1].tolist())
    assert [w.replace("##", "") for w in words] == ["北", "京", "2008", "年", "奥", "运", "会"]


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


def test_check_probabilities_names_the_key_at_fault():
    assert check_probabilities(0.15, 0.8, 0.1) is None
    assert check_probabilities(0.15, 1.0, 0.0) is None
    key, problem = check_probabilities(0.15, 0.9, 0.2)
    assert key == "task.mask_replace_prob" and "exceeds 1" in problem
    for bad in (0.0, 1.5):
        assert check_probabilities(bad, 0.8, 0.1)[0] == "task.mlm_probability"
    assert check_probabilities(0.15, -0.1, 0.1)[0] == "task.mask_replace_prob"
    assert check_probabilities(0.15, 0.5, 1.1)[0] == "task.random_replace_prob"


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
                r = module._forward({"input_ids": b}, draws=module.validation_draws(b))
                total, count = total + float(r["mlm_sum"]), count + int(r["count"])
        return total, count

    one_batch, two_batches = loss_and_count([ids]), loss_and_count([ids[:2], ids[2:]])
    assert one_batch[1] == two_batches[1] > 0
    assert one_batch[0] == pytest.approx(two_batches[0], rel=1e-5)


# -- what the MLM task draws: random replacements, per-rank training masks ------------------------
def _tiny_module(**task: object):
    from test_perf_models import BertTok, _tiny_bert

    from lmlab.tasks.mlm import build_module

    settings = {"nsp": False, "whole_word_mask": False, "mlm_probability": 0.15, "mask_replace_prob": 0.8,
                "random_replace_prob": 0.1, "fixed_size_gather": False, **task}
    cfg = OmegaConf.create({"task": settings, "optimizer": {}, "scheduler": {}, "model": {"compile": False},
                            "seed": 42})
    return build_module(cfg, _tiny_bert(), BertTok())


def test_random_replacements_are_ordinary_tokens_never_special_ones() -> None:
    # Hugging Face's collator draws from the whole vocabulary: a random [CLS], [SEP], [PAD] or
    # [MASK] mid-text. lmlab draws from the non-special ids only, each as likely as the others.
    module = _tiny_module(mlm_probability=0.5, mask_replace_prob=0.0, random_replace_prob=1.0)
    assert set(module.special_ids.tolist()) == {0, 1, 2, 3, 4}
    ids = torch.randint(5, 50, (64, 128), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 2, 3
    for validation in (False, True):  # training (a generator) and validation (row-seeded draws)
        draws = module.validation_draws(ids) if validation else None
        masked, labels = module._mask({"input_ids": ids}, torch.Generator().manual_seed(1), draws=draws)
        chosen = labels != IGNORE_INDEX
        assert int(chosen.sum()) > 3000
        drawn = masked[chosen]
        assert not torch.isin(drawn, module.special_ids).any(), "a random replacement was a special token"
        counts = torch.bincount(drawn, minlength=50)[5:].float()
        assert bool((counts > 0).all())  # every ordinary id can be drawn
        assert float(counts.max() / counts.mean()) < 1.5  # uniformly

    # The plain function keeps Hugging Face's behaviour when given no replacement ids.
    ids, special = _batch(seed=8)
    with_specials, labels = mask_tokens(ids, special, mask_token_id=MASK_ID, vocab_size=VOCAB,
                                        random_replace_prob=1.0, mask_replace_prob=0.0,
                                        generator=torch.Generator().manual_seed(2))
    assert torch.isin(with_specials[labels != IGNORE_INDEX], torch.tensor(SPECIAL_IDS)).any()


def _training_masks(module, monkeypatch: pytest.MonkeyPatch, ids: torch.Tensor, *, rank: int, step: int,
                    global_seed: int = 0) -> torch.Tensor:
    """The masked inputs of one real ``training_step`` on process ``rank`` at micro-batch ``step``."""
    from types import SimpleNamespace

    import lmlab.tasks.mlm as mlm

    monkeypatch.setattr(mlm, "log_step", lambda *args, **kwargs: None)
    module._trainer = SimpleNamespace(global_rank=rank, strategy=None, training=False,
                                      fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(total_batch_idx=step)))
    seen = []
    real = type(module)._mask

    def recording(batch, generator, max_chosen=None, draws=None):
        masked, labels = real(module, batch, generator, max_chosen, draws)
        seen.append(masked)
        return masked, labels

    monkeypatch.setattr(module, "_mask", recording)
    torch.manual_seed(global_seed)  # seed_everything: the same default generator in every process
    try:
        module.training_step({"input_ids": ids}, 0)
    finally:
        module._trainer = None
    (masked,) = seen
    return masked


def test_ddp_ranks_mask_differently_and_a_step_masks_alike_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Drawn from torch's default generator, which seed_everything seeds alike in every process, every
    # DDP rank would mask the same positions of its rows. The training masks are a function of
    # (seed, rank, micro-batch index): other ranks, other masks; the same step, resumed or not, the same.
    module = _tiny_module()
    ids = torch.randint(5, 50, (8, 64), generator=torch.Generator().manual_seed(0))
    rank0 = _training_masks(module, monkeypatch, ids, rank=0, step=3)
    rank1 = _training_masks(module, monkeypatch, ids, rank=1, step=3)
    assert not torch.equal(rank0 != ids, rank1 != ids), "two ranks chose the same positions"
    # A resumed run's default generator holds whatever the checkpoint saved: the masks stay.
    again = _training_masks(module, monkeypatch, ids, rank=0, step=3, global_seed=1234)
    assert torch.equal(rank0, again)
    assert not torch.equal(rank0, _training_masks(module, monkeypatch, ids, rank=0, step=4))
    other_seed = _tiny_module()
    other_seed.mask_seed = 43  # cfg.seed
    assert not torch.equal(rank0, _training_masks(other_seed, monkeypatch, ids, rank=0, step=3))


@pytest.mark.parametrize("nsp", [False, True])
@pytest.mark.parametrize("fixed_size_gather", [False, True])
def test_the_head_on_masked_positions_gives_hugging_faces_full_head_loss_and_gradients(nsp: bool,
                                                                                      fixed_size_gather: bool) -> None:
    # Packed blocks (no attention mask) take the lean body and, on a GPU, the fixed-size gather;
    # NSP pairs the model's own body. Each must give what the model computes with labels= on every
    # position (BertForMaskedLM / BertForPreTraining: the mean over the labelled positions).
    from test_perf_models import BertTok
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

    from lmlab.tasks.mlm import MaskedLMModule

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = (BertForPreTraining if nsp else BertForMaskedLM)(config)
    task = OmegaConf.create({"nsp": nsp, "whole_word_mask": False, "mlm_probability": 0.15, "mask_replace_prob": 0.8,
                             "random_replace_prob": 0.1, "fixed_size_gather": fixed_size_gather})
    module = MaskedLMModule(model, BertTok(), task, OmegaConf.create({}), OmegaConf.create({}))
    ids = torch.randint(5, 50, (4, 40), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, -1] = 2, 3
    batch = {"input_ids": ids}
    if nsp:
        ids[:, 19] = 3
        types = torch.zeros_like(ids)
        types[:, 20:] = 1
        mask = torch.ones_like(ids)
        mask[1, 30:] = 0
        ids[1, 30:] = 0
        batch.update(token_type_ids=types, attention_mask=mask, next_sentence_label=torch.tensor([0, 1, 1, 0]))
    r = module._forward(batch, torch.Generator().manual_seed(3))
    ours = r["mlm_sum"] / r["count"] + (r["nsp_loss"] if nsp else 0)
    ours.backward()
    our_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    labels = torch.where(r["chosen"], ids, torch.full_like(ids, IGNORE_INDEX))
    assert 0 < int(r["count"]) == int(r["chosen"].sum())
    kwargs = {k: v for k, v in batch.items() if k in ("attention_mask", "token_type_ids")}
    if nsp:
        kwargs["next_sentence_label"] = batch["next_sentence_label"]
    theirs = model(input_ids=r["inputs"], labels=labels, **kwargs).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for mine, hf in zip(our_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, hf, rtol=1e-4, atol=1e-6)


# -- validation scores: token-weighted over the whole split ---------------------------------------
def _logged(module) -> dict[str, float]:
    got: dict[str, float] = {}
    module.log_dict = lambda metrics, **kwargs: got.update({k: float(v) for k, v in metrics.items()})
    module.on_validation_epoch_end()
    return got


def test_validation_perplexity_is_the_token_weighted_mean_over_all_batches() -> None:
    import math

    from test_perf_models import _tiny_gpt2

    from lmlab.tasks.clm import CausalLMModule

    # CLM: two batches with very different numbers of predicted tokens (padding in the first).
    clm = CausalLMModule(_tiny_gpt2().eval(), OmegaConf.create({}), OmegaConf.create({}))
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[:, 3:] = 0
    short = {"input_ids": torch.randint(0, 97, (2, 16), generator=gen), "attention_mask": mask}
    long = {"input_ids": torch.randint(0, 97, (4, 16), generator=gen)}
    sums = []
    with torch.no_grad():
        for batch in (short, long):
            clm.validation_step(batch, 0)
            loss_sum, count = clm.token_losses(batch)
            sums.append((float(loss_sum), int(count)))
    assert [c for _, c in sums] == [2 * 2, 4 * 15]
    total = sum(s for s, _ in sums) / sum(c for _, c in sums)
    per_batch = sum(s / c for s, c in sums) / len(sums)
    got = _logged(clm)
    assert got["val/loss"] == pytest.approx(total, rel=1e-6) and got["val/loss"] != pytest.approx(per_batch, rel=1e-3)
    assert got["val/perplexity"] == pytest.approx(math.exp(total), rel=1e-6)

    # MLM: over the masked tokens of every batch.
    mlm = _tiny_module().eval()
    batches = [torch.randint(5, 50, (n, 64), generator=gen) for n in (1, 7)]
    sums = []
    with torch.no_grad():
        for ids in batches:
            mlm.validation_step({"input_ids": ids}, 0)
            r = mlm._forward({"input_ids": ids}, draws=mlm.validation_draws(ids))
            sums.append((float(r["mlm_sum"]), int(r["count"])))
    total = sum(s for s, _ in sums) / sum(c for _, c in sums)
    got = _logged(mlm)
    assert got["val/loss"] == pytest.approx(total, rel=1e-6)
    assert got["val/perplexity"] == pytest.approx(math.exp(total), rel=1e-6)


def test_a_validation_without_masked_tokens_logs_nan_not_the_best_possible_loss() -> None:
    # sum / clamp(count, 1) gave val/loss 0 and val/perplexity 1: the best score a checkpoint or an
    # Optuna trial could see, for a validation that measured nothing.
    import math

    mlm = _tiny_module().eval()
    ids = torch.tensor([[2, 3, 0, 0], [2, 3, 0, 0]])  # [CLS] [SEP] [PAD] [PAD]: nothing can be masked
    with torch.no_grad():
        mlm.validation_step({"input_ids": ids}, 0)
    with pytest.warns(UserWarning, match="counted no token .* val/loss, val/perplexity and val/masked_accuracy are "
                                         "logged as NaN") as warned:
        got = _logged(mlm)
    assert len(warned) == 1
    assert all(math.isnan(got[k]) for k in ("val/loss", "val/perplexity", "val/masked_accuracy")), got
    # The sums are reset: the next validation with masked tokens scores normally.
    ids = torch.randint(5, 50, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mlm.validation_step({"input_ids": ids}, 0)
    assert 0 < _logged(mlm)["val/loss"] < 10

    # CLM: a datamodule whose labels leave nothing to predict (-100 everywhere).
    from test_perf_models import _tiny_gpt2

    from lmlab.tasks.clm import CausalLMModule

    clm = CausalLMModule(_tiny_gpt2().eval(), OmegaConf.create({}), OmegaConf.create({}))
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clm.validation_step({"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}, 0)
    with pytest.warns(UserWarning, match="val/loss and val/perplexity are logged as NaN"):
        got = _logged(clm)
    assert math.isnan(got["val/loss"]) and math.isnan(got["val/perplexity"]), got
