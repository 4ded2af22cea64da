"""The multi-GPU presets' strategies, built on the CPU without launching: what Lightning is handed."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import compose_cfg
from omegaconf import OmegaConf

from lmlab.distributed import block_classes, build_strategy, effective_batch, gathered_state_dict
from lmlab.errors import LmlabError


def tiny(model: str, layers: int) -> torch.nn.Module:
    """The four built-in architectures at 16 dims, with ``layers`` layers per stack."""
    if model == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=layers, n_embd=16, n_head=2, n_positions=32, vocab_size=64))
    if model == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(num_hidden_layers=layers, hidden_size=16, num_attention_heads=2,
                                                intermediate_size=32, vocab_size=64))
    if model == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(
            encoder_layers=layers, decoder_layers=layers, d_model=16, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64))
    return tf.T5ForConditionalGeneration(tf.T5Config(num_layers=layers, num_decoder_layers=layers, d_model=16,
                                                     d_kv=8, num_heads=2, d_ff=32, vocab_size=64))


BLOCKS = {"gpt2": {"GPT2Block"}, "bert": {"BertLayer"}, "bart": {"BartEncoderLayer", "BartDecoderLayer"},
          "t5": {"T5Block"}}


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("model", sorted(BLOCKS))
def test_fsdp_wraps_and_checkpoints_each_transformer_block(model: str, layers: int) -> None:
    # One layer (model.config.n_layer=1) is a list of one block: still the FSDP unit, not an error.
    net = tiny(model, layers)
    assert {c.__name__ for c in block_classes(net)} == BLOCKS[model]
    cfg = compose_cfg(["trainer=fsdp", "trainer.strategy.activation_checkpointing_policy=transformer_blocks"])
    strategy = build_strategy(OmegaConf.to_container(cfg.trainer.strategy, resolve=True), net)
    wrapped = {c.__name__ for c in strategy.kwargs["auto_wrap_policy"]._module_classes}
    checkpointed = {c.__name__ for c in strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes}
    assert wrapped == checkpointed == BLOCKS[model]
    assert strategy._state_dict_type == "full"  # checkpoints hold gathered weights (export reads them too)
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy.kwargs["limit_all_gathers"] is True


def test_ddp_preset_options_reach_the_strategy() -> None:
    cfg = compose_cfg(["trainer=ddp"])
    strategy = build_strategy(OmegaConf.to_container(cfg.trainer.strategy, resolve=True), None)
    kwargs = strategy._ddp_kwargs
    assert kwargs["find_unused_parameters"] is False and kwargs["gradient_as_bucket_view"] is True
    assert kwargs.get("forward_sync_buffers", kwargs.get("broadcast_buffers")) is False


def test_deepspeed_preset_names_the_install_or_builds() -> None:
    cfg = compose_cfg(["trainer=deepspeed"])
    options = OmegaConf.to_container(cfg.trainer.strategy, resolve=True)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(LmlabError, match=r'pip install "lmlab\[deepspeed\]"'):
            build_strategy(options, None)
    else:
        assert build_strategy(options, None).config["zero_optimization"]["stage"] == 2


def test_a_model_without_blocks_is_named_for_fsdp() -> None:
    cfg = compose_cfg(["trainer=fsdp"])
    with pytest.raises(LmlabError, match="trainer.strategy.auto_wrap_policy"):
        build_strategy(OmegaConf.to_container(cfg.trainer.strategy, resolve=True), torch.nn.Linear(2, 2))


@pytest.mark.parametrize(("devices", "world"), [(2, 2), ("2", 2), ("0,1", 2), ("1,", 1), ([0, 1, 2], 3)])
def test_effective_batch_reads_every_spelling_of_devices(devices, world: int) -> None:
    # Lightning takes trainer.devices="0,1" (GPU indices); the logged world size must not crash on it.
    got = effective_batch({"accelerator": "gpu", "devices": devices, "num_nodes": 2, "accumulate_grad_batches": 3}, 4)
    assert got == {"world_size": world * 2, "per_device_batch_size": 4, "effective_batch_size": 4 * world * 2 * 3}


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_export_gathers_full_fsdp_weights_whatever_the_checkpoint_type(kind: str, monkeypatch) -> None:
    # Sharded checkpoints (trainer.strategy.state_dict_type=sharded) still export full weights on rank 0.
    import contextlib

    import lightning.pytorch.strategies.fsdp as lightning_fsdp
    from lightning.pytorch.strategies import FSDPStrategy

    used = []
    monkeypatch.setattr(lightning_fsdp, "_get_full_state_dict_context",
                        lambda *a, **k: used.append("full") or contextlib.nullcontext())
    monkeypatch.setattr(lightning_fsdp, "_get_sharded_state_dict_context",
                        lambda *a, **k: used.append("sharded") or contextlib.nullcontext())
    strategy = FSDPStrategy(state_dict_type=kind)
    strategy.model = torch.nn.Linear(2, 2)
    assert set(gathered_state_dict(strategy)) == {"weight", "bias"}
    assert used == ["full"]
    assert strategy._state_dict_type == kind  # checkpoints keep the configured type


def test_export_gathers_zero3_partitions_layer_by_layer(monkeypatch) -> None:
    # Lightning's DeepSpeedStrategy hands back ZeRO-3's empty partitions; the export needs whole tensors.
    # DeepSpeed is faked: its GatheredParameters puts a parameter's whole data back for the block.
    import contextlib
    import sys
    import types

    import lightning.pytorch.strategies.deepspeed as lightning_ds
    from lightning.pytorch.strategies import DeepSpeedStrategy

    net = tiny("gpt2", 2)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    whole = {p: p.data for p in net.parameters()}
    for p in net.parameters():
        p.data = torch.empty(0)  # what ZeRO-3 leaves outside a gather
    gathered: list[int] = []

    @contextlib.contextmanager
    def gathered_parameters(params, modifier_rank=None, enabled=True):
        assert modifier_rank is None  # read only: nothing is broadcast back
        params = list(params) if enabled else []
        gathered.append(len(params))
        for p in params:
            p.data = whole[p]
        yield
        for p in params:
            p.data = torch.empty(0)

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    fake.utils = types.SimpleNamespace(logging=types.SimpleNamespace(logger=types.SimpleNamespace(setLevel=print)))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr(lightning_ds, "_DEEPSPEED_AVAILABLE", True)
    monkeypatch.setattr(lightning_ds, "_DEEPSPEED_GREATER_EQUAL_0_16", True)
    strategy = DeepSpeedStrategy(stage=3)
    strategy._lightning_module = net
    state = gathered_state_dict(strategy)
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    assert max(gathered) < sum(1 for _ in net.parameters())  # one module at a time, never the whole model
    assert all(p.numel() == 0 for p in net.parameters())  # partitioned again afterwards


def test_hybrid_shard_device_mesh_from_the_command_line_is_the_tuple_lightning_builds_a_mesh_from() -> None:
    cfg = compose_cfg(["trainer=fsdp", "trainer.strategy.sharding_strategy=HYBRID_SHARD",
                       "+trainer.strategy.device_mesh=[2,8]", "trainer.num_nodes=2"])
    strategy = build_strategy(OmegaConf.to_container(cfg.trainer.strategy, resolve=True), tiny("gpt2", 2))
    assert strategy.kwargs["device_mesh"] == (2, 8) and isinstance(strategy.kwargs["device_mesh"], tuple)
    assert strategy.sharding_strategy.name == "HYBRID_SHARD"


def test_effective_batch_counts_every_gpu_of_an_auto_accelerator(monkeypatch) -> None:
    # accelerator=auto with devices=-1 takes every GPU there is, as Lightning does.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert effective_batch({"accelerator": "auto", "devices": -1}, 2)["world_size"] == 4
    assert effective_batch({"accelerator": "cpu", "devices": "auto"}, 2)["world_size"] == 1
