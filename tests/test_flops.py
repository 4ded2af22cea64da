"""MFU's numerator: the training FLOPs estimate our performance figures use, checked against the
FLOPs PyTorch counts in a real forward and backward pass."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmlab.flops import PEAK_FLOPS, cpu_peak_flops, flops_per_token, peak_flops, peak_flops_of, training_flops


def test_gpt2_124m_flops_per_token_matches_the_formula() -> None:
    model = GPT2LMHeadModel(GPT2Config())  # GPT-2 124M: 12 layers, 12 heads of 64
    n = sum(p.numel() for p in model.parameters())
    assert 124e6 < n < 125e6
    assert flops_per_token(model, 1024) == pytest.approx(6 * n + 12 * 12 * 12 * 64 * 1024)


def _bert(head: type, **extra) -> torch.nn.Module:
    from transformers import BertConfig
    return head(BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                           vocab_size=8000, max_position_embeddings=128, **extra))


def _families() -> dict[str, tuple[torch.nn.Module, int | None]]:
    """A small model of each family lmlab trains, with the target length of the encoder-decoders."""
    import transformers as hf

    gpt2 = dict(n_embd=256, n_layer=4, n_head=4, vocab_size=8000, n_positions=128)
    seq2seq = dict(d_model=256, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=1024,
                   decoder_ffn_dim=1024, vocab_size=8000, max_position_embeddings=128)
    t5 = dict(d_model=256, d_kv=32, d_ff=1024, num_layers=3, num_decoder_layers=2, num_heads=4, vocab_size=8000)
    return {
        "gpt2": (GPT2LMHeadModel(GPT2Config(**gpt2)), None),
        "gpt2 classification": (hf.GPT2ForSequenceClassification(GPT2Config(**gpt2, num_labels=3, pad_token_id=0)), None),
        "bert mlm": (_bert(hf.BertForMaskedLM), None),
        "bert classification": (_bert(hf.BertForSequenceClassification, num_labels=3), None),
        "bert ner": (_bert(hf.BertForTokenClassification, num_labels=9), None),
        "bart": (hf.BartForConditionalGeneration(hf.BartConfig(**seq2seq, encoder_layers=3, decoder_layers=2)), 32),
        "t5": (hf.T5ForConditionalGeneration(hf.T5Config(**t5)), 32),
        "t5 v1.1 (untied head)": (hf.T5ForConditionalGeneration(hf.T5Config(**t5, tie_word_embeddings=False,
                                                                            feed_forward_proj="gated-gelu")), 32),
    }


@pytest.mark.parametrize("family", list(_families()))
def test_training_flops_match_what_pytorch_counts(family: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, target_length = _families()[family]
    # Eager attention: FlopCounterMode has no formula for the CPU's fused SDPA kernel, so it would
    # count no attention at all.
    model.set_attn_implementation("eager")
    ids = torch.randint(5, 100, (2, 128))
    targets = None if target_length is None else torch.randint(5, 100, (2, target_length))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids) if targets is None else model(input_ids=ids, decoder_input_ids=targets)
        out.logits.float().sum().backward()
    estimate = training_flops(model).batch(ids.numel(), 128, 0 if targets is None else targets.numel(),
                                           target_length or 0)
    # Above the count only by what the estimate takes for a matmul at every token but is looked up
    # (position embeddings) or runs once per sequence (BERT's pooler). With the classifier's word
    # table in N, BERT-base classification read 1.28x its count; with every token an encoder-decoder
    # source token, bart-base and t5-small read 2.1-2.4x.
    assert counter.get_total_flops() <= estimate <= 1.04 * counter.get_total_flops()


def test_classifier_word_table_is_out_of_n_and_a_tied_head_in_it() -> None:
    from transformers import BertForMaskedLM, BertForSequenceClassification

    classifier, mlm = _bert(BertForSequenceClassification, num_labels=3), _bert(BertForMaskedLM)
    words = 8000 * 256
    assert training_flops(classifier).source.matmul == 6.0 * (sum(p.numel() for p in classifier.parameters()) - words)
    assert training_flops(mlm).source.matmul == 6.0 * sum(p.numel() for p in mlm.parameters())  # issue 6's N


def test_encoder_decoder_flops_grow_with_each_side_and_padding_is_not_counted() -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    model = BartForConditionalGeneration(BartConfig(d_model=64, encoder_layers=2, decoder_layers=2,
                                                    encoder_attention_heads=2, decoder_attention_heads=2,
                                                    encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=500))
    flops = training_flops(model)
    assert flops.target is not None and flops_per_token(model, 64) is None  # no single per-token figure
    base = flops.batch(100, 64, 20, 16)
    assert flops.batch(101, 64, 20, 16) - base == pytest.approx(flops.source.per_token(64))
    assert flops.batch(100, 64, 21, 16) - base == pytest.approx(flops.target.per_token(16 + 64))
    assert flops.batch(100, 64, 20, 16) < flops.batch(100, 64, 20, 32)  # longer targets attend further
    counted = flops.batch(torch.tensor(100), 64, torch.tensor(20), 16)  # device counts stay tensors
    assert isinstance(counted, torch.Tensor) and float(counted) == pytest.approx(base, rel=1e-6)


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
