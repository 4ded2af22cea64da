"""Knowledge distillation (distill.teacher): the loss, its wiring into each task, a run end to end.

Real data throughout: Wikipedia paragraphs (CLM, MLM), WNUT-16 sentences (NER) and Rotten Tomatoes
snippets (classification) from ../shared/data; tiny models trained for a few steps on a CPU.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from conftest import SHARED_DATA, TINY, compose_cfg, run_in_home

from lmlab import distill, registry
from lmlab.errors import LmlabError
from lmlab.models.build import build_hf_config, build_model
from lmlab.tasks.ner import infer_labels, read_conll
from lmlab.tokenization import get_tokenizer

ROTTEN = SHARED_DATA / "classification" / "rotten_tomatoes"
TOPICS = SHARED_DATA / "classification" / "wiki_topics"
WNUT = SHARED_DATA / "ner" / "wnut16"
FAST = [*TINY, "trainer.num_sanity_val_steps=0"]
# Steps called without a Trainer (the wiring tests) log nowhere, and Lightning says so.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


# -- the loss ------------------------------------------------------------------------------------
def test_kd_loss_by_hand() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    for t in (1.0, 2.0, 4.0):
        expected = 0.0
        for s_row, t_row in zip(student.tolist(), teacher.tolist()):
            zs = sum(math.exp(v / t) for v in s_row)
            zt = sum(math.exp(v / t) for v in t_row)
            p = [math.exp(v / t) / zt for v in t_row]
            q = [math.exp(v / t) / zs for v in s_row]
            expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        expected = expected / 2 * t * t  # mean over the two rows, times T^2
        assert distill.kd_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-5)

    # Gradient: T^2 * d KL / d s = T * (softmax(s/T) - softmax(t/T)) / N — the same scale at any T.
    s = student.clone().requires_grad_(True)
    distill.kd_loss(s, teacher, 2.0).backward()
    assert torch.allclose(s.grad, 2.0 * (F.softmax(student / 2, -1) - F.softmax(teacher / 2, -1)) / 2, atol=1e-6)

    assert distill.kd_loss(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    # Shifting every logit of a row changes no probability.
    assert distill.kd_loss(student + 5.0, teacher, 2.0).item() == pytest.approx(distill.kd_loss(student, teacher, 2.0).item())
    empty = torch.zeros(0, 3, requires_grad=True)
    assert distill.kd_loss(empty, torch.zeros(0, 3), 2.0).item() == 0.0
    with pytest.raises(ValueError):
        distill.kd_loss(student, teacher[:, :2], 2.0)

    hard, kd = torch.tensor(3.0), torch.tensor(1.0)
    assert distill.combine(hard, kd, 0.0).item() == 3.0  # labels only
    assert distill.combine(hard, kd, 1.0).item() == 1.0  # teacher only
    assert distill.combine(hard, kd, 0.25).item() == pytest.approx(0.25 * 1.0 + 0.75 * 3.0)


# -- wiring into each task -----------------------------------------------------------------------
def _csv_dir(src: Path, root: Path, rows: dict[str, int]) -> Path:
    """The first rows of each split of a real CSV dataset."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in rows.items():
        with (src / f"{split}.csv").open(encoding="utf-8", newline="") as f:
            kept = [row for _, row in zip(range(n), csv.DictReader(f))]
        with (root / f"{split}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(kept[0]))
            writer.writeheader()
            writer.writerows(kept)
    return root


def _ner_dir(root: Path) -> Path:
    from tests.test_ner import write_conll

    root.mkdir(parents=True, exist_ok=True)
    train = read_conll(WNUT / "train.conll")[:300]
    known = set(infer_labels(train))
    write_conll(root / "train.conll", train)
    for split in ("validation", "test"):
        write_conll(root / f"{split}.conll", [s for s in read_conll(WNUT / f"{split}.conll") if set(s.tags) <= known][:60])
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    for needed in (ROTTEN, WNUT, TOPICS, SHARED_DATA / "corpus" / "wiki_extracts_en.txt"):
        if not needed.exists():
            pytest.skip(f"real test data missing: {needed}")
    root = tmp_path_factory.mktemp("distill_data")
    wiki = root / "wiki.txt"
    wiki.write_text("\n".join((SHARED_DATA / "corpus" / "wiki_extracts_en.txt").read_text(encoding="utf-8")
                              .splitlines()[:300]) + "\n", encoding="utf-8")
    return {"wiki": wiki, "rotten": _csv_dir(ROTTEN, root / "rotten", {"train": 300, "validation": 40, "test": 40}),
            "ner": _ner_dir(root / "ner")}


def build(cfg):
    """The LightningModule, DataModule and tokenizer as lmlab.train.run assembles them (no teacher)."""
    task = registry.get("task", cfg.task.name)
    spec = registry.get("model", cfg.model.name)
    dm = registry.get("datamodule", cfg.data.datamodule)(cfg.data, packing=task.packing(cfg),
                                                          cache_dir=cfg.paths.cache, seed=int(cfg.seed))
    tokenizer, _ = get_tokenizer(cfg.tokenizer, spec, dm.texts_for_tokenizer, dm.fingerprint, Path(cfg.paths.cache))
    dm.set_tokenizer(tokenizer)
    updates = dm.model_config_updates() if hasattr(dm, "model_config_updates") else {}
    config = build_hf_config(spec, cfg.model, tokenizer, max(int(cfg.data.get("block_size") or 0),
                                                             int(cfg.data.get("max_length") or 0)), updates)
    dm.setup("fit")
    model = build_model(spec, task.head(cfg), config)
    return task.build_module(cfg, model, tokenizer), dm, tokenizer


TASK_ARGS = {
    "clm": lambda d: ["task=clm", f"data.path={d['wiki']}"],
    "mlm": lambda d: ["task=mlm", f"data.path={d['wiki']}"],
    "ner": lambda d: ["task=ner", f"data.path={d['ner']}"],
    "classification": lambda d: ["task=classification", f"data.path={d['rotten']}"],
}


@pytest.mark.parametrize("name", list(TASK_ARGS))
def test_a_copy_of_the_student_as_teacher_adds_nothing(data: dict[str, Path], name: str) -> None:
    """With alpha=1 the step's loss is the KL term alone, and a teacher equal to the student (no
    dropout) makes it zero: the teacher read the same inputs (after masking, for MLM) and was
    compared at the same positions. With alpha=0 the step's loss is the task's own."""
    torch.manual_seed(0)
    module, dm, tokenizer = build(compose_cfg([*FAST, *TASK_ARGS[name](data)]))
    module.eval()  # no dropout: student and teacher compute the same function
    batch = next(iter(dm.train_dataloader()))
    plain = module.training_step(batch, 0)
    teacher = distill.Teacher(copy.deepcopy(module.model), tokenizer, "copy", temperature=2.0, alpha=1.0)
    distill.attach(teacher, module, tokenizer, name)

    torch.manual_seed(1)  # MLM draws its masks from the global generator: same draws as `plain` below
    kd = module.training_step(batch, 0)
    assert kd.item() == pytest.approx(0.0, abs=1e-5)
    teacher.alpha = 0.0
    torch.manual_seed(1)
    hard = module.training_step(batch, 0)
    module.teacher = None
    torch.manual_seed(1)
    assert hard.item() == pytest.approx(module.training_step(batch, 0).item(), rel=1e-5)
    assert plain.requires_grad and kd.requires_grad


@pytest.mark.parametrize("name", ["classification", "ner"])
def test_a_teacher_with_the_labels_in_another_order_is_read_in_the_students(data: dict[str, Path], name: str) -> None:
    """The student's label ids are fixed (a fine-tuned model.pretrained has its own): a teacher whose
    head orders the same labels otherwise was refused; its logits are now reordered. A copy of the
    student with its label rows and names permuted computes the same function, so the KL is zero
    and the teacher scores, through LabelOrderView, what the student scores."""
    torch.manual_seed(0)
    module, dm, tokenizer = build(compose_cfg([*FAST, *TASK_ARGS[name](data)]))
    module.eval()
    batch = next(iter(dm.train_dataloader()))
    n = int(module.model.config.num_labels)
    assert n >= 2
    order = list(range(n))[::-1]  # the teacher's label i is the student's label n - 1 - i
    swapped = copy.deepcopy(module.model)
    head = [m for m in swapped.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n][-1]
    with torch.no_grad():
        head.weight.copy_(head.weight[order])
        if head.bias is not None:
            head.bias.copy_(head.bias[order])
    names = module.model.config.id2label
    swapped.config.id2label = {i: names[order[i]] for i in range(n)}
    swapped.config.label2id = {label: i for i, label in swapped.config.id2label.items()}
    teacher = distill.Teacher(swapped, tokenizer, "swapped", temperature=2.0, alpha=1.0)
    distill.attach(teacher, module, tokenizer, name)
    assert teacher.label_order == order

    assert module.training_step(batch, 0).item() == pytest.approx(0.0, abs=1e-5)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    view = distill.LabelOrderView(swapped, order, module.model.config)
    with torch.no_grad():
        torch.testing.assert_close(view(**inputs).logits, module.model(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert view.config.id2label == module.model.config.id2label
    assert swapped.config.id2label != module.model.config.id2label  # the teacher's own is left as it was

    # Scored as score_teacher does (the task's own module around the view): the student's metrics.
    import lightning as L

    cfg = compose_cfg([*FAST, *TASK_ARGS[name](data)])
    task = registry.get("task", name)
    scores = []
    for model in (module.model, view):
        trainer = L.Trainer(limit_val_batches=2, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)
        scores.append(trainer.validate(task.build_module(cfg, model, tokenizer), datamodule=dm, verbose=False)[0])
    assert "val/loss" in scores[0] and scores[1] == pytest.approx(scores[0], rel=1e-5)


def _kl_on(module, batches, teacher) -> float:
    """Mean KL(teacher || student) at T=1 over the predicted positions of held-out CLM batches."""
    module.eval()
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            _, _, picked, counted = module._token_losses(batch, keep_logits=True)
            total += distill.kd_loss(picked, teacher.logits(batch, counted), 1.0).item()
    return total / len(batches)


def test_distillation_moves_the_student_toward_the_teacher(data: dict[str, Path]) -> None:
    """A tiny GPT-2 teacher trained for a few steps; a smaller student distilled from it on other
    batches: the KL between them on held-out batches falls, and more than with the labels alone."""
    torch.manual_seed(0)
    args = [*FAST, *TASK_ARGS["clm"](data), "data.batch_size=8", "data.block_size=32"]
    teacher_module, dm, tokenizer = build(compose_cfg(args))
    train = list(dm.train_dataloader())
    held_out = list(dm.val_dataloader())[:2]
    optimizer = torch.optim.AdamW(teacher_module.parameters(), lr=3e-3)
    teacher_module.train()
    for batch in train[:15]:
        optimizer.zero_grad()
        teacher_module.training_step(batch, 0).backward()
        optimizer.step()
    teacher = distill.Teacher(teacher_module.model, tokenizer, "in memory", temperature=2.0, alpha=1.0)
    frozen = {k: v.clone() for k, v in teacher.model.state_dict().items()}

    def student():
        torch.manual_seed(1)
        module, _, _ = build(compose_cfg([*args, "model.config.n_layer=1", "model.config.n_embd=64"]))
        return module

    kl = {}
    for alpha in (1.0, 0.0):
        module = student()
        distill.attach(teacher, module, tokenizer, "clm")
        teacher.alpha = alpha
        before = _kl_on(module, held_out, teacher)
        optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
        module.train()
        for batch in train[15:30]:
            optimizer.zero_grad()
            module.training_step(batch, 0).backward()
            optimizer.step()
        kl[alpha] = (before, _kl_on(module, held_out, teacher))

    before, after = kl[1.0]
    assert after < 0.5 * before, kl
    assert after < kl[0.0][1], kl  # the teacher's logits teach more about the teacher than the labels do
    # The teacher did not move, and it is nowhere in the student's parameters or state.
    assert all(torch.equal(frozen[k], v) for k, v in teacher.model.state_dict().items())
    assert all(not k.startswith("teacher") for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.model.parameters())


class _Recorder(Logger):
    """What Lightning hands its loggers: (step, metrics) rows."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


def test_the_logged_terms_make_the_logged_loss_under_gradient_accumulation(data: dict[str, Path]) -> None:
    """train/loss is the mean over an optimizer step's micro-batches (lmlab.step_logging); the two
    distillation terms are logged the same way, so what MLflow shows adds up at every step:
    train/loss = alpha * train/kd_loss + (1 - alpha) * train/hard_loss. They used to be the last
    micro-batch's values (and all-reduced at every micro-batch under DDP)."""
    import lightning as L

    torch.manual_seed(0)
    cfg = compose_cfg([*FAST, *TASK_ARGS["clm"](data), "data.batch_size=4", "data.block_size=32"])
    module, dm, tokenizer = build(cfg)
    teacher_module, _, _ = build(cfg)  # another random GPT-2: a teacher that disagrees with the student
    distill.attach(distill.Teacher(teacher_module.model, tokenizer, "t", temperature=2.0, alpha=0.25),
                   module, tokenizer, "clm")
    recorder = _Recorder()
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, log_every_n_steps=1, logger=recorder,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dm)
    steps = {}
    for step, metrics in recorder.rows:
        if "train/kd_loss" in metrics:
            steps[step] = metrics  # the newest row of a step is what MLflow's chart shows
    assert sorted(steps) == [0, 1, 2]
    for step, m in steps.items():
        assert m["train/loss"] == pytest.approx(0.25 * m["train/kd_loss"] + 0.75 * m["train/hard_loss"], rel=1e-5), step


def _gpt2_teacher_dir(data: dict[str, Path], folder: Path, dtype: torch.dtype) -> tuple[Path, list[str]]:
    """A tiny GPT-2 LM saved in ``dtype`` with the tokenizer lmlab trains on the wiki data."""
    from transformers import GPT2Config, GPT2LMHeadModel

    args = [*FAST, *TASK_ARGS["clm"](data), "data.block_size=32"]
    cfg = compose_cfg(args)
    spec = registry.get("model", "gpt2")
    dm = registry.get("datamodule", cfg.data.datamodule)(cfg.data, packing="causal", cache_dir=cfg.paths.cache,
                                                          seed=int(cfg.seed))
    tokenizer, _ = get_tokenizer(cfg.tokenizer, spec, dm.texts_for_tokenizer, dm.fingerprint, Path(cfg.paths.cache))
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, args


@pytest.mark.parametrize("precision, expected", [
    (None, torch.float32),  # the CPU preset: 32-true
    ("bf16-mixed", torch.float32),  # autocast computes in bf16 from float32 weights, as for the student
    ("bf16", torch.float32),  # Lightning's alias of bf16-mixed
    ("bf16-true", torch.bfloat16),  # Lightning holds the student in bf16: the teacher too
])
def test_the_teacher_is_held_in_the_runs_precision_not_its_files(data: dict[str, Path], tmp_path: Path,
                                                                  precision: str | None, expected: torch.dtype) -> None:
    """A teacher saved in bfloat16 (transformers 5 loads a model in its saved dtype) is held in float32
    for a float32 or mixed-precision run, and in bf16 only for a bf16-true one."""
    folder, args = _gpt2_teacher_dir(data, tmp_path / "bf16_teacher", torch.bfloat16)
    overrides = [*args, f"distill.teacher={folder}"] + ([f"trainer.precision={precision}"] if precision else [])
    teacher = distill.prepare(compose_cfg(overrides), registry.get("task", "clm"))
    assert {p.dtype for p in teacher.model.parameters()} == {expected}
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())



def test_the_teacher_keeps_no_cache_of_keys_and_values() -> None:
    """A GPT-2 teacher in eval mode built a cache of every layer's keys and values at each step,
    for a generation that never comes: 1.2 GB more at the peak of a 12 x 768 teacher's step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=2, n_embd=16, n_head=2, n_positions=16))
    teacher = distill.Teacher(model, None, "t", temperature=2.0, alpha=0.5)
    outputs = []
    model.transformer.register_forward_hook(lambda module, args, out: outputs.append(out))
    ids = torch.randint(0, 64, (2, 8))
    full = teacher.logits({"input_ids": ids})
    picked = teacher.logits({"input_ids": ids}, ids > 10)  # the body alone, then the head (split_lm_head)
    assert torch.allclose(picked, full[ids > 10], atol=1e-6)
    assert len(outputs) == 2
    assert all(out.get(key) is None for out in outputs for key in ("cache", "past_key_values"))  # 5.x, 4.x


@pytest.mark.parametrize("run_nsp", [False, True])
def test_an_mlm_teacher_is_scored_whichever_nsp_head_it_has(data: dict[str, Path], run_nsp: bool) -> None:
    """The teacher is scored by the task's module built for the student's task.nsp. A BertForPreTraining
    teacher (an NSP run's) for a student without NSP, and a BertForMaskedLM one for a student with
    NSP, raised there, after the student had been trained and exported. Both are scored now, on
    the masked tokens alike, and on NSP only when the teacher has that head."""
    import lightning as L
    from transformers import BertForMaskedLM, BertForPreTraining

    torch.manual_seed(0)
    cfg = compose_cfg([*FAST, *TASK_ARGS["mlm"](data), f"task.nsp={run_nsp}"])
    module, dm, tokenizer = build(cfg)
    pretraining = BertForPreTraining(copy.deepcopy(module.model.config))
    masked = BertForMaskedLM(copy.deepcopy(module.model.config))  # the same encoder and MLM head
    masked.bert.load_state_dict(pretraining.bert.state_dict(), strict=False)  # BertForMaskedLM has no pooler
    masked.cls.predictions.load_state_dict(pretraining.cls.predictions.state_dict())
    trainer = L.Trainer(limit_val_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    scores = {}
    for name, model in (("pretraining", pretraining), ("masked", masked)):
        module.teacher = distill.Teacher(model, tokenizer, name, temperature=2.0, alpha=0.5)
        scores[name] = distill.score_teacher(cfg, registry.get("task", "mlm"), module, trainer, dm)
    assert scores["pretraining"]["teacher/val/loss"] == pytest.approx(scores["masked"]["teacher/val/loss"], rel=1e-5)
    assert ("teacher/val/nsp_accuracy" in scores["pretraining"]) == run_nsp
    assert "teacher/val/nsp_accuracy" not in scores["masked"]
    assert cfg.task.nsp == run_nsp  # the run's own config is left as it was


# -- a run end to end ----------------------------------------------------------------------------
def lmlab(home: Path, *overrides: str):
    return run_in_home(home, [*FAST, *overrides])[0]


@pytest.fixture(scope="module")
def teacher_run(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A tiny BERT classifier on Rotten Tomatoes; its test split is scored with the exported weights."""
    home = tmp_path_factory.mktemp("distill_home")
    result = lmlab(home, "task=classification", f"data.path={data['rotten']}", "checkpoint.save_top_k=0")
    return home, result


def test_classification_student_distils_from_a_teacher_run(data: dict[str, Path], teacher_run) -> None:
    home, teacher = teacher_run
    result = lmlab(home, "task=classification", f"data.path={data['rotten']}", f"distill.teacher={teacher.output_dir}",
                   "model.config.num_hidden_layers=1", "model.config.hidden_size=64", "model.config.intermediate_size=128",
                   "distill.alpha=0.7", "distill.temperature=3")
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    r = client.get_run(result.run_id)
    params, metrics = r.data.params, r.data.metrics
    assert r.info.status == "FINISHED"
    assert params["distill.teacher"] == str(teacher.output_dir) and params["distill.alpha"] == "0.7"
    assert params["distill/teacher_source"] == str(teacher.output_dir / "export")
    teacher_params, student_params = int(params["distill/teacher_params"]), int(params["distill/student_params"])
    assert student_params == int(params["n_parameters"]) < teacher_params
    for key in ("train/kd_loss", "train/hard_loss", "train/loss"):
        history = client.get_metric_history(result.run_id, key)
        assert history and all(math.isfinite(m.value) for m in history), key
    kd = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/kd_loss")}
    hard = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/hard_loss")}
    total = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/loss")}
    step = max(kd)
    assert total[step] == pytest.approx(0.7 * kd[step] + 0.3 * hard[step], rel=1e-4)
    # The teacher scored on the same test split, next to the student; with its export's weights.
    assert metrics["teacher/test/accuracy"] == pytest.approx(teacher.metrics["test/accuracy"])
    assert 0.0 <= metrics["test/accuracy"] <= 1.0 and "teacher/test/macro_f1" in metrics
    assert metrics["distill/teacher_params"] == teacher_params
    assert result.metrics["teacher/test/accuracy"] == metrics["teacher/test/accuracy"]
    # The student uses the teacher's tokenizer, and neither checkpoint nor export holds the teacher.
    export = result.export_dir
    assert (export / "vocab.json").exists() or (export / "tokenizer.json").exists()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(export)).get_vocab() == AutoTokenizer.from_pretrained(
        str(teacher.export_dir)).get_vocab()
    state = torch.load(result.output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    weights = sum(v.numel() for k, v in state.items() if k.startswith("model."))
    assert weights == student_params and not any("teacher" in k for k in state)


def test_a_fresh_student_takes_the_teachers_label_order(data: dict[str, Path], teacher_run, tmp_path: Path) -> None:
    """A student without model.pretrained read the data's labels in their own (sorted) order, and a
    teacher with the same labels in another order (a Hugging Face model's) was refused as "another
    label set"; the student now takes the teacher's ids, as a fine-tuned model's are taken."""
    import json
    import shutil

    from lmlab.train import prepare_model_and_tokenizer

    _, teacher = teacher_run
    swapped = tmp_path / "swapped"
    shutil.copytree(teacher.export_dir, swapped)
    config = json.loads((swapped / "config.json").read_text())
    assert config["id2label"] == {"0": "fresh", "1": "rotten"}
    config.update(id2label={"0": "rotten", "1": "fresh"}, label2id={"rotten": 0, "fresh": 1})
    (swapped / "config.json").write_text(json.dumps(config))
    cfg = compose_cfg([*FAST, "task=classification", f"data.path={data['rotten']}", f"distill.teacher={swapped}",
                       f"paths.root={tmp_path / 'home'}"])
    task = registry.get("task", "classification")
    found = distill.prepare(cfg, task)
    dm = registry.get("datamodule", cfg.data.datamodule)(cfg.data, packing=task.packing(cfg),
                                                          cache_dir=cfg.paths.cache, seed=0)
    _, student, _ = prepare_model_and_tokenizer(cfg, task, registry.get("model", cfg.model.name), dm, found)
    assert dm.labels == ["rotten", "fresh"] and student.config.id2label == {0: "rotten", 1: "fresh"}
    distill.check_compatible(found, student, found.tokenizer, "classification")


def test_bad_teachers_are_named(data: dict[str, Path], teacher_run, tmp_path: Path) -> None:
    home, teacher = teacher_run
    base = ["task=classification", f"data.path={data['rotten']}"]
    with pytest.raises(LmlabError, match=r"config key 'distill.teacher': '.*nowhere' does not exist"):
        lmlab(home, *base, f"distill.teacher={tmp_path / 'nowhere'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmlabError, match=r"'distill.teacher'.*holds neither config.json"):
        lmlab(home, *base, f"distill.teacher={empty}")
    # Another label set: WikiTopics has other labels than Rotten Tomatoes.
    topics = _csv_dir(TOPICS, tmp_path / "topics", {"train": 60, "validation": 20, "test": 20})
    with pytest.raises(LmlabError, match=r"'distill.teacher': the teacher predicts the labels \['fresh', 'rotten'\]"):
        lmlab(home, "task=classification", f"data.path={topics}", f"distill.teacher={teacher.output_dir}")
    # A teacher without the task's head (a classifier asked to teach NER).
    with pytest.raises(LmlabError, match=r"'distill.teacher'.*no trained \*ForTokenClassification head for task=ner"):
        lmlab(home, "task=ner", f"data.path={data['ner']}", f"distill.teacher={teacher.output_dir}")
    # Settings and tasks that are checked before anything is loaded.
    with pytest.raises(LmlabError, match=r"'distill.alpha'"):
        lmlab(home, *base, f"distill.teacher={teacher.output_dir}", "distill.alpha=1.5")
    with pytest.raises(LmlabError, match=r"'distill.temperature'"):
        lmlab(home, *base, f"distill.teacher={teacher.output_dir}", "distill.temperature=0")
    with pytest.raises(LmlabError, match=r"not supported for task=summarization"):
        lmlab(home, "task=summarization", f"distill.teacher={teacher.output_dir}")
    with pytest.raises(LmlabError, match=r"not supported with task.multi_label=true"):
        lmlab(home, *base, "task.multi_label=true", f"distill.teacher={teacher.output_dir}")


# -- vocabularies, and teachers named by MLflow run id ---------------------------------------------
def test_a_nan_alpha_is_named_before_the_teacher_is_loaded(tmp_path: Path) -> None:
    # nan passes a range check (no comparison with it holds); it made every training loss nan, and the
    # run stopped at its first step with advice about optimizer.lr.
    cfg = compose_cfg([*FAST, "task=classification", f"distill.teacher={tmp_path / 'nowhere'}", "distill.alpha=nan"])
    with pytest.raises(LmlabError, match=r"config key 'distill.alpha': 'nan' is not a finite number"):
        distill.prepare(cfg, registry.get("task", "classification"))


def test_padding_rows_are_left_out_of_the_comparison(data: dict[str, Path]) -> None:
    """The student's vocabulary is rounded up (model.vocab_multiple=64) and the teacher's is not: a
    teacher that is the student cut to the tokenizer's ids teaches nothing new, so the KL is zero."""
    torch.manual_seed(0)
    module, dm, tokenizer = build(compose_cfg([*FAST, *TASK_ARGS["clm"](data)]))
    module.eval()
    assert module.model.config.vocab_size % 64 == 0 and len(tokenizer) % 64 != 0  # the case at hand
    cut = copy.deepcopy(module.model)
    cut.resize_token_embeddings(len(tokenizer))
    teacher = distill.Teacher(cut, tokenizer, "cut", temperature=2.0, alpha=1.0)
    distill.attach(teacher, module, tokenizer, "clm")
    assert teacher.vocabulary == len(tokenizer)
    batch = next(iter(dm.train_dataloader()))
    assert module.training_step(batch, 0).item() == pytest.approx(0.0, abs=1e-5)

    # A teacher with fewer output rows than the tokenizer has tokens cannot be compared.
    short = copy.deepcopy(module.model)
    short.resize_token_embeddings(len(tokenizer) - 1)
    with pytest.raises(LmlabError, match=r"'distill.teacher': the teacher's output layer has \d+ rows"):
        distill.attach(distill.Teacher(short, tokenizer, "short", 2.0, 1.0), module, tokenizer, "clm")


def test_clm_student_distils_from_a_hugging_face_teacher_with_an_odd_vocabulary(data: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    """A GPT-2 directory whose vocab_size is its tokenizer's length (GPT-2's own is 50,257) teaches a
    student built with model.vocab_multiple=64 from the same tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = compose_cfg([*FAST, *TASK_ARGS["clm"](data)])
    spec = registry.get("model", "gpt2")
    dm = registry.get("datamodule", cfg.data.datamodule)(cfg.data, packing="causal", cache_dir=cfg.paths.cache,
                                                          seed=int(cfg.seed))
    tokenizer, _ = get_tokenizer(cfg.tokenizer, spec, dm.texts_for_tokenizer, dm.fingerprint, Path(cfg.paths.cache))
    assert len(tokenizer) % 64 != 0
    teacher_dir = tmp_path / "hf_teacher"
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)

    result = lmlab(tmp_path, *TASK_ARGS["clm"](data), f"distill.teacher={teacher_dir}", "trainer.max_steps=4")
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    r = client.get_run(result.run_id)
    assert r.info.status == "FINISHED" and r.data.params["distill/teacher_source"] == str(teacher_dir)
    assert all(math.isfinite(m.value) for m in client.get_metric_history(result.run_id, "train/kd_loss"))
    assert "teacher/val/loss" in result.metrics
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(result.export_dir)).vocab_size == -(-len(tokenizer) // 64) * 64


def test_a_teacher_named_by_run_id_is_recorded_by_its_run_id(data: dict[str, Path], teacher_run) -> None:
    home, teacher = teacher_run
    result = lmlab(home, "task=classification", f"data.path={data['rotten']}", f"distill.teacher={teacher.run_id}",
                   "model.config.num_hidden_layers=1", "trainer.max_steps=2")
    params = mlflow.MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id).data.params
    assert params["distill/teacher_source"] == teacher.run_id
    cached = list((home / "cache" / "mlflow_models").glob(f"*/{teacher.run_id}/model/config.json"))
    assert len(cached) == 1  # downloaded into lmlab's cache, not a temporary folder


# -- teachers whose logits are not over the vocabulary ---------------------------------------------
def _save_tiny(model_class: type, config_class: type, root: Path, **extra: int) -> Path:
    config = config_class(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, **extra)
    model_class(config).save_pretrained(root)
    return root


def test_an_electra_discriminator_is_refused_before_training(tmp_path: Path) -> None:
    """ElectraForPreTraining ends like BertForPreTraining, an MLM teacher, but scores each token as
    original or replaced: its (batch, tokens) logits broke the first training step on a shape."""
    from transformers import BertConfig, BertForPreTraining, ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

    electra = _save_tiny(ElectraForPreTraining, ElectraConfig, tmp_path / "electra", embedding_size=16)
    cfg = compose_cfg(["task=mlm", "model=bert", f"distill.teacher={electra}"])
    with pytest.raises(LmlabError) as info:
        distill.prepare(cfg, registry.get("task", "mlm"))
    message = str(info.value)
    assert message.startswith("config key 'distill.teacher':") and "ElectraForPreTraining" in message
    assert "shape (1, 2), not (1, 2, 120)" in message and "ElectraForMaskedLM" in message
    # The teachers whose logits are over the vocabulary still load.
    for model_class, config_class, extra in ((BertForPreTraining, BertConfig, {}),
                                             (ElectraForMaskedLM, ElectraConfig, {"embedding_size": 16})):
        root = _save_tiny(model_class, config_class, tmp_path / model_class.__name__, **extra)
        assert type(distill.load_teacher(str(root), "mlm")) is model_class


@pytest.mark.parametrize("teacher_pad", [None, 5])
def test_a_gpt2_classification_teacher_pools_the_last_token_the_student_pools(data: dict[str, Path],
                                                                             teacher_pad: int | None) -> None:
    """GPT-2 classifies by its last token that is not config.pad_token_id. A teacher saved without one
    (as Hugging Face's GPT-2 ships) raised "Cannot handle batch sizes > 1" at the first step; one saved
    with another id than the collator pads with pooled a padding position of every shorter row. A
    teacher that is the student now teaches nothing new, as with matching padding."""
    torch.manual_seed(0)
    module, dm, tokenizer = build(compose_cfg([*FAST, *TASK_ARGS["classification"](data), "model=gpt2"]))
    module.eval()
    batch = next(iter(dm.train_dataloader()))
    assert "attention_mask" in batch and tokenizer.pad_token_id != 5  # rows of different lengths, padded
    copied = copy.deepcopy(module.model)
    copied.config.pad_token_id = teacher_pad
    distill.attach(distill.Teacher(copied, tokenizer, "copy", temperature=2.0, alpha=1.0), module, tokenizer,
                   "classification")
    assert copied.config.pad_token_id == tokenizer.pad_token_id
    assert module.training_step(batch, 0).item() == pytest.approx(0.0, abs=1e-5)


def test_a_teacher_that_reads_other_token_ids_is_refused(data: dict[str, Path]) -> None:
    """A student with its own tokenizer (model.pretrained) and a teacher with another vocabulary read
    the same text as different ids; comparing their logits would teach noise, so attach refuses."""
    from lmlab.tokenization import train_wordpiece

    torch.manual_seed(0)
    module, dm, tokenizer = build(compose_cfg([*FAST, *TASK_ARGS["classification"](data)]))
    other = train_wordpiece(dm.texts_for_tokenizer()[:100], vocab_size=300, min_frequency=1, lowercase=True)
    assert other.get_vocab() != tokenizer.get_vocab()
    teacher = distill.Teacher(copy.deepcopy(module.model), other, "other", temperature=2.0, alpha=0.5)
    with pytest.raises(LmlabError, match=r"'distill.teacher': the teacher's tokenizer \(\d+ tokens\) differs from "
                                         r"the student's \(\d+ tokens\)"):
        distill.attach(teacher, module, tokenizer, "classification")
    assert module.teacher is None
