"""Every shipped config composes; overrides are checked; MLflow params stay within limits."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmlab import registry
from lmlab.checks import unset_required, check_required
from lmlab.errors import LmlabError
from lmlab.models.bert import MODEL as BERT
from lmlab.models.build import build_hf_config
from lmlab.models.gpt2 import MODEL as GPT2
from lmlab.paths import config_dir, experiments_dir
from lmlab.tokenization import train_bpe, train_wordpiece
from lmlab.tracking import MAX_PARAM_KEY, MAX_PARAM_VALUE, flatten, logged_params

GROUP_OPTIONS = sorted(p.relative_to(config_dir()) for p in config_dir().glob("*/*.yaml"))
EXPERIMENTS = sorted(experiments_dir().glob("*.yaml"))


def test_the_configs_were_found():
    groups = {p.parent.name for p in GROUP_OPTIONS}
    assert {"data", "model", "task", "tokenizer", "trainer", "optimizer", "scheduler", "logger"} <= groups
    assert Path("model/bert.yaml") in GROUP_OPTIONS and Path("task/mlm.yaml") in GROUP_OPTIONS
    assert [p.stem for p in EXPERIMENTS] and "debug" in [p.stem for p in EXPERIMENTS]


def _is_global(path: Path) -> bool:
    return any(line.strip() == "# @package _global_" for line in path.read_text().splitlines()[:3])


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf; interpolations stay unresolved (they may point elsewhere)."""
    if isinstance(node, DictConfig):
        for key in node:
            if key == "defaults" and not prefix:
                continue
            yield from _leaves(node._get_node(key), f"{prefix}{key}.")
    elif isinstance(node, ListConfig):
        yield prefix[:-1], node
    else:
        yield prefix[:-1], node._value()


def _assert_applied(cfg: DictConfig, path: Path, package: str) -> None:
    """Every value the YAML file sets is in the composed config."""
    own = OmegaConf.load(path)
    leaves = list(_leaves(own))
    for key, value in leaves:
        full = f"{package}.{key}" if package else key
        if isinstance(value, str) and value.startswith("${lmlab.required:"):
            continue  # the test sets these on the command line
        if isinstance(value, str) and "${" in value:
            # Compare the interpolation itself: resolving it needs the rest of the config.
            parent, _, leaf = full.rpartition(".")
            composed = (OmegaConf.select(cfg, parent) if parent else cfg)._get_node(leaf)._value()
        else:
            composed = OmegaConf.select(cfg, full)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
            composed = OmegaConf.to_container(composed)
        assert composed == value, f"{path.name}: {key}"


def test_default_config_composes():
    cfg = compose_cfg([])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["task"]["name"] == "clm" and resolved["model"]["name"] == "gpt2"
    assert resolved["data"]["catalog"] == "bbc_news"
    assert resolved["paths"]["root"].endswith("lmlab_home")  # LMLAB_HOME from the autouse fixture


@pytest.mark.parametrize("rel", GROUP_OPTIONS, ids=[p.as_posix() for p in GROUP_OPTIONS])
def test_every_group_option_composes(rel: Path):
    group, option = rel.parent.name, rel.stem
    cfg = compose_cfg([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    path = config_dir() / rel
    _assert_applied(cfg, path, "" if _is_global(path) else group)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_composes(path: Path):
    for base in ([], ["task=mlm"]):
        cfg = compose_cfg([*base, f"+experiment={path.stem}"])
        required = [key for key, _ in unset_required(OmegaConf.to_container(cfg, resolve=False))]
        if required:  # the preset's required keys (ner_finetune: model.pretrained) stop a run unset
            with pytest.raises(LmlabError, match=f"config key '{required[0]}': is required"):
                check_required(cfg)
            cfg = compose_cfg([*base, f"+experiment={path.stem}", *(f"{key}=/some/value" for key in required)])
        OmegaConf.to_container(cfg, resolve=True)
        _assert_applied(cfg, path, "")  # register_experiments stores them in the global package


def test_mlm_picks_bert_unless_told_otherwise():
    assert compose_cfg(["task=mlm"]).model.name == "bert"
    cfg = compose_cfg(["task=mlm", "model=gpt2"])
    assert cfg.model.name == "gpt2" and cfg.task.name == "mlm"
    assert compose_cfg(["model=bert"]).task.name == "clm"
    assert compose_cfg([]).model.name == "gpt2"


@pytest.mark.parametrize("task", ["classification", "ner", "summarization"])
def test_heads_fine_tune_a_pretrained_backbone_at_a_lower_learning_rate(task: str):
    # 1e-3 suits training from scratch and wrecks a trained encoder (the head stays at chance).
    assert compose_cfg([f"task={task}"]).optimizer.lr == 1e-3
    assert compose_cfg([f"task={task}", "model.pretrained=/some/model"]).optimizer.lr == 5e-5
    assert compose_cfg([f"task={task}", "model.pretrained=/m", "optimizer.lr=2e-5"]).optimizer.lr == 2e-5
    assert compose_cfg(["task=clm", "model.pretrained=/some/model"]).optimizer.lr == 1e-3


def test_ddp_on_the_cpu_is_ddp_with_the_cpu_presets_settings():
    # trainer=ddp alone inherits trainer=gpu's bf16-mixed and 5000 steps; ddp_cpu repeats cpu.yaml's.
    ddp_cpu = OmegaConf.to_container(compose_cfg(["trainer=ddp_cpu"]).trainer)
    cpu = OmegaConf.to_container(compose_cfg(["trainer=cpu"]).trainer)
    ddp = OmegaConf.to_container(compose_cfg(["trainer=ddp"]).trainer)
    assert ddp_cpu["strategy"] == ddp["strategy"] and ddp_cpu["devices"] == 2
    assert {k: v for k, v in ddp_cpu.items() if k not in ("strategy", "devices")} == \
        {k: v for k, v in cpu.items() if k not in ("strategy", "devices")}


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="trainer.not_a_key"):
        compose_cfg(["trainer.not_a_key=1"])
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["data.blocksize=64"])


