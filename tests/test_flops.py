"""MFU's numerator: the FLOPs-per-token estimate our performance figures use."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmlab.flops import PEAK_FLOPS, cpu_peak_flops, flops_per_token, peak_flops, peak_flops_of


def test_gpt2_124m_flops_per_token_matches_the_formula() -> None:
    model = GPT2LMHeadModel(GPT2Config())  # GPT-2 124M: 12 layers, 12 heads of 64
    n = sum(p.numel() for p in model.parameters())
    assert 124e6 < n < 125e6
    assert flops_per_token(model, 1024) == pytest.approx(6 * n + 12 * 12 * 12 * 64 * 1024)


def test_peak_comes_from_config_or_the_device_table() -> None:
    assert peak_flops(2.5e12, torch.device("cpu")) == (2.5e12, "perf.peak_flops")
    assert PEAK_FLOPS["H100"]["bf16"] == 989e12
    assert flops_per_token(object(), 128) is None  # not a transformer config: no MFU, no crash


# Abridged /proc/cpuinfo blocks as Linux prints them (the second processor's block is ignored).
XEON_AVX512 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
cpu MHz\t\t: 2900.123
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512dq

processor\t: 1
model name\t: Some Other CPU @ 9.00GHz
flags\t\t: fpu
"""
VM_AVX2 = """processor\t: 0
model name\t: AMD EPYC Processor
cpu MHz\t\t: 2450.000
flags\t\t: fpu sse2 avx fma avx2
"""
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512dq
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes sve
"""


def test_cpu_peak_estimate_reads_the_widest_fma_and_the_clock() -> None:
    peak, how = cpu_peak_flops(2, XEON_AVX512)
    assert peak == pytest.approx(2 * 64 * 2.00e9)  # the nominal clock in the name, not the turbo "cpu MHz"
    assert how == "2 cores x 64 fp32 FLOP/cycle (avx512f) x 2.00 GHz"
    peak, _ = cpu_peak_flops(1, VM_AVX2)
    assert peak == pytest.approx(32 * 2.45e9)  # no clock in the name: "cpu MHz"
    peak, how = cpu_peak_flops(2, ZEN4)
    assert peak == pytest.approx(2 * 32 * 2.6e9)  # AVX-512 on 256-bit units: AVX2's rate, not 64 FLOP/cycle
    assert how == "2 cores x 32 fp32 FLOP/cycle (avx512f on 256-bit units) x 2.60 GHz"
    zen5 = ZEN4.replace("cpu family\t: 25", "cpu family\t: 26")
    assert cpu_peak_flops(1, zen5)[0] == pytest.approx(64 * 2.6e9)
    assert cpu_peak_flops(4, ARM) is None  # no x86 FMA flags: no estimate, no MFU
    assert cpu_peak_flops(1, "flags\t: avx2\n") is None  # no clock


def test_peak_for_a_cpu_run_depends_on_the_precision() -> None:
    assert peak_flops(3e12, torch.device("cpu"), "bf16-mixed") == (3e12, "perf.peak_flops")
    assert peak_flops(None, torch.device("cpu"), "bf16-mixed") is None  # AMX/BF16 peaks are not modelled
    assert peak_flops(None, torch.device("meta")) is None
    estimate = cpu_peak_flops(torch.get_num_threads())
    assert peak_flops(None, torch.device("cpu"), "32-true") == estimate


@pytest.mark.parametrize("name, bf16", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA A10", 125e12), ("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA B200", None)])
def test_gpu_names_find_their_own_entry(name: str, bf16: float | None) -> None:
    # Substring matching gave a PCIe H100 the SXM part's 989 TFLOP/s and an L40 the L4's 121.
    assert peak_flops_of(name) == bf16  # bf16 unless a precision is given


def test_gpu_peak_follows_the_format_the_matmuls_run_in() -> None:
    # An fp32 run on an H100 was measured against bf16's 989 TFLOP/s: its MFU read 15x too low.
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "32-true") == 67e12
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "16-mixed") == 989e12
    assert peak_flops_of("Tesla V100-SXM2-16GB", "bf16-mixed") is None  # no bf16 tensor cores: no MFU
    assert peak_flops_of("Tesla V100-SXM2-16GB", "16") == 125e12
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "64-true") is None
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores
        assert peak_flops_of("NVIDIA A100-SXM4-80GB", "32-true") == 156e12
    finally:
        torch.set_float32_matmul_precision(before)
