"""Real multi-process DDP on the CPU (gloo, 2 processes) against one process with the same global batch.

Lightning starts the second process by re-running the command line, so these tests drive the
``lmlab`` CLI in a subprocess (under pytest, Lightning would re-run pytest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import SHARED_DATA, compose_cfg, run_in_home, wiki_head

DDP = ["trainer=ddp_cpu"]  # ddp with gloo, 2 processes, fp32
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# No dropout, so one process and two compute the same function; full validation on both.
EXACT = ["model.config.resid_pdrop=0.0", "model.config.embd_pdrop=0.0", "model.config.attn_pdrop=0.0",
         "trainer.limit_val_batches=1.0"]


def lmlab(home: Path, *overrides: str, launcher: tuple[str, ...] = (), env: dict[str, str] | None = None) -> str:
    """Run the CLI; its output on success: stdout (logging, every process's) then stderr (warnings)."""
    env = {**os.environ, "LMLAB_HOME": str(home), "LMLAB_CACHE_DIR": str(home.parent / "cache"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([sys.executable, *launcher, "-m", "lmlab", *QUIET, *overrides], env=env,
                          capture_output=True, text=True, timeout=600, cwd=home.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def only_run(home: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, f"{len(runs)} MLflow runs for one job"  # rank 1 must not open its own
    assert runs[0].info.status == "FINISHED"
    return client, runs[0]


def history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    text = wiki_head(tmp_path)
    common = ["+experiment=debug", f"data.path={text}", "trainer.max_steps=6", "trainer.val_check_interval=3",
              "trainer.log_every_n_steps=1", *EXACT]
    lmlab(tmp_path / "one", *common, "data.batch_size=8")
    stderr = lmlab(tmp_path / "two", *common, *DDP, "data.batch_size=4")
    # val/* are reduced over processes by torchmetrics before logging: Lightning's advice to sync
    # them again would be noise (lmlab.reduced_logging).
    assert "sync_dist=True" not in stderr

    one_client, one = only_run(tmp_path / "one")
    two_client, two = only_run(tmp_path / "two")
    # Same global batches (lmlab.data.loaders), gradients averaged over equal shards: equal up to
    # float summation order. Stated tolerance: 1e-4 relative.
    for key in ("train/loss", "val/loss", "val/perplexity"):
        a, b = history(one_client, one.info.run_id, key), history(two_client, two.info.run_id, key)
        assert len(a) == len(b) > 0, key
        assert b == pytest.approx(a, rel=1e-4), key
    assert two.data.params["world_size"] == "2" and two.data.params["per_device_batch_size"] == "4"
    assert two.data.params["effective_batch_size"] == one.data.params["effective_batch_size"] == "8"
    assert "train/tokens_per_sec_per_device" in two.data.metrics
    # Rank 0 exported once and logged the model.
    assert [a.path for a in two_client.list_artifacts(two.info.run_id, "model") if a.path.endswith("config.json")]


@pytest.mark.slow
def test_torchrun_starts_every_rank_at_once_on_a_new_store(tmp_path: Path) -> None:
    # Under torchrun (and srun) the ranks start together, unlike Lightning's own launch, which starts
    # rank 1 after rank 0 has opened the run. Ranks other than 0 once opened the new SQLite store
    # too, and concurrent migrations broke it ("table _alembic_tmp_latest_metrics already exists").
    text = wiki_head(tmp_path)
    home = tmp_path / "home"
    assert not home.exists()
    lmlab(home, "+experiment=debug", f"data.path={text}", "trainer.max_steps=4", *DDP,
          f"hydra.run.dir={tmp_path / 'hydra'}",
          launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"))
    client, run = only_run(home)
    assert run.data.params["world_size"] == "2"
    assert len(history(client, run.info.run_id, "train/loss")) > 0


@pytest.mark.slow
def test_lightning_launched_processes_in_an_interactive_slurm_shell_open_one_run(tmp_path: Path) -> None:
    # In `salloc` / `srun --pty bash` Lightning starts the second process itself, and it inherits the
    # shell's SLURM_PROCID=0: it once took itself for rank 0 and opened a second MLflow run.
    home = tmp_path / "home"
    lmlab(home, "+experiment=debug", f"data.path={wiki_head(tmp_path)}", "trainer.max_steps=4", *DDP,
          env={"SLURM_JOB_NAME": "bash", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"})
    _, run = only_run(home)
    assert run.data.params["world_size"] == "2"


# A third party's datamodule with plain DataLoaders (no ``shards_itself``), registered the way a
# pip-installed plugin is: a dist-info folder with an entry point, on the processes' PYTHONPATH.
PLAIN_LOADERS = """
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lmlab.data.text_datamodule import TextDataModule


class PlainLoaders(TextDataModule):
    shards_itself = False

    def _loader(self, split, shuffle, batch_size):
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=shuffle, drop_last=shuffle)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is not None and self.trainer.training:
            rank = torch.distributed.get_rank()
            with open(Path(os.environ["SEEN_DIR"]) / f"rank{rank}.txt", "a") as out:
                out.write(repr(batch["input_ids"][:, :8].tolist()) + "\\n")
        return batch
"""


@pytest.mark.slow
def test_a_plugin_datamodule_with_plain_loaders_is_sharded_by_lightning(tmp_path: Path) -> None:
    # The presets once turned Lightning's DistributedSampler off for every datamodule: a plugin's
    # plain DataLoaders then fed every process the same batches (two processes did one's work).
    site = tmp_path / "site"
    info = site / "plain_loaders_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plain-loaders-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lmlab.datamodules]\nplain_loaders = plain_loaders:PlainLoaders\n")
    (site / "plain_loaders.py").write_text(PLAIN_LOADERS)
    seen = tmp_path / "seen"
    seen.mkdir()
    lmlab(tmp_path / "home", "+experiment=debug", f"data.path={wiki_head(tmp_path)}", "trainer.max_steps=3",
          "data.datamodule=plain_loaders", "export=false", *DDP,
          env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               "SEEN_DIR": str(seen)})
    batches = {rank: (seen / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)}
    assert len(batches[0]) == len(batches[1]) == 3
    assert all(a != b for a, b in zip(batches[0], batches[1])), "both processes trained on the same batches"


def test_rank_zero_is_read_from_the_launchers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab.distributed import is_rank_zero

    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert is_rank_zero()  # a plain process
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert is_rank_zero()  # srun's task 0, or the shell of an interactive allocation
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_rank_zero()  # Lightning's second process there: it inherited SLURM_PROCID=0
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "3")
    assert not is_rank_zero()  # torchrun on the second node: local rank 0, global rank 3


def _wnut_head(tmp_path: Path, sizes: tuple[tuple[str, int], ...]) -> Path:
    wnut = SHARED_DATA / "ner" / "wnut16"
    if not wnut.exists():
        pytest.skip(f"real test data missing: {wnut}")
    folder = tmp_path / "wnut"
    folder.mkdir()
    for split, n in sizes:
        blocks = (wnut / f"{split}.conll").read_text(encoding="utf-8").strip().split("\n\n")[:n]
        (folder / f"{split}.conll").write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")
    return folder


@pytest.mark.slow
def test_ddp_counts_every_processs_tokens(tmp_path: Path) -> None:
    """Padded batches (NER sentences) hold different token counts on each rank: the total and the
    speed are the processes' sum, equal to one process's over the same global batches."""
    folder = _wnut_head(tmp_path, (("train", 200), ("validation", 21), ("test", 25)))
    common = ["task=ner", "+experiment=debug", f"data.path={folder}", "data.max_documents=null",
              "trainer.max_steps=6", "trainer.log_every_n_steps=2"]
    run_in_home(tmp_path / "one", [*QUIET, *common, "data.batch_size=8"])  # the reference: one process, in this one
    lmlab(tmp_path / "two", *common, *DDP, "data.batch_size=4")
    _, one = only_run(tmp_path / "one" / "home")
    _, two = only_run(tmp_path / "two")
    assert two.data.metrics["train/total_tokens"] == one.data.metrics["train/total_tokens"] > 0


@pytest.mark.slow
def test_ddp_mlm_loss_parts_are_means_over_processes_like_the_loss(tmp_path: Path) -> None:
    text = wiki_head(tmp_path)
    lmlab(tmp_path / "two", "task=mlm", "task.nsp=true", "+experiment=debug", f"data.path={text}", *DDP,
          "trainer.max_steps=4", "trainer.log_every_n_steps=1", "data.batch_size=4")
    client, run = only_run(tmp_path / "two")
    loss, mlm, nsp = (history(client, run.info.run_id, key) for key in ("train/loss", "train/mlm_loss",
                                                                        "train/nsp_loss"))
    assert len(loss) == len(mlm) == len(nsp) == 4
    assert [m + n for m, n in zip(mlm, nsp)] == pytest.approx(loss, rel=1e-5)  # rank 0's parts alone do not add up


@pytest.mark.slow
def test_ddp_evaluation_neither_duplicates_nor_drops_examples(tmp_path: Path) -> None:
    """An odd-sized test split over 2 processes: entity F1 and the predictions file equal one process's."""
    folder = _wnut_head(tmp_path, (("train", 200), ("validation", 21), ("test", 25)))
    data = ["task=ner", "+experiment=debug", f"data.path={folder}", "data.max_documents=null",
            "trainer.limit_val_batches=1.0", "data.eval_batch_size=4"]
    # The model scored is all the fit provides (no process boundary to check): trained in this process.
    fitted, _ = run_in_home(tmp_path / "fit", [*QUIET, *data, "trainer.max_steps=20"])
    export = fitted.export_dir
    assert export is not None and (export / "config.json").is_file()

    run_in_home(tmp_path / "one", [*QUIET, *data, "mode=test", f"model.pretrained={export}"])
    lmlab(tmp_path / "two", *data, *DDP, "mode=test", f"model.pretrained={export}")
    one_client, one = only_run(tmp_path / "one" / "home")
    two_client, two = only_run(tmp_path / "two")
    for key in ("test/f1", "test/precision", "test/recall", "test/token_accuracy"):
        assert two.data.metrics[key] == one.data.metrics[key], key  # counts are integers: exact
    assert two.data.metrics["test/loss"] == pytest.approx(one.data.metrics["test/loss"], rel=1e-5)

    def predictions(tags: dict[str, str]) -> str:
        return (Path(tags["lmlab.output_dir"]) / "predictions" / "test_predictions.conll").read_text(encoding="utf-8")

    expected = predictions(one.data.tags)
    assert predictions(two.data.tags) == expected and expected.count("\n\n") == 25


def test_the_ddp_preset_uses_the_buffer_option_name_of_this_torch() -> None:
    import inspect

    import torch
    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from lmlab.distributed import build_strategy

    options = OmegaConf.to_container(compose_cfg(["trainer=ddp"]).trainer.strategy)
    assert options["broadcast_buffers"] is False  # every torch 2.x knows this name
    kwargs = build_strategy(options, None)._ddp_kwargs
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters:
        # torch >= 2.13 warns about the old name on every process
        assert kwargs.get("forward_sync_buffers") is False and "broadcast_buffers" not in kwargs
    else:
        assert kwargs.get("broadcast_buffers") is False


def _tiny_predictor(task: str, folder: Path) -> tuple[Path, Path, list[str]]:
    """An untrained tiny model of ``task`` saved as a Hugging Face directory (head, labels, tokenizer),
    a file of 7 real records to predict on (odd: the processes get 4 and 3) and the task's overrides."""
    import json

    import torch

    from lmlab import registry
    from lmlab.models.build import build_hf_config, build_model
    from lmlab.tokenization import train_bpe, train_wordpiece

    folder.mkdir()
    source = {"classification": SHARED_DATA / "classification" / "rotten_tomatoes" / "test.csv",
              "ner": SHARED_DATA / "ner" / "wnut16" / "test.conll",
              "summarization": SHARED_DATA / "summarization" / "news_titles" / "test.jsonl"}[task]
    if not source.exists():
        pytest.skip(f"real test data missing: {source}")
    text = source.read_text(encoding="utf-8")
    labels = None
    if task == "classification":
        lines = text.splitlines()[:8]  # header + 7 reviews
        path, model, tok = folder / "reviews.csv", "bert", train_wordpiece(lines[1:], 300, 1, True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        labels = ["fresh", "rotten"]
    elif task == "ner":
        blocks = text.strip().split("\n\n")[:7]
        path, model = folder / "tweets.conll", "bert"
        path.write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")
        words = [[line.split("\t") for line in b.splitlines()] for b in blocks]
        tok = train_wordpiece([" ".join(w[0] for w in s) for s in words] * 3, 300, 1, True)
        labels = sorted({w[-1] for s in words for w in s})
    else:
        lines = text.splitlines()[:7]
        path, model = folder / "news.jsonl", "bart"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tok = train_bpe([json.loads(line)["document"] for line in lines], 400, 1)
    overrides = [f"task={task}", f"model={model}", "model.size=tiny",
                 *(["task.generation.max_new_tokens=4"] if task == "summarization" else [])]
    spec, task_spec = registry.get("model", model), registry.get("task", task)
    updates = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
               "label2id": {name: i for i, name in enumerate(labels)}} if labels else None
    torch.manual_seed(0)
    net = build_model(spec, task_spec.head(compose_cfg(overrides)),
                      build_hf_config(spec, compose_cfg(overrides).model, tok, 64, updates))
    net.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder / "model", path, overrides


# One task end to end (about 40 s): sharing and gathering are the tasks' common code
# (loaders.predict_in_shares); each task's own part also runs in its one-process predict tests.
# Checked by hand for ner and summarization too: same sha256 at 1 and 2 processes.
@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification"])
def test_ddp_predict_shares_the_rows_and_writes_what_one_process_writes(tmp_path: Path, task: str) -> None:
    """Every process once predicted the whole file (rank 0 alone writing it): no speed-up from more
    devices. Now each predicts every other batch and rank 0 gathers them, in the file's order."""
    import hashlib
    import re

    model, path, overrides = _tiny_predictor(task, tmp_path / "inputs")
    common = [*overrides, "mode=predict", f"model.pretrained={model}", f"data.path={path}", "data.eval_batch_size=2"]
    one, _ = run_in_home(tmp_path / "one", [*QUIET, *common])
    output = lmlab(tmp_path / "two", *common, *DDP)

    shares = dict(re.findall(r"Process (\d) of 2 predicted (\d) of 7 rows", output))
    assert shares == {"0": "4", "1": "3"}  # batches [0, 1] and [4, 5] on rank 0; [2, 3] and [6] on rank 1
    client, two = only_run(tmp_path / "two")
    assert two.data.metrics["predict/examples"] == one.metrics["predict/examples"] == 7  # each row once

    def digest(output_dir: Path) -> str:
        (written,) = (Path(output_dir) / "predictions").glob("predictions.*")
        return hashlib.sha256(written.read_bytes()).hexdigest()

    assert digest(two.data.tags["lmlab.output_dir"]) == digest(one.output_dir)  # byte for byte


def test_predict_shares_are_whole_batches_of_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab.data import loaders

    def rows(size: int, world: int, shared: bool = True) -> list[list[int]]:
        got = []
        for rank in range(world):
            monkeypatch.setattr(loaders, "process_group", lambda rank=rank: (rank, world))
            sampler = loaders.PredictSampler(size, 2, shared=shared)
            assert len(sampler) == len(list(sampler))
            got.append(list(sampler))
        return got

    # Each batch of 2 is one process's batch, so its padding and its predictions are too.
    assert rows(7, 2) == [[0, 1, 4, 5], [2, 3, 6]]
    assert rows(7, 3) == [[0, 1, 6], [2, 3], [4, 5]]
    # A process without a batch would wait in DDP's first-forward buffer sync: every row on each.
    assert rows(3, 3) == [[0, 1, 2]] * 3
    assert rows(7, 2, shared=False) == [list(range(7))] * 2  # FSDP, DeepSpeed: every process in step
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    assert loaders.replicates_model(SimpleNamespace(strategy=DDPStrategy()))
    for sharding in (DeepSpeedStrategy, FSDPStrategy):  # built bare: DeepSpeed needs its package
        assert not loaders.replicates_model(SimpleNamespace(strategy=object.__new__(sharding)))
    assert not loaders.replicates_model(SimpleNamespace())  # a stand-in trainer predicts every row

    # trainer.use_distributed_sampler=true: Lightning's sampler takes a share of each share.
    from lmlab.errors import LmlabError

    lost = SimpleNamespace(strategy=None, is_global_zero=True, predict=lambda module, dataloaders: [[(0, "O")]])
    with pytest.raises(LmlabError, match=r"use_distributed_sampler': is true, and the processes predicted 1 of 2"):
        loaders.predict_in_shares(lost, None, [{}, {}], batch_size=2, collate_fn=list, pairs=iter)


def test_evaluation_batches_are_as_many_on_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP and DeepSpeed gather parameters inside each forward: a process with a batch fewer left the
    others waiting (25 rows, 2 processes, batches of 4: 4 batches and 3). Each row is still read once."""
    from lmlab.data import loaders

    for size, batch, world in [(25, 4, 2), (9, 4, 2), (17, 4, 4), (8, 4, 2), (30, 7, 3), (5, 2, 4), (100, 8, 8)]:
        shards = []
        for rank in range(world):
            monkeypatch.setattr(loaders, "process_group", lambda rank=rank: (rank, world))
            batches = list(loaders.EvalBatches(size, batch))
            assert len(batches) == len(loaders.EvalBatches(size, batch))
            sampler_rows = list(loaders.ShardedSampler(size, shuffle=False))
            assert [row for part in batches for row in part] == sampler_rows  # the same rows, in file order
            assert all(0 < len(part) <= batch for part in batches)
            starts = [sum(map(len, batches[:b])) for b in range(len(batches))]
            for b, (start, part) in enumerate(zip(starts, batches)):
                assert start >= b * len(part) and start >= b * batch - 1  # what summarization relies on
            shards.append(batches)
        assert len({len(batches) for batches in shards}) == 1, (size, batch, world, shards)
        assert sorted(row for batches in shards for part in batches for row in part) == list(range(size))
    monkeypatch.setattr(loaders, "process_group", lambda: (0, 1))
    assert list(loaders.EvalBatches(10, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # one process: as before


def test_lightnings_sampler_is_refused_for_loaders_that_shard_themselves() -> None:
    from lmlab.data import loaders
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="use_distributed_sampler': is true, but this data's loaders shard themselves"):
        loaders.distributed_sampler_wanted(True, sharded=True)
    assert loaders.distributed_sampler_wanted(True, sharded=False)  # a plugin's plain loaders
    assert not loaders.distributed_sampler_wanted(None, sharded=True)
    assert loaders.distributed_sampler_wanted(None, sharded=False)
