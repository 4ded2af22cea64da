"""MFU's numerator: the FLOPs-per-token estimate our performance figures use."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from lmlab.flops import PEAK_FLOPS, flops_per_token, peak_flops


def test_gpt2_124m_flops_per_token_matches_the_formula() -> None:
    model = GPT2LMHeadModel(GPT2Config())  # GPT-2 124M: 12 layers, 12 heads of 64
    n = sum(p.numel() for p in model.parameters())
    assert 124e6 < n < 125e6
    assert flops_per_token(model, 1024) == pytest.approx(6 * n + 12 * 12 * 12 * 64 * 1024)


def test_peak_comes_from_config_or_the_device_table() -> None:
    assert peak_flops(2.5e12) == 2.5e12
    assert PEAK_FLOPS["H100"] == 989e12
    assert flops_per_token(object(), 128) is None  # not a transformer config: no MFU, no crash
