"""The fast paths of the training step compute what the plain ones compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from lmlab.losses import linear_cross_entropy, split_lm_head
from lmlab.tasks.clm import CausalLMModule


def _plain(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("rows", [7, 64, 1000])  # chunks that do not divide N, one chunk for all
def test_chunked_loss_and_gradients_equal_the_plain_cross_entropy(rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(150, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 40, (150,), generator=gen)
    targets[::9] = -100  # positions without a target add nothing

    fused = linear_cross_entropy(hidden, weight, targets, rows)
    (fused * 3.0).backward()  # a scaled upstream gradient reaches both inputs
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = _plain(hidden, weight, targets)
    (plain * 3.0).backward()

    assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-10, atol=1e-12)


def test_chunked_loss_without_grad_and_under_bf16_autocast() -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 32, generator=gen)
    weight = torch.randn(100, 32, generator=gen) / 4
    targets = torch.randint(0, 100, (64,), generator=gen)
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, targets).item() == pytest.approx(
            _plain(hidden, weight, targets).item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_cross_entropy(hidden, weight, targets)
    assert low.dtype == torch.float32  # the softmax is taken in float32 even when the projection is bf16
    assert low.item() == pytest.approx(_plain(hidden, weight, targets).item(), rel=2e-2)


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def test_clm_step_with_and_without_the_fused_loss() -> None:
    model = _tiny_gpt2()
    assert split_lm_head(model)[1] is model.lm_head.weight
    opt = OmegaConf.create({})
    fused = CausalLMModule(model, opt, opt, fused_loss=True)
    plain = CausalLMModule(model, opt, opt, fused_loss=False)
    assert fused.fused_loss and not plain.fused_loss
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a padded row: its tail has no targets
    batch = {"input_ids": ids, "attention_mask": mask}

    results = []
    for module in (fused, plain):
        model.zero_grad()
        loss_sum, count = module.token_losses(batch)
        loss_sum.backward()
        results.append((loss_sum.detach(), count, [p.grad.clone() for p in model.parameters()]))
    (a_loss, a_count, a_grads), (b_loss, b_count, b_grads) = results
    assert a_count == b_count == 3 * 19 - 5
    torch.testing.assert_close(a_loss, b_loss, rtol=1e-5, atol=1e-4)
    for a, b in zip(a_grads, b_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # The plain path equals Hugging Face's own loss (a mean over the same targets).
    hf = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    torch.testing.assert_close(b_loss / b_count, hf, rtol=1e-5, atol=1e-5)


def test_models_with_another_head_keep_the_plain_loss() -> None:
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=50))
    assert split_lm_head(bert) is None
    opt = OmegaConf.create({})
    assert not CausalLMModule(bert, opt, opt).fused_loss


@pytest.mark.parametrize("nsp", [False, True])
def test_mlm_head_on_the_masked_positions_only_equals_the_full_head(nsp: bool) -> None:
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

    from lmlab.tasks.mlm import MaskedLMModule

    class Tok:  # what MaskedLMModule reads from a tokenizer
        mask_token_id, all_special_ids, all_special_tokens = 4, [0, 1, 2, 3, 4], ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

        def get_vocab(self) -> dict[str, int]:
            return {f"t{i}": i for i in range(50)}

        def __len__(self) -> int:
            return 50

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = (BertForPreTraining if nsp else BertForMaskedLM)(config)
    task = OmegaConf.create({"nsp": nsp, "whole_word_mask": False, "mlm_probability": 0.3,
                             "mask_replace_prob": 0.8, "random_replace_prob": 0.1})
    module = MaskedLMModule(model, Tok(), task, OmegaConf.create({}), OmegaConf.create({}))
    assert module.sparse_head
    batch = {"input_ids": torch.randint(5, 50, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long),
             "token_type_ids": torch.zeros(2, 12, dtype=torch.long), "next_sentence_label": torch.tensor([0, 1])}
    sparse = module._forward(batch, torch.Generator().manual_seed(3))
    module.sparse_head = False
    full = module._forward(batch, torch.Generator().manual_seed(3))
    assert set(sparse) == set(full)
    for key in full:
        torch.testing.assert_close(sparse[key], full[key], rtol=1e-5, atol=1e-5)


def test_fused_gelu_keeps_the_logits_and_the_config() -> None:
    from lmlab.fastpath import fuse_activations

    model = _tiny_gpt2().eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert fuse_activations(model) == 2  # one per block
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert model.config.activation_function == "gelu_new"  # the export still names GPT-2's activation
    assert fuse_activations(model) == 0


@pytest.mark.slow
@pytest.mark.parametrize("fused_loss", [True, False])
def test_compiled_step_equals_the_eager_step(fused_loss: bool) -> None:
    # model.compile=true compiles the body (fused loss) or the model with its cross-entropy (plain
    # loss); either way the step must compute what the eager one does.
    from lmlab.tasks.clm import build_module

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = OmegaConf.create({"optimizer": {}, "scheduler": {}, "model": {"fused_loss": fused_loss, "compile": True}})
    eager_model, compiled_model = _tiny_gpt2(), _tiny_gpt2()
    compiled_model.load_state_dict(eager_model.state_dict())
    eager = build_module(OmegaConf.merge(cfg, {"model": {"compile": False}}), eager_model, None)
    compiled = build_module(cfg, compiled_model, None)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for module in (eager, compiled):
        module.model.eval()  # no dropout: the two must see the same function
        loss_sum, count = module.token_losses({"input_ids": ids})
        loss_sum.backward()
        results.append((loss_sum.detach(), count, [p.grad.clone() for p in module.model.parameters()]))
    (a_loss, a_count, a_grads), (b_loss, b_count, b_grads) = results
    assert a_count == b_count == 2 * 15
    torch.testing.assert_close(a_loss, b_loss, rtol=1e-4, atol=1e-4)
    for a, b in zip(a_grads, b_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    # Compiled for real: errors fall back to eager silently (suppress_errors), which would pass above.
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"], dict(counters["graph_break"])
