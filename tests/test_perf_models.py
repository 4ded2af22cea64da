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


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_chunked_loss_in_evaluation_computes_only_the_logits(no_grad) -> None:
    # Evaluation runs with parameters that require grad, under no_grad or inference_mode; the loss
    # once computed the gradients there too: three matrix products per chunk, one of them needed.
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight = torch.randn(64, 32), torch.randn(100, 32, requires_grad=True)
    targets = torch.randint(0, 100, (64,))
    logits_flops = 2 * 64 * 32 * 100
    flops = {}
    for context in (no_grad, torch.enable_grad):
        with context(), FlopCounterMode(display=False) as counter:
            linear_cross_entropy(hidden, weight, targets, rows=16)
        flops[context] = counter.get_total_flops()
    assert flops[no_grad] == logits_flops
    assert flops[torch.enable_grad] > logits_flops  # the counter does see the gradients' products


class BertTok:
    """What MaskedLMModule reads from a tokenizer: 50 ids, the first five special, a WordPiece
    vocabulary whose pieces 30-49 continue words (##t30 ...)."""

    mask_token_id, all_special_ids, all_special_tokens = 4, [0, 1, 2, 3, 4], ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

    def get_vocab(self) -> dict[str, int]:
        pieces = [f"t{i}" for i in range(5, 30)] + [f"##t{i}" for i in range(30, 50)]
        return {token: i for i, token in enumerate([*self.all_special_tokens, *pieces])}

    def __len__(self) -> int:
        return 50


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

    # Neither path keeps a key/value cache in evaluation (GPT-2's config has use_cache on).
    caches = []
    hooks = [m.register_forward_hook(lambda mod, args, out: caches.append(out.past_key_values))
             for m in (model, model.transformer)]
    model.eval()
    with torch.no_grad():
        for module in (fused, plain):
            module.token_losses(batch)
    for hook in hooks:
        hook.remove()
    assert len(caches) == 3 and all(cache is None for cache in caches), caches


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

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = (BertForPreTraining if nsp else BertForMaskedLM)(config)
    task = OmegaConf.create({"nsp": nsp, "whole_word_mask": False, "mlm_probability": 0.3,
                             "mask_replace_prob": 0.8, "random_replace_prob": 0.1})
    module = MaskedLMModule(model, BertTok(), task, OmegaConf.create({}), OmegaConf.create({}))
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


# --- lean bodies (lmlab/fastpath.py): the model's own modules in a short loop, equal to HF's forward ---


def _tiny_bert(**overrides):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, max_position_embeddings=64, **overrides)
    return BertForMaskedLM(config)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_lean_body_equals_the_hugging_face_forward_with_its_gradients(family: str) -> None:
    from lmlab.fastpath import bert_hidden_states, gpt2_hidden_states, lean_body

    model = _tiny_gpt2() if family == "gpt2" else _tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    body = model.transformer if family == "gpt2" else model.bert
    assert lean_body(body) is (gpt2_hidden_states if family == "gpt2" else bert_hidden_states)
    ids = torch.randint(0, 50, (3, 24), generator=torch.Generator().manual_seed(5))
    weights = torch.randn(3, 24, body.config.hidden_size, generator=torch.Generator().manual_seed(6))
    results = []
    for forward in (lambda: body(input_ids=ids).last_hidden_state, lambda: lean_body(body)(body, ids)):
        body.zero_grad()
        hidden = forward()
        (hidden * weights).sum().backward()  # a gradient that differs per position and channel
        results.append((hidden.detach(), _grads(body)))
    (hf, hf_grads), (lean, lean_grads) = results
    torch.testing.assert_close(lean, hf, rtol=1e-5, atol=1e-5)
    assert set(lean_grads) == set(hf_grads) and len(hf_grads) > 10
    for name in hf_grads:
        torch.testing.assert_close(lean_grads[name], hf_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_lean_gpt2_keeps_dropout_in_training_and_drops_it_in_eval() -> None:
    from lmlab.fastpath import gpt2_hidden_states

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50))  # 0.1 dropout
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        train_a, train_b = gpt2_hidden_states(model.transformer, ids), gpt2_hidden_states(model.transformer, ids)
        model.eval()
        torch.testing.assert_close(gpt2_hidden_states(model.transformer, ids), model.transformer(input_ids=ids)[0],
                                   rtol=1e-5, atol=1e-5)
    assert not torch.equal(train_a, train_b)  # two dropout draws


