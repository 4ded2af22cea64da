"""``train/tokens_per_sec`` measures training: time spent validating inside a window is left out."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import lmlab.callbacks as callbacks

TOKENS_PER_BATCH = 2 * 8
TRAIN_SECONDS, VALIDATION_SECONDS = 1.0, 50.0


class Clock:
    """Virtual time: a training step takes a second, a validation batch fifty."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class TinyLM(L.LightningModule):
    def __init__(self, clock: Clock):
        super().__init__()
        self.layer = torch.nn.Embedding(50, 1)
        self.clock = clock

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.clock.now += TRAIN_SECONDS
        return self.layer(batch["input_ids"]).mean()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.clock.now += VALIDATION_SECONDS

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _loader(self) -> torch.utils.data.DataLoader:
        rows = [{"input_ids": torch.randint(0, 50, (8,))} for _ in range(64)]
        return torch.utils.data.DataLoader(rows, batch_size=2)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader()

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader()


def test_validation_inside_a_window_does_not_lower_the_training_speed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    logger = CSVLogger(tmp_path, name="", version="")
    # Windows of 4 steps; a validation (2 batches, 100 virtual seconds) after steps 2, 6 and 10.
    trainer = L.Trainer(max_steps=12, logger=logger, log_every_n_steps=1, val_check_interval=2,
                        limit_val_batches=2, num_sanity_val_steps=0, check_val_every_n_epoch=None,
                        callbacks=[callbacks.TokensPerSecond(every=4)], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(TinyLM(clock))
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as rows:
        rates = {int(r["step"]): float(r["train/tokens_per_sec"]) for r in csv.DictReader(rows)
                 if r.get("train/tokens_per_sec")}
    assert clock.now > 12 * TRAIN_SECONDS + 5 * VALIDATION_SECONDS  # the validations did take their time
    # Lightning repeats a callback's last value on the steps between windows: each is one of the three.
    assert {3, 7, 11} <= set(rates) and max(rates) == 11
    assert sorted(set(rates.values())) == [pytest.approx(TOKENS_PER_BATCH / TRAIN_SECONDS)]


def test_windows_run_across_epoch_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Epochs of 6 batches, windows of 4: a window every 4 batches, whatever the epoch's batch_idx."""
    clock = Clock()
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    logged: list[tuple[int, float]] = []
    batch_number = 0
    module = SimpleNamespace(log=lambda name, value, **_: logged.append((batch_number, value))
                             if name == "train/tokens_per_sec" else None)
    trainer = SimpleNamespace(world_size=1)
    monitor = callbacks.TokensPerSecond(every=4)
    for epoch in range(2):
        for batch_idx in range(6):
            batch_number += 1
            clock.now += TRAIN_SECONDS
            monitor.on_train_batch_end(trainer, module, None, {"input_ids": torch.zeros(2, 8)}, batch_idx)
    assert logged == [(4, TOKENS_PER_BATCH / TRAIN_SECONDS), (8, TOKENS_PER_BATCH / TRAIN_SECONDS),
                      (12, TOKENS_PER_BATCH / TRAIN_SECONDS)]


def _sharded_mfu_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: TokensPerSecond set up on a tiny GPT-2, which FSDP then shards."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    from lmlab.flops import flops_per_token

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        module = SimpleNamespace(model=GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2,
                                                                  n_positions=16)), log=lambda *a, **k: None)
        whole = flops_per_token(module.model, 16)
        monitor = callbacks.TokensPerSecond(every=1000, configured_peak=1e12)
        monitor.peak = 1e12
        monitor.setup(SimpleNamespace(), module, "fit")  # Lightning: before the strategy wraps the model
        # Lightning's FSDPStrategy: use_orig_params, so module.model's parameters become shard views.
        FullyShardedDataParallel(module.model, auto_wrap_policy=ModuleWrapPolicy({GPT2Block}), use_orig_params=True,
                                 device_id=torch.device("cpu"))
        monitor.on_train_batch_end(SimpleNamespace(world_size=2), module, None,
                                   {"input_ids": torch.zeros(2, 16, dtype=torch.long)}, 0)
        if rank == 0:
            Path(out).write_text(f"{whole * 2 * 16} {monitor._window_flops}")
    finally:
        dist.destroy_process_group()


def test_mfu_counts_every_parameter_when_fsdp_shards_them(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "flops.txt"
    # Forked: the processes start with this one's imports (spawned, they took 25 s to import them).
    mp.start_processes(_sharded_mfu_worker, args=(port, str(out)), nprocs=2, start_method="fork")
    whole, counted = map(float, out.read_text().split())
    # Counted after sharding, N was this process's half and MFU under FSDP half the true one.
    assert counted == pytest.approx(whole)


def test_mfu_of_an_encoder_decoder_counts_both_sides_of_each_padded_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    from lmlab.flops import training_flops

    clock = Clock()
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    model = BartForConditionalGeneration(BartConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                    encoder_attention_heads=2, decoder_attention_heads=2,
                                                    encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100))
    logged: dict[str, float] = {}
    module = SimpleNamespace(model=model, log=lambda name, value, **_: logged.__setitem__(name, float(value)))
    monitor = callbacks.TokensPerSecond(every=2)
    monitor.setup(SimpleNamespace(), module, "fit")
    monitor.peak = 1e9
    trainer = SimpleNamespace(world_size=1)
    batches = []
    for source, target in ((12, 5), (20, 9)):  # two padded batches of their own lengths
        mask = torch.ones(2, source, dtype=torch.long)
        mask[1, source // 2:] = 0
        labels = torch.full((2, target), 7)
        labels[0, target - 2:] = -100
        batches.append({"input_ids": torch.zeros(2, source, dtype=torch.long), "attention_mask": mask, "labels": labels})
    for i, batch in enumerate(batches):
        clock.now += TRAIN_SECONDS
        monitor.on_train_batch_end(trainer, module, None, batch, i)

    flops = training_flops(model)
    expected = flops.batch(18, 12, 8, 5) + flops.batch(30, 20, 16, 9)  # real tokens, each batch's lengths
    assert logged["train/tokens_per_sec"] == pytest.approx((18 + 30) / (2 * TRAIN_SECONDS))  # the source side
    assert logged["train/mfu"] == pytest.approx(expected / (2 * TRAIN_SECONDS) / 1e9, rel=1e-6)
