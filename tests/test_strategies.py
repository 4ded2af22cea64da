"""The multi-GPU presets' strategies, built on the CPU without launching: what Lightning is handed."""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf
from conftest import compose_cfg
from omegaconf import OmegaConf

from lmlab.distributed import (block_classes, build_strategy, check_launch, check_strategy, effective_batch,
                               gathered_state_dict, launch_time)
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


SLURM_2_TASKS = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "7"}
TORCHRUN_2 = {"TORCHELASTIC_RUN_ID": "r", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2",
              "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("launch, overrides, key", [
    (SLURM_2_TASKS, ["trainer.devices=4"], "trainer.devices"),  # --ntasks-per-node=2
    (SLURM_2_TASKS, ["trainer.num_nodes=2"], "trainer.num_nodes"),  # --nodes=1
    (TORCHRUN_2, ["trainer.devices=1"], "trainer.devices"),  # 2 processes in all
    # torchrun inside a 1-task SLURM job: Lightning reads torchrun's world size, not SLURM's tasks
    ({**TORCHRUN_2, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train"},
     ["trainer.devices=4"], "trainer.devices"),
])
def test_devices_and_nodes_the_launcher_did_not_start_are_named_before_any_work(
        launch: dict[str, str], overrides: list[str], key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning finds these only inside Trainer.fit, after the data work and with an MLflow run left FAILED.
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    cfg = compose_cfg(["trainer=ddp_cpu", *overrides])
    with pytest.raises(LmlabError, match=rf"config key '{key}': .* does not match"):
        check_launch(OmegaConf.to_container(cfg.trainer, resolve=True))
    matching = compose_cfg(["trainer=ddp_cpu"])  # 2 processes on 1 node: what every launch here started
    check_launch(OmegaConf.to_container(matching.trainer, resolve=True))
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: Lightning starts the processes
    if "TORCHELASTIC_RUN_ID" not in launch:
        check_launch(OmegaConf.to_container(cfg.trainer, resolve=True))


def test_a_strategy_this_install_cannot_build_is_named_before_any_work() -> None:
    # build_strategy runs with the model in hand, after the data work and with an MLflow run open.
    deepspeed = OmegaConf.to_container(compose_cfg(["trainer=deepspeed"]).trainer, resolve=True)
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(LmlabError, match=r"config key 'trainer.strategy': .*pip install \"lmlab\[deepspeed\]\""):
            check_strategy(deepspeed)
    else:
        check_strategy(deepspeed)
    bogus = compose_cfg(["trainer=ddp_cpu", "trainer.strategy._target_=lightning.pytorch.strategies.NoSuchStrategy"])
    with pytest.raises(LmlabError, match=r"config key 'trainer.strategy._target_': cannot import"):
        check_strategy(OmegaConf.to_container(bogus.trainer, resolve=True))
    for preset in ("ddp", "ddp_cpu", "fsdp", "cpu"):
        check_strategy(OmegaConf.to_container(compose_cfg([f"trainer={preset}"]).trainer, resolve=True))


def test_every_rank_of_a_torchrun_or_srun_launch_names_the_same_run_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each rank resolves hydra.run.dir itself: with the current time, torchrun's rank 1 made a second,
    # stray run directory beside rank 0's. Its workers are children of one agent, as these are of pytest.
    def stamps(env: dict[str, str]) -> list[str]:
        code = "import time; from lmlab.distributed import launch_time; time.sleep(0.05); print(launch_time())"
        children = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env, "RANK": str(rank)},
                                     stdout=subprocess.PIPE, text=True) for rank in range(2)]
        return [child.communicate(timeout=300)[0].strip() for child in children]

    torchrun = {"TORCHELASTIC_RUN_ID": "r", "WORLD_SIZE": "2"}
    first, second = stamps(torchrun)
    assert first == second and first[:4].isdigit()
    plain = stamps({})
    assert plain[0] != plain[1]  # no launch: the current time, to the microsecond, as ${now:} gave
    srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_START_TIME": "1800000000"}
    for name, value in srun.items():
        monkeypatch.setenv(name, value)
    assert launch_time() == dt.datetime.fromtimestamp(1800000000).strftime("%Y-%m-%d_%H-%M-%S-%f")
    # Another step of the job, or a torchrun restart, is another attempt: another directory.
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    assert launch_time() == (dt.datetime.fromtimestamp(1800000000)
                             + dt.timedelta(microseconds=1)).strftime("%Y-%m-%d_%H-%M-%S-%f")
    # conf/config.yaml's hydra.run.dir is what resolves through it (not Hydra's ${now:}).
    from omegaconf import OmegaConf

    from lmlab.paths import config_dir

    raw = OmegaConf.load(config_dir() / "config.yaml").hydra.run._get_node("dir")._value()
    resolved = OmegaConf.create({"paths": {"root": "R"}, "task": {"name": "t"}, "model": {"name": "m"}, "dir": raw}).dir
    assert resolved == "R/runs/" + launch_time() + "_t_m"
    monkeypatch.delenv("SLURM_STEP_ID")
    first_try = stamps(torchrun)[0]
    assert stamps({**torchrun, "TORCHELASTIC_RESTART_COUNT": "1"})[0] != first_try
