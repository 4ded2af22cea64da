"""task=summarization: tiny bart / t5 / gpt2 end to end, BLEU/ROUGE helpers, data and config checks."""

from __future__ import annotations

import errno
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SHARED_DATA, TINY, compose_cfg
from omegaconf import OmegaConf

from lmlab import registry
from lmlab.errors import LmlabError
from lmlab.models.build import build_hf_config, build_model
from lmlab.tasks import summarization as S
from lmlab.train import run

NEWS = SHARED_DATA / "summarization" / "news_titles"
FAST = ["data.batch_size=8", "data.eval_batch_size=12", "data.max_target_length=24",
        "task.generation.max_new_tokens=8", "task.generate_val_batches=1", "trainer.max_steps=4",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]


def _copy(src: Path, dst: Path, n: int) -> None:
    lines = [line for line in src.read_text(encoding="utf-8").split("\n") if line.strip()][:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def news(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not NEWS.exists():
        pytest.skip(f"real test data missing: {NEWS}")
    root = tmp_path_factory.mktemp("news")
    for split, n in (("train", 64), ("validation", 12), ("test", 10)):
        _copy(NEWS / f"{split}.jsonl", root / f"{split}.jsonl", n)
    return root


@pytest.fixture(scope="module")
def runs(news: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny run per model family, shared by the checks below."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("LMLAB_HOME", str(home / "runs"))
    mp.setenv("LMLAB_CACHE_DIR", str(home / "cache"))
    out = {}
    try:
        for model in ("bart", "t5", "gpt2"):
            cfg = compose_cfg([*TINY, "task=summarization", f"model={model}", f"data.path={news}", *FAST])
            OmegaConf.resolve(cfg)
            out[model] = (run(cfg), cfg)
    finally:
        mp.undo()
    return out


# -- metrics -------------------------------------------------------------------------------------------
def test_bleu_and_rouge_match_the_reference_implementations() -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps = ["the cat sat on the mat today", "Stocks fall as oil prices climb", "a completely different line"]
    refs = ["the cat is sitting on the mat", "Stocks falling while oil price climbs", "nothing in common here"]
    assert S.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = S.rouge(hyps, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = sum(scorer.score(r, h)[key].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
        assert got[key] == pytest.approx(want)
    assert got["rouge1"] > got["rouge2"] > 0  # the stemmer matches "fall"/"falling" etc.
    same = S.score(refs, refs)
    assert same["bleu"] == pytest.approx(100.0)
    assert all(same[k] == pytest.approx(1.0) for k in ("rouge1", "rouge2", "rougeL"))
    assert S.bleu([], []) == 0.0


def test_rouge_of_summaries_in_other_scripts_needs_the_unicode_tokenizer(caplog: pytest.LogCaptureFixture) -> None:
    """rouge-score keeps a-z and 0-9 only: a Chinese or Russian summary scored ROUGE 0 against itself,
    without a word. The default warns (once) and task.rouge_tokenizer=unicode scores every script;
    English scores are the same under both."""
    refs = ["北京大学今天宣布新的研究计划", "Москва приняла новый бюджет на следующий год"]
    hyps = ["北京大学宣布研究计划", "Москва приняла бюджет"]
    S._warned_rouge_letters = False
    with caplog.at_level("WARNING", logger="lmlab.tasks.summarization"):
        default = S.rouge(refs, refs)
        S.rouge(refs, refs)
    assert default["rouge1"] == 0.0 and caplog.text.count("Set task.rouge_tokenizer=unicode") == 1
    assert all(v == pytest.approx(1.0) for v in S.rouge(refs, refs, "unicode").values())
    partial = S.rouge(hyps, refs, "unicode")
    assert 0.3 < partial["rouge1"] < 1.0 and partial["rouge2"] < partial["rouge1"]
    english_h = ["the cat sat on the mat today", "Stocks fall as oil prices climb", "don't_stop 2024"]
    english_r = ["the cat is sitting on the mat", "Stocks falling while oil price climbs", "dont stop in 2024"]
    assert S.rouge(english_h, english_r, "unicode") == pytest.approx(S.rouge(english_h, english_r))
    with pytest.raises(LmlabError, match="'task.rouge_tokenizer': unknown tokenizer 'spacy'"):
        S.validate(compose_cfg(["task=summarization", "task.rouge_tokenizer=spacy"]))


# -- configuration -------------------------------------------------------------------------------------
def test_config_picks_bart_and_bbc_headlines() -> None:
    cfg = compose_cfg(["task=summarization"])
    assert cfg.model.name == "bart" and cfg.data.datamodule == "summarization" and cfg.data.catalog == "bbc_headlines"
    task = registry.get("task", "summarization")
    assert task.head(cfg) == "seq2seq_lm" and task.packing(cfg) == "seq2seq"
    for model, head in (("t5", "seq2seq_lm"), ("gpt2", "causal_lm")):
        c = compose_cfg(["task=summarization", f"model={model}"])
        assert task.head(c) == head
    # The debug preset's keys exist in the summarization data config.
    c = compose_cfg([*TINY, "task=summarization"])
    assert c.data.block_size == 64 and c.data.max_documents == 400


def test_incompatible_model_fails_before_reading_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_read(*args, **kwargs):
        raise AssertionError("data was read")

    monkeypatch.setattr(S, "load_pairs", no_read)
    cfg = compose_cfg([*TINY, "task=summarization", "model=bert", f"data.path={tmp_path / 'missing'}"])
    with pytest.raises(LmlabError) as info:
        run(cfg)
    msg = str(info.value)
    assert "bert" in msg and "Models that work for task=summarization: bart, gpt2, t5" in msg


# -- data ----------------------------------------------------------------------------------------------
def test_bbc_headlines_split_is_deterministic() -> None:
    cfg = compose_cfg(["task=summarization"])
    a, origin = S.load_pairs(cfg.data)
    b, _ = S.load_pairs(cfg.data)
    assert set(a) == {"train", "validation", "test"} and origin.startswith("catalog:bbc_headlines")
    # 2,225 articles, 136 of them copies of an earlier article's text (tests/test_dedupe.py).
    assert sum(len(p) for p in a.values()) == 2089
    assert a["test"].summaries == b["test"].summaries and len(a["test"]) == 209
    assert a["train"].summaries[0] == "Ad sales boost Time Warner profit"  # business/001.txt's headline
    assert a["train"].documents[0].startswith("Quarterly profits at US media giant TimeWarner")


def test_csv_fields_and_carved_validation(tmp_path: Path) -> None:
    import csv

    path = tmp_path / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["article", "title"])
        for i in range(40):
            w.writerow([f"document number {i} says something, long enough", f"title {i}"])
    cfg = compose_cfg(["task=summarization", f"data.path={path}", "data.document_field=article",
                       "data.summary_field=title"])
    splits, _ = S.load_pairs(cfg.data)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [32, 4, 4]
    bad = compose_cfg(["task=summarization", f"data.path={path}", "data.document_field=article",
                       "data.summary_field=headline"])
    with pytest.raises(LmlabError, match="headline"):
        S.load_pairs(bad.data)


def test_long_summaries_are_truncated_with_one_warning(news: Path) -> None:
    from lmlab.tokenization import train_bpe

    cfg = compose_cfg([*TINY, "task=summarization", f"data.path={news}", "data.max_target_length=8"])
    dm = S.SummarizationDataModule(cfg.data, packing="seq2seq", cache_dir=None, seed=0)
    tok = train_bpe(dm.texts_for_tokenizer(), 1000, 2)
    dm.set_tokenizer(tok)
    summaries = [s for p in dm.splits.values() for s in p.summaries]
    expected = sum(len(ids) + 1 > 8 for ids in tok(summaries, add_special_tokens=False)["input_ids"])
    assert expected > 0
    with pytest.warns(S.SummaryTruncationWarning) as record:
        dm.setup("fit")
    ours = [w for w in record if issubclass(w.category, S.SummaryTruncationWarning)]
    assert len(ours) == 1
    assert f"{expected} of {len(summaries)} summaries" in str(ours[0].message)
    assert dm.stats["truncated_summaries"] == expected
    assert max(len(it["labels"]) for it in dm.datasets["train"].items) == 8


def test_causal_layout_masks_the_prompt(news: Path) -> None:
    from lmlab.tokenization import train_bpe

    cfg = compose_cfg([*TINY, "task=summarization", "model=gpt2", f"data.path={news}", "data.max_target_length=24"])
    dm = S.SummarizationDataModule(cfg.data, packing="causal", cache_dir=None, seed=0)
    tok = train_bpe(dm.texts_for_tokenizer(), 1000, 2)
    dm.set_tokenizer(tok)
    assert tok("a document")["input_ids"][-1] != tok.eos_token_id  # the prompt goes on with the separator
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[1] <= 64
    for i in range(batch["input_ids"].shape[0]):
        n_prompt = int(batch["prompt_mask"][i].sum())
        labels = batch["labels"][i]
        assert (labels[:n_prompt] == -100).all()
        summary = labels[labels != -100].tolist()
        assert summary[-1] == tok.eos_token_id
        assert tok.decode(summary[:-1]).strip() in dm.splits["validation"].summaries[i]
        assert batch["prompt_ids"][i, -1] != tok.pad_token_id or n_prompt == batch["prompt_ids"].shape[1]
        assert batch["prompt_mask"][i, -1] == 1  # left padded


def test_the_exported_tokenizer_encodes_a_document_as_the_encoder_was_trained(news: Path, tmp_path: Path) -> None:
    """``AutoTokenizer.from_pretrained(export)(document)`` is what the encoder read in training: EOS included."""
    from transformers import AutoTokenizer

    from lmlab.export import export_hf
    from lmlab.tokenization import train_bpe

    cfg = compose_cfg([*TINY, "task=summarization", f"data.path={news}", "data.block_size=512",
                       "data.max_source_length=400", "data.max_target_length=96"])
    dm = S.SummarizationDataModule(cfg.data, packing="seq2seq", cache_dir=None, seed=0)
    tok = train_bpe(dm.texts_for_tokenizer(), 1000, 2)
    dm.set_tokenizer(tok)
    dm.setup("fit")
    spec = registry.get("model", "bart")
    export = export_hf(build_model(spec, "seq2seq_lm", build_hf_config(spec, cfg.model, tok, 512)), tok,
                       tmp_path / "export")

    reloaded = AutoTokenizer.from_pretrained(str(export))
    eos, limit = tok.eos_token_id, dm.stats["max_source_tokens"]
    whole = 0
    for split in ("train", "validation", "test"):
        for item in dm.datasets[split].items:
            document, _ = dm.example(split, item["index"])
            trained = item["input_ids"]
            assert trained[-1] == eos and trained[-2] != eos  # one EOS, not the tokenizer's and _end_with's
            assert reloaded(document, truncation=True, max_length=limit)["input_ids"] == trained
            if len(trained) < limit:
                whole += 1
                assert reloaded(document)["input_ids"] == trained
    assert 0 < whole < sum(len(d) for d in dm.datasets.values())  # documents cut to the limit and whole ones


@pytest.mark.parametrize("model", ["gpt2", "bart"])
def test_generated_summaries_never_hold_a_padded_id(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.vocab_multiple's padding rows are suppressed in the task's own decoding (validation, test, predict)."""
    from lmlab.tokenization import train_bpe

    tok = train_bpe(["Shares in the bank rose after record profits.", "The minister resigned on Friday."] * 30,
                    300, 1)
    cfg = compose_cfg(["task=summarization", f"model={model}", "model.size=tiny", "++model.vocab_multiple=64",
                       "task.generation.max_new_tokens=8"])
    task, spec = registry.get("task", "summarization"), registry.get("model", model)
    torch.manual_seed(0)
    net = build_model(spec, task.head(cfg), build_hf_config(spec, cfg.model, tok, 64)).eval()
    assert net.config.vocab_size > len(tok)
    # Padding rows that outscore every token at every step: what sampling or a barely trained model hit now and then.
    boost = torch.zeros(net.config.vocab_size)
    boost[len(tok):] = 100.0
    net.get_output_embeddings().register_forward_hook(lambda module, args, logits: logits + boost)
    module = task.build_module(cfg, net, tok)
    outputs: list[torch.Tensor] = []
    generate = net.generate

    def recorded(*args: object, **kwargs: object) -> torch.Tensor:
        outputs.append(generate(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(net, "generate", recorded)

    documents = tok(["Shares in the bank rose.", "The minister resigned on Friday."])["input_ids"]
    items = [{"input_ids": ids, "labels": [tok.eos_token_id], "prompt_ids": ids, "index": i}
             for i, ids in enumerate(documents)]
    texts = module.generate(S.Collator(tok.pad_token_id, S.packing(cfg))(items))
    (generated,) = outputs
    assert int((generated >= len(tok)).sum()) == 0
    assert all(texts)  # a padded id decodes to nothing


# -- end to end ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model", ["bart", "t5", "gpt2"])
def test_trains_and_scores_end_to_end(runs: dict, model: str, tmp_path: Path) -> None:
    import mlflow

    result, cfg = runs[model]
    m = result.metrics
    assert math.isfinite(m["val/loss"]) and m["val/loss"] > 0
    assert math.isfinite(m["test/loss"])
    assert 0.0 <= m["test/bleu"] <= 100.0 and 0.0 <= m["val/bleu"] <= 100.0
    for key in ("rouge1", "rouge2", "rougeL"):
        assert 0.0 <= m[f"test/{key}"] <= 1.0 and 0.0 <= m[f"val/{key}"] <= 1.0
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    logged = client.get_run(result.run_id).data.metrics
    assert "test/bleu" in logged and "val/rougeL" in logged
    files = {f.path for f in client.list_artifacts(result.run_id, "predictions")}
    assert "predictions/test_predictions.jsonl" in files
    local = client.download_artifacts(result.run_id, "predictions/test_predictions.jsonl", str(tmp_path))
    rows = [json.loads(line) for line in Path(local).read_text().splitlines()]
    assert len(rows) == 10 and set(rows[0]) == {"document", "reference", "generated"}
    references = [json.loads(line)["summary"] for line in (NEWS / "test.jsonl").open() if line.strip()][:10]
    assert [r["reference"] for r in rows] == [" ".join(r.split()) for r in references]
    assert "samples.json" in {f.path for f in client.list_artifacts(result.run_id)}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bart", "t5"])
def test_export_reloads_with_auto_classes(runs: dict, model: str) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    result, cfg = runs[model]
    export = result.export_dir
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    exported = AutoModelForSeq2SeqLM.from_pretrained(str(export)).eval()
    assert exported.config.model_type == model
    assert exported.config.decoder_start_token_id == (tokenizer.eos_token_id if model == "bart" else tokenizer.pad_token_id)

    spec = registry.get("model", model)
    task = registry.get("task", "summarization")
    hf_config = build_hf_config(spec, cfg.model, tokenizer, int(cfg.data.block_size))
    ckpt = torch.load(result.output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    fresh = build_model(spec, task.head(cfg), hf_config).eval()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected

    inputs = tokenizer(["Shares in the bank rose sharply after it reported record profits."], return_tensors="pt")
    decoder = torch.tensor([[exported.config.decoder_start_token_id, 5, 6]])
    with torch.no_grad():
        got = exported(**inputs, decoder_input_ids=decoder).logits
        want = fresh(**inputs, decoder_input_ids=decoder).logits
    assert torch.allclose(got, want, atol=1e-5)
    generated = exported.generate(**inputs, max_new_tokens=5)
    assert generated.shape[0] == 1


@pytest.mark.slow
def test_mode_test_on_the_export_scores_what_the_run_did(runs: dict, news: Path) -> None:
    """The export's tokenizer already ends sources with EOS: scoring the export adds no second one."""
    result, _ = runs["bart"]
    cfg = compose_cfg([*TINY, "task=summarization", "model=bart", f"data.path={news}", *FAST, "mode=test",
                       f"model.pretrained={result.export_dir}"])
    scored = run(cfg)
    for key in ("test/loss", "test/bleu", "test/rouge1", "test/rouge2", "test/rougeL"):
        assert scored.metrics[key] == pytest.approx(result.metrics[key], abs=1e-5), key


def test_decoding_stops_at_the_token_summaries_end_with() -> None:
    # WordPiece has no eos: summaries are packed ending with [SEP], so generation must stop there.
    from omegaconf import OmegaConf

    from lmlab.tasks.summarization import generation_settings
    from lmlab.tokenization import train_wordpiece

    tok = train_wordpiece(["a short headline about markets", "another text"] * 20, 200, 1, True)
    assert tok.eos_token_id is None
    settings = generation_settings(OmegaConf.create({"generation": {}}), tok)
    assert settings["eos_token_id"] == tok.sep_token_id and settings["pad_token_id"] == tok.pad_token_id


@pytest.mark.parametrize("model", ["bart", "gpt2"])
def test_no_repeat_ngram_size_zero_turns_off_the_loaded_models_own(model: str) -> None:
    """task.generation.no_repeat_ngram_size=0 is off, even for a model whose generation config blocks
    trigrams (facebook/bart-large-cnn's, or an export of +experiment=summarization): it used to keep them blocked."""
    from lmlab.tokenization import train_bpe

    tok = train_bpe(["Shares in the bank rose after record profits.", "The minister resigned on Friday."] * 30,
                    300, 1)
    task, spec = registry.get("task", "summarization"), registry.get("model", model)
    word = tok("rose", add_special_tokens=False)["input_ids"][0]
    document = tok(["Shares in the bank fell."], add_special_tokens=model == "bart")["input_ids"][0]
    batch = S.Collator(tok.pad_token_id, S.packing(compose_cfg(["task=summarization", f"model={model}"])))(
        [{"input_ids": document, "labels": [tok.eos_token_id], "prompt_ids": document, "index": 0}])

    def summary(no_repeat: int) -> list[int]:
        cfg = compose_cfg(["task=summarization", f"model={model}", "model.size=tiny", "task.generation.max_new_tokens=5",
                           f"task.generation.no_repeat_ngram_size={no_repeat}"])
        torch.manual_seed(0)
        net = build_model(spec, task.head(cfg), build_hf_config(spec, cfg.model, tok, 64)).eval()
        net.generation_config.no_repeat_ngram_size = 3
        boost = torch.zeros(net.config.vocab_size)
        boost[word] = 100.0  # a model that says one word over and over
        net.get_output_embeddings().register_forward_hook(lambda module, args, logits: logits + boost)
        text = task.build_module(cfg, net, tok).generate(batch)[0]
        return tok(text, add_special_tokens=False)["input_ids"]

    repeated = [word] * (4 if model == "bart" else 5)  # BART forces EOS at the last step
    assert summary(0) == repeated
    assert summary(3) != repeated  # the constraint itself still works when asked for


@pytest.mark.parametrize("model", ["bart", "gpt2"])
def test_a_loaded_models_minimum_length_does_not_outlast_max_new_tokens(model: str) -> None:
    """facebook/bart-large-cnn's generation config holds min_length=56: kept, it blocked EOS past
    task.generation.max_new_tokens, so a model that wanted to stop ran every summary to the cap."""
    from lmlab.tokenization import train_bpe

    tok = train_bpe(["Shares in the bank rose after record profits.", "The minister resigned on Friday."] * 30,
                    300, 1)
    task, spec = registry.get("task", "summarization"), registry.get("model", model)
    cfg = compose_cfg(["task=summarization", f"model={model}", "model.size=tiny", "task.generation.max_new_tokens=8"])
    torch.manual_seed(0)
    net = build_model(spec, task.head(cfg), build_hf_config(spec, cfg.model, tok, 64)).eval()
    net.generation_config.min_length = 56
    word = tok("rose", add_special_tokens=False)["input_ids"][0]
    boost = torch.zeros(net.config.vocab_size)
    boost[tok.eos_token_id], boost[word] = 100.0, 50.0  # a model that would end the summary at once
    net.get_output_embeddings().register_forward_hook(lambda module, args, logits: logits + boost)
    document = tok(["Shares in the bank fell."], add_special_tokens=model == "bart")["input_ids"][0]
    batch = S.Collator(tok.pad_token_id, S.packing(cfg))(
        [{"input_ids": document, "labels": [tok.eos_token_id], "prompt_ids": document, "index": 0}])
    module = task.build_module(cfg, net, tok)
    assert module.generate(batch) == [""]
    assert net.generation_config.min_length == 0  # and so the export's generation_config.json


def test_a_null_length_penalty_is_transformers_default() -> None:
    """validate() accepts task.generation.length_penalty=null; with beam search it used to be float(None)."""
    from lmlab.tokenization import train_bpe

    tok = train_bpe(["a short headline about markets", "another text"] * 20, 200, 1)
    cfg = compose_cfg(["task=summarization", "task.generation.num_beams=4", "task.generation.length_penalty=null"])
    S.validate(cfg)
    assert S.generation_settings(cfg.task, tok)["length_penalty"] == 1.0


# -- reading pairs: stray files, field types, empty pairs, byte-order marks ----------------------------
def _pairs_cfg(path: Path):
    return compose_cfg(["task=summarization", f"data.path={path}"]).data


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


GOOD_PAIRS = [{"document": f"document {i} tells a long story about item {i}", "summary": f"item {i}"}
              for i in range(20)]


def test_a_split_named_directory_refuses_files_of_no_split(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", GOOD_PAIRS)
    _write_jsonl(tmp_path / "validation.jsonl", GOOD_PAIRS[:4])
    _write_jsonl(tmp_path / "train_old.jsonl", GOOD_PAIRS)  # left out silently before
    with pytest.raises(LmlabError, match=r"'data.path'.*1 file\(s\) fit no split.*train_old\.jsonl"):
        S.load_pairs(_pairs_cfg(tmp_path))
    (tmp_path / "train_old.jsonl").unlink()
    splits, _ = S.load_pairs(_pairs_cfg(tmp_path))
    assert len(splits["train"]) == 20 and len(splits["validation"]) == 4
    # Without split names the directory is still one pool.
    pool = tmp_path / "pool"
    _write_jsonl(pool / "part1.jsonl", GOOD_PAIRS[:12])
    _write_jsonl(pool / "part2.jsonl", GOOD_PAIRS[8:])  # 4 pairs again: the pool keeps one of each
    splits, _ = S.load_pairs(_pairs_cfg(pool))
    assert sum(len(p) for p in splits.values()) == 20


@pytest.mark.parametrize(("value", "kind"), [(5, "number"), (["a", "b"], "array"), ({"text": "x"}, "object"),
                                              (True, "boolean")])
@pytest.mark.parametrize("key", ["document", "summary"])
def test_a_field_that_is_not_a_string_names_file_line_and_field(tmp_path: Path, key: str, value, kind: str) -> None:
    bad = dict(GOOD_PAIRS[0], **{key: value})
    path = _write_jsonl(tmp_path / "pairs.jsonl", [*GOOD_PAIRS[:6], bad, *GOOD_PAIRS[6:]])
    with pytest.raises(LmlabError) as info:
        S.load_pairs(_pairs_cfg(path))
    message = str(info.value)
    assert f"{path}, line 7" in message and f"field '{key}'" in message and f"JSON {kind}" in message


def test_pairs_with_an_empty_side_are_left_out_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty = [{"document": "   ", "summary": "x"}, {"document": "a text", "summary": ""},
             {"document": None, "summary": "y"}]
    path = _write_jsonl(tmp_path / "pairs.jsonl", [*GOOD_PAIRS[:2], *empty, *GOOD_PAIRS[2:]])
    with caplog.at_level("WARNING", logger="lmlab.tasks.summarization"):
        pairs = S.read_file(path, _pairs_cfg(path))
    assert len(pairs) == 20
    (record,) = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert str(path) in record.getMessage() and "3 of 23 records" in record.getMessage()
    assert "line 3, 4, 5" in record.getMessage()


def test_a_short_csv_row_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("document,summary\n" + "".join(f'"{p["document"]}",{p["summary"]}\n' for p in GOOD_PAIRS[:5])
                    + "a document whose summary column is missing\n", encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        S.load_pairs(_pairs_cfg(path))
    assert f"{path}, line 7" in str(info.value) and "1 fields under a header of 2" in str(info.value)


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.csv", "pairs.tsv"])
def test_a_utf8_byte_order_mark_and_tsv_quotes(tmp_path: Path, name: str) -> None:
    records = [{"document": '"No," said the minister, "not this year."', "summary": "minister says no"},
               {"document": "plain text of a second article", "summary": "second"}] * 3
    path = tmp_path / name
    if name.endswith(".jsonl"):
        body = "".join(json.dumps(r) + "\n" for r in records)
    elif name.endswith(".csv"):
        import csv
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["document", "summary"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        body = out.getvalue()
    else:
        body = "document\tsummary\n" + "".join(f"{r['document']}\t{r['summary']}\n" for r in records)
    path.write_text("\ufeff" + body, encoding="utf-8")
    pairs = S.read_file(path, _pairs_cfg(path))
    assert pairs.documents == [r["document"] for r in records] and pairs.summaries == [r["summary"] for r in records]


def _tiny_bart_summarizer() -> tuple:
    """(tokenizer, config, model, module): a tiny untrained BART summarizer that summarizes the
    first 2 batches of 3 validation examples in 2 tokens."""
    from lmlab.tokenization import train_bpe

    tok = train_bpe(["Shares in the bank rose after record profits.", "The minister resigned on Friday."] * 30,
                    300, 1)
    cfg = compose_cfg(["task=summarization", "model=bart", "model.size=tiny", "task.generation.max_new_tokens=2",
                       "task.generate_val_batches=2", "data.eval_batch_size=3"])
    task, spec = registry.get("task", "summarization"), registry.get("model", "bart")
    torch.manual_seed(0)
    net = build_model(spec, task.head(cfg), build_hf_config(spec, cfg.model, tok, 64)).eval()
    return tok, cfg, net, task.build_module(cfg, net, tok)


def test_validation_summarizes_the_same_examples_at_any_number_of_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """task.generate_val_batches counts examples of the split, not each process's batches: over 2
    processes (ShardedSampler's shards) the summarized indices are one process's, each once."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from lmlab.data import loaders
    tok, cfg, net, module = _tiny_bart_summarizer()
    monkeypatch.setattr(S.SummarizationModule, "trainer",
                        SimpleNamespace(datamodule=SimpleNamespace(cfg=cfg.data)), raising=False)
    ids = tok(["Shares in the bank rose."])["input_ids"][0]
    items = [{"input_ids": ids, "labels": [tok.eos_token_id], "prompt_ids": ids, "index": i} for i in range(11)]
    collate = S.Collator(tok.pad_token_id, S.packing(cfg))

    def summarized(rank: int, world: int) -> tuple[list[int], int]:
        monkeypatch.setattr(loaders, "process_group", lambda: (rank, world))
        sampler = loaders.ShardedSampler(len(items), shuffle=False)
        module.generated, calls = [], 0
        for batch_idx, batch in enumerate(DataLoader(items, batch_size=3, sampler=sampler, collate_fn=collate)):
            before = len(module.generated)
            module.validation_step(batch, batch_idx)
            calls += len(module.generated) > before
        return [index for index, _ in module.generated], calls

    alone, alone_calls = summarized(0, 1)
    assert alone == list(range(6)) and alone_calls == 2  # 2 batches of 3
    (first, first_calls), (second, second_calls) = summarized(0, 2), summarized(1, 2)
    assert sorted(first + second) == alone  # the same examples, none twice
    assert first_calls == 1 and second_calls == 1  # the work is shared, not doubled


def test_under_fsdp_every_process_generates_for_the_same_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP and DeepSpeed gather parameters inside each forward, so generate() is a collective: every
    process calls it for the same batches, with synced_gpus (each process's batch ends at its own
    step). Which examples are summarized does not change: those of one process."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from torch.utils.data import DataLoader

    from lmlab.data import loaders
    tok, cfg, net, module = _tiny_bart_summarizer()
    synced: list[bool] = []
    real_generate = net.generate

    def generate(**kwargs):
        synced.append(kwargs.pop("synced_gpus", False))  # no process group here to sync with
        return real_generate(**kwargs)

    monkeypatch.setattr(net, "generate", generate)
    ids = tok(["Shares in the bank rose."])["input_ids"][0]
    items = [{"input_ids": ids, "labels": [tok.eos_token_id], "prompt_ids": ids, "index": i} for i in range(13)]
    collate = S.Collator(tok.pad_token_id, S.packing(cfg))

    def run(rank: int, world: int) -> tuple[list[int], list[int]]:
        """(summarized indices, the batches generate() was called for) of one process."""
        trainer = SimpleNamespace(datamodule=SimpleNamespace(cfg=cfg.data), world_size=world,
                                  strategy=object.__new__(FSDPStrategy))
        monkeypatch.setattr(module, "_trainer", trainer)
        monkeypatch.setattr(S.SummarizationModule, "trainer", trainer, raising=False)
        monkeypatch.setattr(loaders, "process_group", lambda: (rank, world))
        module.generated, calls = [], []
        loader = DataLoader(items, batch_sampler=loaders.EvalBatches(len(items), 3), collate_fn=collate)
        for batch_idx, batch in enumerate(loader):
            before = len(synced)
            module.validation_step(batch, batch_idx)
            calls += [batch_idx] * (len(synced) - before)
        return [index for index, _ in module.generated], calls

    alone, _ = run(0, 1)
    assert alone == list(range(6)) and not any(synced)
    synced.clear()
    (first, first_calls), (second, second_calls) = run(0, 2), run(1, 2)
    assert first_calls == second_calls == [0, 1]  # the same batches on both, though only 0-5 are kept
    assert sorted(first + second) == alone and all(synced)


# -- mode=predict inputs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor() -> tuple:
    """A tiny untrained BART, its tokenizer and a CPU trainer: what mode=predict hands S.predict."""
    import lightning as L

    from lmlab.tokenization import train_bpe

    if not NEWS.exists():
        pytest.skip(f"real test data missing: {NEWS}")
    records = [json.loads(line) for line in (NEWS / "test.jsonl").read_text(encoding="utf-8").splitlines()[:6]]
    tok = train_bpe([r["document"] for r in records], 400, 1)
    cfg = compose_cfg(["task=summarization", "model=bart", "model.size=tiny", "task.generation.max_new_tokens=4"])
    task, spec = registry.get("task", "summarization"), registry.get("model", "bart")
    torch.manual_seed(0)
    module = task.build_module(cfg, build_model(spec, task.head(cfg), build_hf_config(spec, cfg.model, tok, 64)), tok)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    return records, module, tok, trainer


def _predict(predictor: tuple, path: Path, out: Path) -> list[dict]:
    _, module, tok, trainer = predictor
    cfg = compose_cfg(["task=summarization", "model=bart", f"data.path={path}", "mode=predict"])
    (written,) = S.predict(cfg, module, tok, trainer, out)
    return [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(("value", "kind"), [(1234, "number"), (None, "null"), (["a", "b"], "array")])
def test_predict_refuses_a_document_that_is_not_a_string(predictor: tuple, tmp_path: Path, value, kind: str) -> None:
    """Read as "", such a document got a summary of nothing, and the predictions file gave no sign of it."""
    records = predictor[0]
    path = _write_jsonl(tmp_path / "to_summarise.jsonl", [*records[:3], dict(records[3], document=value), *records[4:]])
    with pytest.raises(LmlabError) as info:
        _predict(predictor, path, tmp_path / "out")
    message = str(info.value)
    assert f"{path}, line 4: field 'document' holds a JSON {kind}" in message and "data.document_field" in message
    assert not (tmp_path / "out").exists()


def test_predict_takes_documents_with_or_without_a_reference(predictor: tuple, tmp_path: Path) -> None:
    records = predictor[0]
    path = _write_jsonl(tmp_path / "to_summarise.jsonl", [*records[:2], dict(records[2], summary=None)])
    rows = _predict(predictor, path, tmp_path / "out")
    assert [r["document"] for r in rows] == [" ".join(r["document"].split()) for r in records[:3]]
    assert [r["reference"] for r in rows] == [records[0]["summary"], records[1]["summary"], ""]
    # A reference that is not text is as wrong in a predict input as in training data.
    bad = _write_jsonl(tmp_path / "bad.jsonl", [*records[:2], dict(records[2], summary=7)])
    with pytest.raises(LmlabError, match=rf"{re.escape(str(bad))}, line 3: field 'summary' holds a JSON number"):
        _predict(predictor, bad, tmp_path / "out2")


def test_predict_names_the_line_of_a_short_csv_row(predictor: tuple, tmp_path: Path) -> None:
    import csv

    path = tmp_path / "to_summarise.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["summary", "document"])
        writer.writerows([r["summary"], r["document"]] for r in predictor[0][:2])
        f.write("a headline with no document after it\n")
    with pytest.raises(LmlabError, match=rf"{re.escape(str(path))}, line 4: has no value in column 'document'"):
        _predict(predictor, path, tmp_path / "out")


# -- predictions files: whole or absent ----------------------------------------------------------------
def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def test_export_predictions_cut_short_leaves_the_previous_file(tmp_path: Path) -> None:
    """A full disk mid-export used to leave a truncated test_predictions.jsonl behind."""
    if not NEWS.exists():
        pytest.skip(f"real test data missing: {NEWS}")
    records = [json.loads(line) for line in (NEWS / "test.jsonl").read_text(encoding="utf-8").splitlines()[:4]]
    # Non-ASCII text: the file is UTF-8, not \u escapes.
    rows = [{"document": r["document"], "reference": r["summary"], "generated": f"{r['summary'][:20]} – é"}
            for r in records]

    def rows_until_the_disk_fills():
        yield from rows[:2]
        raise disk_full()

    out = tmp_path / "predictions"
    out.mkdir()
    (out / "test_predictions.jsonl").write_text("an earlier run's predictions\n", encoding="utf-8")
    with pytest.raises(OSError, match="No space left"):
        S.SummarizationModule.export_predictions(SimpleNamespace(predictions=rows_until_the_disk_fills()), out)
    assert [p.name for p in out.iterdir()] == ["test_predictions.jsonl"]  # no .tmp beside it
    assert (out / "test_predictions.jsonl").read_text(encoding="utf-8") == "an earlier run's predictions\n"

    assert S.SummarizationModule.export_predictions(SimpleNamespace(predictions=rows), out) == \
        [out / "test_predictions.jsonl"]
    assert [p.name for p in out.iterdir()] == ["test_predictions.jsonl"]
    expected = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    assert (out / "test_predictions.jsonl").read_bytes() == expected.encode("utf-8")


def test_predict_cut_short_leaves_no_predictions_and_no_temporary_file(predictor: tuple, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    records = predictor[0][:4]
    path = _write_jsonl(tmp_path / "to_summarise.jsonl", records)
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text("an earlier prediction\n", encoding="utf-8")
    clean = S._clean

    def clean_until_the_disk_fills(value):
        # The references are cleaned as their lines are written: the third one finds the disk full.
        if value == records[2]["summary"]:
            raise disk_full()
        return clean(value)

    monkeypatch.setattr(S, "_clean", clean_until_the_disk_fills)
    with pytest.raises(OSError, match="No space left"):
        _predict(predictor, path, out)
    assert [p.name for p in out.iterdir()] == ["predictions.jsonl"]
    assert (out / "predictions.jsonl").read_text(encoding="utf-8") == "an earlier prediction\n"

    monkeypatch.setattr(S, "_clean", clean)
    rows = _predict(predictor, path, out)
    assert [p.name for p in out.iterdir()] == ["predictions.jsonl"]
    assert [r["reference"] for r in rows] == [r["summary"] for r in records]
    expected = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    assert (out / "predictions.jsonl").read_bytes() == expected.encode("utf-8")


# -- precision -----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::lmlab.tasks.summarization.SummaryTruncationWarning")
def test_validation_loss_is_summed_in_float32_under_bf16_true(tmp_path: Path) -> None:
    """Lightning's bf16-true casts the module, the loss and token-count sums included: in bfloat16 (8
    significant bits) the totals drifted and stalled, and val/loss here came out 6.03 for 6.24.
    MetricsInFloat32 (every task's, through build_trainer) casts the sums back."""
    import lightning as L

    from lmlab.precision import MetricsInFloat32
    from lmlab.tokenization import train_bpe

    if not NEWS.exists():
        pytest.skip(f"real test data missing: {NEWS}")
    for split, n in (("train", 32), ("validation", 365)):
        _copy(NEWS / f"{split}.jsonl", tmp_path / f"{split}.jsonl", n)
    cfg = compose_cfg(["task=summarization", "model=bart", "model.size=tiny", f"data.path={tmp_path}",
                       "data.max_source_length=32", "data.max_target_length=24", "data.eval_batch_size=4",
                       "task.generate_val_batches=0"])
    dm = S.SummarizationDataModule(cfg.data, packing="seq2seq", seed=0)
    tok = train_bpe(dm.texts_for_tokenizer(), 500, 2)
    dm.set_tokenizer(tok)
    task, spec = registry.get("task", "summarization"), registry.get("model", "bart")
    torch.manual_seed(0)
    module = task.build_module(cfg, build_model(spec, task.head(cfg), build_hf_config(spec, cfg.model, tok, 64)), tok)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-true", logger=False, callbacks=[MetricsInFloat32()],
                        enable_progress_bar=False, enable_model_summary=False)  # lmlab's build_trainer adds it
    (logged,) = trainer.validate(module, datamodule=dm)

    module.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            loss_sum, count = module.token_losses(batch)
            total, tokens = total + float(loss_sum), tokens + int(count)
    assert module.model.dtype == torch.bfloat16 and tokens > 4096  # past where bf16 counts exactly
    assert logged["val/loss"] == pytest.approx(total / tokens, rel=1e-4)


def test_a_t5_source_prefix_comes_from_the_model_or_data_and_reaches_the_export_config(news: Path,
                                                                                       tmp_path: Path) -> None:
    """t5-small was trained on "summarize: <document>" and says so in task_specific_params; without the
    prefix it is fine-tuned on inputs it never saw (HF run_summarization's --source_prefix). null takes
    the model's, "" none, a string that one; a prefix in use is written into the config the run exports."""
    from transformers import T5Config, T5ForConditionalGeneration

    from lmlab.tokenization import train_bpe
    from lmlab.train import prepare_model_and_tokenizer

    common = [*TINY, "task=summarization", "model=t5", f"data.path={news}", "data.max_source_length=64"]
    dm = S.SummarizationDataModule(compose_cfg(common).data, packing="seq2seq", seed=0)
    tok = train_bpe(dm.texts_for_tokenizer(), 500, 2)
    params = {"summarization": {"prefix": "summarize: ", "min_length": 30},
              "translation_en_to_de": {"prefix": "translate English to German: "}}
    config = T5Config(num_layers=1, d_model=16, d_kv=8, num_heads=2, d_ff=32, vocab_size=len(tok),
                      decoder_start_token_id=tok.pad_token_id or 0, task_specific_params=params)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    task, spec = registry.get("task", "summarization"), registry.get("model", "t5")

    def first_input(*extra: str) -> tuple[bool, dict]:
        """Whether the first training document is read after "summarize:", and the model's task params."""
        cfg = compose_cfg([*common, *extra])
        dm = S.SummarizationDataModule(cfg.data, packing="seq2seq", seed=0)
        tokenizer, model, _ = prepare_model_and_tokenizer(cfg, task, spec, dm)
        dm.setup("fit")
        marker = tokenizer("summarize:", add_special_tokens=False)["input_ids"]
        prefixed = dm.datasets["train"].items[0]["input_ids"][:len(marker)] == marker
        return prefixed, getattr(model.config, "task_specific_params", None) or {}

    assert first_input(f"model.pretrained={tmp_path / 't5'}") == (True, params)  # the model's; its other tasks kept
    assert first_input(f"model.pretrained={tmp_path / 't5'}", "data.source_prefix=")[0] is False
    # From scratch: the data's prefix, written into the config; nothing asked, nothing written.
    assert first_input("data.source_prefix='summarize: '") == (True, {"summarization": {"prefix": "summarize: "}})
    assert first_input() == (False, {})