def test_mlm_validates_its_probabilities():
    task = registry.get("task", "mlm")
    task.validate(compose_cfg(["task=mlm"]))
    with pytest.raises(LmlabError, match=r"^config key 'task.mask_replace_prob': .*random_replace_prob"):
        task.validate(compose_cfg(["task=mlm", "task.mask_replace_prob=0.9", "task.random_replace_prob=0.2"]))
    with pytest.raises(LmlabError, match=r"^config key 'task.mlm_probability': 0.0 must be between 0 and 1"):
        task.validate(compose_cfg(["task=mlm", "task.mlm_probability=0"]))
    with pytest.raises(LmlabError, match=r"^config key 'task.fixed_size_gather': 'sometimes' must be auto"):
        task.validate(compose_cfg(["task=mlm", "task.fixed_size_gather=sometimes"]))


@pytest.fixture(scope="module")
def bpe_tokenizer():
    texts = [f"line {i} of some short text about stick insects and leaves" for i in range(200)]
    return train_bpe(texts, vocab_size=300, min_frequency=2)


@pytest.fixture(scope="module")
def wordpiece_tokenizer():
    texts = [f"line {i} of some short text about stick insects and leaves" for i in range(200)]
    return train_wordpiece(texts, vocab_size=300, min_frequency=2, lowercase=True)


