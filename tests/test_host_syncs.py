"""Training steps (pretraining and fine-tuning) never make the host wait for the device.

On a GPU the host queues kernels ahead of the device; an operation whose result the host must read
(``.item()``, a boolean index, ``nonzero``) stops it until the GPU has caught up, and the GPU then
idles while the host queues the rest. The H100 goals of issue 6 need steps without such stops. They
are found here on the CPU, by the aten operations a training step calls.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY, run_in_home
from lmlab import padding_masks

# Operations whose output the host reads, or whose size only the device knows.
READS_THE_DEVICE = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "unique_dim",
                    "_unique", "_unique2", "unique_consecutive", "repeat_interleave", "bincount", "histc"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostSyncs(TorchDispatchMode):
    """Counts the aten operations that would stop a GPU's host, by name.

    Written here because torch's own detector (``torch.cuda.set_sync_debug_mode``) exists only on
    CUDA; the operations are the same on a CPU, so a dispatch mode can name them there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func._schema.name.split("::")[-1]
        if name in READS_THE_DEVICE:
            self.seen[name] += 1
        elif name in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                      for i in args[1] if i is not None):
            self.seen[f"{name} with a boolean mask"] += 1  # a nonzero inside the kernel
        return func(*args, **(kwargs or {}))


class RecordSteps(L.Callback):
    """Records HostSyncs over whole training steps (forward, backward, optimizer, the next batch)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.mode = HostSyncs()
        self.steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.first:
            self.mode.__enter__()
        elif trainer.global_step == self.last:
            self.mode.__exit__(None, None, None)
            self.steps = self.last - self.first


def test_the_recorder_sees_what_stops_a_gpus_host() -> None:
    x = torch.randn(6, 3)
    with HostSyncs() as mode:
        x[x[:, 0] > 0].sum().item()
        x[torch.tensor([0, 2])] = 1.0  # integer indices: the device knows the size up front
        x.index_select(0, torch.tensor([1, 3]))
    assert mode.seen == Counter({"index with a boolean mask": 1, "_local_scalar_dense": 1})


@pytest.mark.parametrize("task", ["clm", "mlm", "mlm-whole-words", "mlm-nsp", "classification", "ner"])
def test_training_steps_do_not_wait_for_the_device(task: str, wiki_file: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import lmlab.train as train

    recorder = RecordSteps(first=3, last=7)
    build = train.build_trainer

    def build_trainer(*args: Any, **kwargs: Any) -> Any:
        trainer, best, throughput = build(*args, **kwargs)
        trainer.callbacks.append(recorder)
        return trainer, best, throughput

    monkeypatch.setattr(train, "build_trainer", build_trainer)
    data = [] if task in ("classification", "ner") else [f"data.path={wiki_file}"]  # their default data
    overrides = [*TINY, *data, "trainer.max_steps=10", "trainer.val_check_interval=null",
                 # What a GPU run does between its logging steps: no metric read, no NaN verdict read.
                 "trainer.log_every_n_steps=50", "+faults.check_every_n_steps=50"]
    if task.startswith("mlm"):  # the fixed-size gather is what a GPU gets (auto)
        overrides += ["task=mlm", "task.fixed_size_gather=true", f"task.whole_word_mask={task.endswith('words')}",
                      f"task.nsp={task.endswith('nsp')}"]
    elif task in ("classification", "ner"):  # fine-tuning: padded batches (the mask) and unpadded ones
        overrides += [f"task={task}"]
    run_in_home(tmp_path, overrides)  # a failed run raises
    assert recorder.steps == 4  # it recorded steps 4 to 7
    assert not recorder.mode.seen, f"steps 4-7 of task={task} stop a GPU's host: {dict(recorder.mode.seen)}"


@pytest.mark.gpu
def test_on_a_gpu_the_mlm_step_runs_with_host_syncs_forbidden() -> None:
    # The same property checked by CUDA itself: set_sync_debug_mode("error") raises at any sync.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from lmlab.tasks.mlm import build_module
    from test_perf_models import BertTok, _tiny_bert

    cfg = OmegaConf.create({"task": {"nsp": False, "whole_word_mask": False, "mlm_probability": 0.15,
                                     "mask_replace_prob": 0.8, "random_replace_prob": 0.1, "fixed_size_gather": "auto"},
                            "optimizer": {}, "scheduler": {}, "model": {"compile": False}})
    module = build_module(cfg, _tiny_bert(), BertTok()).cuda()
    ids = torch.randint(5, 50, (4, 64), device="cuda")
    # What training_step reads of its Trainer to seed the step's masks (MaskedLMModule._training_generator).
    module._trainer = SimpleNamespace(global_rank=0, strategy=None,
                                      fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(total_batch_idx=5)))
    # First call: lazy CUDA set-up (and the step generator's creation) may sync.
    module._forward({"input_ids": ids}, module._training_generator(ids.device))["mlm_sum"].backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = module._forward({"input_ids": ids})
        got["mlm_sum"].backward()
        # The training step's own generator, seeded on the host per step: no sync either.
        seeded = module._forward({"input_ids": ids}, module._training_generator(ids.device))
        seeded["mlm_sum"].backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        module._trainer = None
    assert got["picked"].shape[0] == module._fixed_rows(ids) > int(got["count"]) > 0
    assert module._mask_generator.device.type == "cuda" and int(seeded["count"]) > 0


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_nsp_padding_mask_handed_to_bert_changes_no_logit(implementation: str) -> None:
    from transformers import BertConfig, BertForPreTraining

    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, attn_implementation=implementation)
    torch.manual_seed(0)
    model = BertForPreTraining(config).eval()
    ids, mask = _padded_batch()
    given = padding_masks.for_model(model, mask)
    assert given.dim() == (4 if implementation == "sdpa" else 2)
    with HostSyncs() as syncs:
        ours = model(ids, attention_mask=given)
    if implementation == "sdpa":
        assert not syncs.seen, dict(syncs.seen)
    theirs = model(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours.prediction_logits[real], theirs.prediction_logits[real])
    torch.testing.assert_close(ours.seq_relationship_logits, theirs.seq_relationship_logits)


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(5, 120, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 7:] = 0
    mask[2, 10:] = 0
    return ids, mask


# Tiny configs of the fine-tuning backbones padding_masks knows, and of two it must leave alone.
SIZES = {"bert": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
         "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
         "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2}}
SIZES |= {"roberta": SIZES["bert"], "electra": SIZES["bert"] | {"embedding_size": 32},
          "albert": SIZES["bert"] | {"embedding_size": 16}, "bert-decoder": SIZES["bert"] | {"is_decoder": True}}


@pytest.mark.parametrize("model_type", list(SIZES))
def test_fine_tuning_masks_are_read_as_given_and_change_no_logit(model_type: str) -> None:
    """Encoders get the (B, 1, 1, T) mask and no host read; decoders keep the 2-D mask, since a 4-D
    one would replace their causal mask. Logits at real tokens equal those from the 2-D mask."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.for_model(model_type.removesuffix("-decoder"), vocab_size=120, num_labels=3,
                                  pad_token_id=0, attn_implementation="sdpa", **SIZES[model_type])
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(config).eval()
    ids, mask = _padded_batch()
    given = padding_masks.for_model(model, mask)
    encoder = model_type in padding_masks.BIDIRECTIONAL_SDPA
    assert given.dim() == (4 if encoder else 2)
    with HostSyncs() as syncs:
        ours = model(ids, attention_mask=given).logits
    if encoder:
        assert not syncs.seen, dict(syncs.seen)
    theirs = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()])


def test_collators_leave_the_mask_out_only_where_nothing_was_padded() -> None:
    from lmlab.tasks.classification import PadCollator
    from lmlab.tasks.ner import TokenCollator

    def rows(*lengths: int) -> list[dict[str, Any]]:
        return [{"input_ids": [7] * n, "attention_mask": [1] * n, "labels": torch.tensor(0), "index": i}
                for i, n in enumerate(lengths)]

    assert "attention_mask" not in PadCollator(0)(rows(5, 5))
    assert PadCollator(0)(rows(5, 3))["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    ner = [{"index": i, "input_ids": [7] * n, "attention_mask": [1] * n, "labels": [1] * n} for i, n in enumerate((4, 4))]
    assert "attention_mask" not in TokenCollator(0)(ner)
    ner[1] = {"index": 1, "input_ids": [7] * 2, "attention_mask": [1] * 2, "labels": [1] * 2}
    assert TokenCollator(0)(ner)["attention_mask"].tolist() == [[1] * 4, [1, 1, 0, 0]]