def test_models_the_lean_loop_does_not_cover_keep_their_forward() -> None:
    from transformers import GPT2Model

    from lmlab.fastpath import lean_body

    assert lean_body(GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, add_cross_attention=True))) is None
    assert lean_body(_tiny_bert(is_decoder=True).bert) is None
    assert lean_body(torch.nn.Linear(2, 2)) is None


def test_clm_step_on_unpadded_blocks_takes_the_lean_body_and_equals_hf_loss() -> None:
    model = _tiny_gpt2()
    opt = OmegaConf.create({})
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(8))
    hf = model(input_ids=ids, labels=ids).loss
    for fused in (True, False):
        module = CausalLMModule(model, opt, opt, fused_loss=fused)
        assert module.lean is not None
        calls = []
        lean = module.lean
        module.lean = lambda body, x: calls.append(x.shape) or lean(body, x)
        loss_sum, count = module.token_losses({"input_ids": ids})
        assert calls == [ids.shape]  # the lean body ran, once
        torch.testing.assert_close(loss_sum / count, hf, rtol=1e-5, atol=1e-5)
        # A padded batch goes through the model's own forward, which applies the mask.
        calls.clear()
        module.token_losses({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        assert calls == []


def test_clm_step_takes_a_datamodules_own_labels() -> None:
    # Hugging Face's convention: labels are the ids with -100 where no loss is wanted (a prompt).
    model = _tiny_gpt2()
    opt = OmegaConf.create({})
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = ids.masked_fill(torch.arange(16) < 6, -100)
    hf = model(input_ids=ids, labels=labels).loss
    for fused in (True, False):
        for mask in (None, torch.ones_like(ids)):
            batch = {"input_ids": ids, "labels": labels, **({} if mask is None else {"attention_mask": mask})}
            loss_sum, count = CausalLMModule(model, opt, opt, fused_loss=fused).token_losses(batch)
            assert int(count) == 2 * 10
            torch.testing.assert_close(loss_sum / count, hf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_mlm_step_on_packed_blocks_equals_the_full_hugging_face_head(compiled: bool) -> None:
    from transformers import BertForMaskedLM

    from lmlab.tasks.mlm import build_module

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference = BertForMaskedLM(model.config)
    reference.load_state_dict(model.state_dict())
    cfg = OmegaConf.create({"task": {"nsp": False, "whole_word_mask": False, "mlm_probability": 0.3,
                                     "mask_replace_prob": 0.8, "random_replace_prob": 0.1},
                            "optimizer": {}, "scheduler": {}, "model": {"compile": compiled}})
    module = build_module(cfg, model, BertTok())
    assert module.sparse_head and module.lean is not None
    batch = {"input_ids": torch.randint(5, 50, (2, 16), generator=torch.Generator().manual_seed(9))}
    got = module._forward(batch, torch.Generator().manual_seed(3))
    got["mlm_sum"].backward()
    # Hugging Face's own forward and loss on the same masked inputs.
    inputs, labels = module._mask(batch, torch.Generator().manual_seed(3))
    hf = reference(input_ids=inputs, labels=labels)
    (hf.loss * got["count"]).backward()
    torch.testing.assert_close(got["mlm_sum"], hf.loss * got["count"], rtol=1e-5, atol=1e-4)
    got_grads, hf_grads = _grads(model), _grads(reference)
    for name in hf_grads:
        torch.testing.assert_close(got_grads[name], hf_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    if compiled:  # compiled for real (the step calls the encoder and head, never model.forward)
        assert counters["stats"]["unique_graphs"] >= 2
        assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("variant", ["packed", "whole_words", "nsp", "gpt2"])
def test_mlm_fixed_size_gather_equals_the_boolean_index(variant: str) -> None:
    # task.fixed_size_gather=true (auto on GPUs) reads the chosen rows through a fixed-size index
    # (masking.chosen_rows) instead of a boolean one; the loss, counts and gradients must not change.
    from transformers import BertForPreTraining

    from lmlab.tasks.mlm import build_module

    nsp = variant == "nsp"
    cfg = OmegaConf.create({"task": {"nsp": nsp, "whole_word_mask": variant == "whole_words",
                                     "mlm_probability": 0.15, "mask_replace_prob": 0.8, "random_replace_prob": 0.1},
                            "optimizer": {}, "scheduler": {}, "model": {"compile": False}})
    base = _tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if variant == "gpt2":  # no sparse head: the rows are picked from the model's full logits
        base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ids = torch.randint(5, 50, (4, 48), generator=torch.Generator().manual_seed(11))
    batch = {"input_ids": ids}
    if nsp:
        base = BertForPreTraining(base.config)
        batch.update(token_type_ids=(torch.arange(48) >= 20).long().expand(4, 48).contiguous(),
                     attention_mask=torch.ones_like(ids), next_sentence_label=torch.tensor([0, 1, 1, 0]))
    results = {}
    for fixed in (False, True):
        model = type(base)(base.config)
        model.load_state_dict(base.state_dict())
        module = build_module(OmegaConf.merge(cfg, {"task": {"fixed_size_gather": fixed}}), model, BertTok())
        assert module.sparse_head == (variant != "gpt2")
        rows = module._fixed_rows(ids)
        assert (rows is not None) == fixed
        got = module._forward(batch, torch.Generator().manual_seed(3))
        loss = got["mlm_sum"] + (got["nsp_loss"] if nsp else 0)
        loss.backward()
        results[fixed] = got, _grads(model)
        if fixed:  # fixed rows: more rows than chosen positions, and the padding ones are not counted
            assert got["picked"].shape[0] == rows > int(got["count"]) > 20
    (exact, exact_grads), (fixed, fixed_grads) = results[False], results[True]
    assert int(exact["count"]) == int(fixed["count"]) == exact["picked"].shape[0]
    assert int(exact["correct"]) == int(fixed["correct"])
    torch.testing.assert_close(fixed["mlm_sum"], exact["mlm_sum"], rtol=1e-5, atol=1e-5)
    if nsp:
        torch.testing.assert_close(fixed["nsp_loss"], exact["nsp_loss"])
        assert int(fixed["pairs"]) == 4
    assert set(fixed_grads) == set(exact_grads)
    for name in exact_grads:
        torch.testing.assert_close(fixed_grads[name], exact_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_mlm_with_the_fixed_size_gather_compiles_once() -> None:
    # A boolean index gives the compiled head a new row count at every step (a recompile, then
    # dynamic-shape kernels); the fixed-size gather keeps one shape: two graphs, body and head.
    from lmlab.tasks.mlm import build_module

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = OmegaConf.create({"task": {"nsp": False, "whole_word_mask": False, "mlm_probability": 0.15,
                                     "mask_replace_prob": 0.8, "random_replace_prob": 0.1, "fixed_size_gather": True},
                            "optimizer": {}, "scheduler": {}, "model": {"compile": True}})
    module = build_module(cfg, _tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), BertTok())
    counts = set()
    for step in range(3):
        ids = torch.randint(5, 50, (4, 64), generator=torch.Generator().manual_seed(step))
        got = module._forward({"input_ids": ids}, torch.Generator().manual_seed(step))
        got["mlm_sum"].backward()
        counts.add(int(got["count"]))
    assert len(counts) == 3  # three different numbers of chosen positions
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_mlm_gathers_exactly_on_the_cpu_and_with_a_teacher_by_default() -> None:
    from lmlab.tasks.mlm import build_module

    cfg = OmegaConf.create({"task": {"nsp": False, "whole_word_mask": False, "mlm_probability": 0.15,
                                     "mask_replace_prob": 0.8, "random_replace_prob": 0.1, "fixed_size_gather": "auto"},
                            "optimizer": {}, "scheduler": {}, "model": {"compile": False}})
    module = build_module(cfg, _tiny_bert(), BertTok())
    ids = torch.randint(5, 50, (8, 64))
    assert module._fixed_rows(ids) is None  # auto: exact on the CPU
    assert module._fixed_rows(ids.to("meta")) == 160  # any other device: fixed (76.8 + 8 x 8.1 + 16, to 8)
    module.teacher = object()  # a distillation teacher picks its logits with the boolean mask
    assert module._fixed_rows(ids.to("meta")) is None


def test_vocabulary_rows_are_rounded_up_to_model_vocab_multiple() -> None:
    from lmlab.models.build import build_hf_config, padded_vocab_size
    from lmlab.models.gpt2 import MODEL

    assert [padded_vocab_size(n, 64) for n in (50257, 50304, 1, 8000)] == [50304, 50304, 64, 8000]
    assert padded_vocab_size(97, 1) == 97

    class Tok:
        pad_token_id = bos_token_id = eos_token_id = 0

        def __len__(self) -> int:
            return 97

    for multiple, rows in ((64, 128), (None, 97)):
        model_cfg = OmegaConf.create({"size": "tiny", "config": {}, "vocab_multiple": multiple})
        assert build_hf_config(MODEL, model_cfg, Tok(), 32).vocab_size == rows