def test_free_form_model_config_fields(bpe_tokenizer):
    cfg = compose_cfg(["model.config.n_layer=4", "model.config.resid_pdrop=0.1"])
    assert cfg.model.config.n_layer == 4
    config = build_hf_config(GPT2, cfg.model, bpe_tokenizer, int(cfg.data.block_size))
    assert config.n_layer == 4 and config.resid_pdrop == 0.1
    assert config.embd_pdrop == config.attn_pdrop == 0.0  # the sizes: no dropout from scratch
    assert config.n_embd == GPT2.sizes["tiny"]["n_embd"]  # the rest of the size preset stays
    # Rows rounded up to model.vocab_multiple (64); the tokenizer's ids are the first len(tokenizer).
    assert config.vocab_size == -(-len(bpe_tokenizer) // 64) * 64 >= len(bpe_tokenizer)
    assert config.eos_token_id == bpe_tokenizer.eos_token_id


def test_free_form_bert_fields(wordpiece_tokenizer):
    cfg = compose_cfg(["task=mlm", "model.config.num_hidden_layers=3"])
    config = build_hf_config(BERT, cfg.model, wordpiece_tokenizer, int(cfg.data.block_size))
    assert config.num_hidden_layers == 3 and config.hidden_size == 128
    assert config.pad_token_id == wordpiece_tokenizer.pad_token_id == 0
    assert config.vocab_size == -(-len(wordpiece_tokenizer) // 64) * 64


def test_unknown_model_config_field(bpe_tokenizer):
    cfg = compose_cfg(["model.config.n_layerz=4"])
    with pytest.raises(LmlabError) as info:
        build_hf_config(GPT2, cfg.model, bpe_tokenizer, 64)
    assert "model.config.n_layerz" in str(info.value) and "GPT2Config" in str(info.value)


def test_unknown_model_size(bpe_tokenizer):
    with pytest.raises(LmlabError, match="model.size"):
        build_hf_config(GPT2, compose_cfg(["model.size=huge"]).model, bpe_tokenizer, 64)


def test_block_size_longer_than_the_model_positions(bpe_tokenizer, wordpiece_tokenizer):
    cfg = compose_cfg(["data.block_size=512"])
    with pytest.raises(LmlabError) as info:
        build_hf_config(GPT2, cfg.model, bpe_tokenizer, int(cfg.data.block_size))
    assert "data.block_size" in str(info.value) and "n_positions=256" in str(info.value)
    # Raising the model's positions makes the same block size fit.
    cfg = compose_cfg(["data.block_size=512", "model.config.n_positions=512"])
    assert build_hf_config(GPT2, cfg.model, bpe_tokenizer, 512).n_positions == 512

    cfg = compose_cfg(["task=mlm", "data.block_size=1024"])
    with pytest.raises(LmlabError, match="data.block_size"):
        build_hf_config(BERT, cfg.model, wordpiece_tokenizer, int(cfg.data.block_size))


def test_the_catalog_param_is_none_when_data_path_or_name_replaces_it():
    assert logged_params(compose_cfg([]))["data.catalog"] == "bbc_news"
    assert logged_params(compose_cfg(["data.path=/corpus.txt"]))["data.catalog"] == "None"
    assert logged_params(compose_cfg(["data.name=wikitext"]))["data.catalog"] == "None"


def test_flatten_respects_mlflow_limits():
    long_key = "k" * 400
    tree = {
        "model": {"name": "gpt2", "config": {}},
        "data": {"path": "x" * 10_000, "block_size": 64},
        long_key: {"leaf": 1},
        "short": "y" * MAX_PARAM_VALUE,
    }
    flat = flatten(tree)
    assert flat["model.name"] == "gpt2"
    assert flat["model.config"] == "{}"
    assert flat["data.block_size"] == "64"
    assert len(flat["data.path"]) <= MAX_PARAM_VALUE == 6000
    assert flat["data.path"].startswith("x" * 5000) and flat["data.path"].endswith("(truncated)")
    assert flat["short"] == "y" * MAX_PARAM_VALUE  # exactly at the limit: kept whole
    assert all(len(k) <= MAX_PARAM_KEY == 250 for k in flat)
    assert all(len(v) <= MAX_PARAM_VALUE for v in flat.values())
    assert any(k.startswith("k" * 200) for k in flat)
    assert all(isinstance(v, str) for v in flat.values())

    # The whole composed config flattens within the limits too.
    real = flatten(OmegaConf.to_container(compose_cfg(["task=mlm"]), resolve=True))
    assert real["task.mlm_probability"] == "0.15" and real["model.name"] == "bert"


def test_the_test_split_can_be_capped_without_a_plus(tmp_path):
    # Lightning's limit_test_batches is in trainer/cpu.yaml (every preset extends it), so the override
    # needs no '+' and reaches the Trainer.
    from lmlab import registry
    from lmlab.train import build_trainer

    cfg = compose_cfg(["trainer.limit_test_batches=3", "trainer.enable_progress_bar=false"])
    trainer, _, _ = build_trainer(cfg, registry.get("task", "clm"), tmp_path, False)
    assert trainer.limit_test_batches == 3
    default, _, _ = build_trainer(compose_cfg(["trainer.enable_progress_bar=false"]), registry.get("task", "clm"),
                                  tmp_path, False)
    assert default.limit_test_batches == 1.0


def test_mlm_without_a_mask_token_names_the_key_that_chose_the_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    no_mask = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    task = registry.get("task", "mlm")
    with pytest.raises(LmlabError, match=r"^config key 'tokenizer': the tokenizer has no \[MASK\] token.*wordpiece"):
        task.build_module(compose_cfg(["task=mlm"]), None, no_mask)
    with pytest.raises(LmlabError, match=r"^config key 'model.pretrained': the tokenizer of /m/gpt2 has no \[MASK\]"):
        task.build_module(compose_cfg(["task=mlm", "model.pretrained=/m/gpt2"]), None, no_mask)


def test_a_sequence_past_the_models_positions_names_the_key_that_set_its_length(bpe_tokenizer):
    from lmlab.train import longest_sequence

    for overrides, key in ((["task=clm", "data.block_size=4096"], "data.block_size"),
                           (["task=ner", "data.max_length=4096"], "data.max_length")):
        cfg = compose_cfg([*overrides, "model.config.n_positions=512"])
        assert longest_sequence(cfg.data) == (key, 4096)
        with pytest.raises(LmlabError, match=rf"^config key '{key}': 4096 is longer .*Lower {key} to at most 512"):
            build_hf_config(GPT2, cfg.model, bpe_tokenizer, 4096, length_key=key)
