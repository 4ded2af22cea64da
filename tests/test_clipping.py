"""Mixed precision with lmlab's fused AdamW and gradient clipping (lmlab/clipping.py).

Lightning's own MixedPrecision raises at the first clipped step with a fused optimizer, even under
bf16; these runs and steps are what ``trainer=gpu`` does, on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY, WIKI, compose_cfg
from lmlab.clipping import ClippingMixedPrecision, ShardedClipping, sharded_clipping, use_clipping_mixed_precision
from lmlab.precision import ALIASES, precision_name
from lmlab.train import run


def _param_with_grad(scale: float = 1.0) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 12))
    p.grad = torch.full((12,), 3.0) * scale  # norm 3 * sqrt(12) ~ 10.4
    return p


def test_bf16_clip_of_a_fused_optimizer_scales_the_gradient_to_the_limit() -> None:
    p = _param_with_grad()
    optimizer = torch.optim.AdamW([p], lr=0.1, fused=True)
    ClippingMixedPrecision("bf16-mixed", "cpu").clip_gradients(optimizer, 1.0)
    assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(1.0, rel=1e-5)


def test_fp16_clip_unscales_once_and_the_fused_step_matches_the_unfused_one() -> None:
    plugin = ClippingMixedPrecision("16-mixed", "cpu")
    assert plugin.scaler is not None
    plugin.scaler.scale(torch.ones(()))  # as a training step scales its loss: sets up the scale
    scale = float(plugin.scaler.get_scale())
    assert scale > 1
    fused_p, plain_p = _param_with_grad(scale), _param_with_grad()
    fused = torch.optim.AdamW([fused_p], lr=0.1, fused=True)
    plain = torch.optim.AdamW([plain_p], lr=0.1, foreach=False)
    plugin.clip_gradients(fused, 1.0)  # unscales first: the clip sees the true gradient
    assert torch.linalg.vector_norm(fused_p.grad).item() == pytest.approx(1.0, rel=1e-5)
    plugin.scaler.step(fused)  # must not divide by the scale a second time
    torch.nn.utils.clip_grad_norm_([plain_p], 1.0)
    plain.step()
    assert torch.allclose(fused_p.detach(), plain_p.detach(), atol=1e-6)


def test_only_plain_mixed_precision_is_replaced() -> None:
    for strategy, replaced in (("auto", True), ("ddp", True), ("fsdp", False), ("deepspeed_stage_2", False)):
        kwargs = {"precision": "bf16-mixed", "accelerator": "cpu", "plugins": []}
        use_clipping_mixed_precision(kwargs, strategy)
        assert ("precision" not in kwargs) == replaced, strategy
        assert any(isinstance(p, ClippingMixedPrecision) for p in kwargs["plugins"]) == replaced, strategy
    kwargs = {"precision": "32-true", "accelerator": "cpu"}
    before = copy.deepcopy(kwargs)
    use_clipping_mixed_precision(kwargs, "auto")
    assert kwargs == before


def test_precision_aliases_are_lightnings() -> None:
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR_ALIAS_CONVERSION

    assert ALIASES == _PRECISION_INPUT_STR_ALIAS_CONVERSION
    for given, name in ((16, "16-mixed"), ("16", "16-mixed"), ("bf16", "bf16-mixed"), (32, "32-true"),
                        ("32", "32-true"), (64, "64-true"), ("bf16-mixed", "bf16-mixed"), ("32-true", "32-true"),
                        ("bf16-true", "bf16-true"), (None, None), ("banana", "banana"), (True, True)):
        assert precision_name(given) == name, given


@pytest.mark.parametrize(("given", "name"), [("bf16", "bf16-mixed"), (16, "16-mixed"), ("16", "16-mixed")])
def test_lightnings_precision_aliases_are_mixed_precision_too(given: object, name: str) -> None:
    # Lightning reads trainer.precision=bf16 as bf16-mixed; left to it, its MixedPrecision stops at the first clip.
    kwargs = {"precision": given, "accelerator": "cpu"}
    use_clipping_mixed_precision(kwargs, "auto")
    (plugin,) = kwargs["plugins"]
    assert isinstance(plugin, ClippingMixedPrecision) and plugin.precision == name and "precision" not in kwargs
    for full in (32, "32", 64):
        kept = {"precision": full, "accelerator": "cpu"}
        use_clipping_mixed_precision(kept, "auto")
        assert kept == {"precision": full, "accelerator": "cpu"}


def test_fsdp_clipping_moves_from_lightning_to_the_callback() -> None:
    # FSDPPrecision raises on a norm clip; the callback clips through the root FSDP module instead.
    kwargs = {"gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm"}
    (callback,) = sharded_clipping(kwargs, "fsdp")
    assert isinstance(callback, ShardedClipping) and callback.clip_val == 1.0 and callback.algorithm == "norm"
    assert kwargs == {"gradient_clip_val": None}
    for strategy in ("ddp", "auto"):
        kept = {"gradient_clip_val": 1.0}
        assert sharded_clipping(kept, strategy) == [] and kept == {"gradient_clip_val": 1.0}


@pytest.mark.skipif(not WIKI.exists(), reason="needs ../shared/data")
def test_bf16_mixed_run_with_clipping_trains(tmp_path) -> None:
    result = run(compose_cfg([*TINY, f"data.path={WIKI}", "data.max_documents=200", "trainer.precision=bf16-mixed",
                              "trainer.gradient_clip_val=0.5"]))
    assert torch.isfinite(torch.tensor(result.metrics["val/loss"]))
    assert result.metrics["val/loss"] < 6.9  # below the uniform guess over the 1,000-token vocabulary


@pytest.mark.skipif(not WIKI.exists(), reason="needs ../shared/data")
@pytest.mark.parametrize("alias", ["bf16", "16"])
def test_a_lightning_precision_alias_run_with_clipping_trains(alias: str, recwarn: pytest.WarningsRecorder) -> None:
    result = run(compose_cfg([*TINY, f"data.path={WIKI}", "data.max_documents=200", f"trainer.precision={alias}",
                              "trainer.gradient_clip_val=0.5"]))
    assert torch.isfinite(torch.tensor(result.metrics["val/loss"]))
    assert result.metrics["val/loss"] < 6.9
    # Lightning was handed the full name: no "supported for historical reasons" warning.
    assert not [w for w in recwarn if "historical reasons" in str(w.message)]


def test_metrics_in_float32_casts_half_states_back_and_leaves_counts_integer(tmp_path) -> None:
    # bf16-true's .to(bfloat16) reaches torchmetrics states: a SumMetric in bfloat16 stops growing at 256
    # (+1 is lost), while a count state must stay an integer (Metric.set_dtype would make it a float).
    import lightning as L
    from torchmetrics import SumMetric
    from torchmetrics.classification import MulticlassAccuracy

    from lmlab import registry
    from lmlab.precision import MetricsInFloat32
    from lmlab.train import build_trainer

    module = L.LightningModule()
    module.loss_sum, module.accuracy = SumMetric(), MulticlassAccuracy(num_classes=3)
    module.to(torch.bfloat16)
    module.loss_sum.update(torch.tensor(256.0))
    module.loss_sum.update(torch.tensor(1.0))
    assert module.loss_sum.sum_value.dtype == torch.bfloat16 and float(module.loss_sum.compute()) == 256.0
    module.loss_sum.reset()
    MetricsInFloat32().on_validation_epoch_start(None, module)
    assert module.loss_sum.sum_value.dtype == torch.float32 and module.accuracy.tp.dtype == torch.long
    module.loss_sum.update(torch.tensor(256.0, dtype=torch.bfloat16))
    module.loss_sum.update(torch.tensor(1.0, dtype=torch.bfloat16))
    assert float(module.loss_sum.compute()) == 257.0
    trainer, _, _ = build_trainer(compose_cfg(["trainer.enable_progress_bar=false"]), registry.get("task", "clm"),
                                  tmp_path, False)
    assert any(isinstance(c, MetricsInFloat32) for c in trainer.callbacks)
