"""A real ``mlflow server`` over HTTP: runs, sweeps and artifacts go through it; a dead one fails fast.

The server is a subprocess on 127.0.0.1 with an SQLite backend and an artifacts folder in tmp, the
way the README starts one; it is stopped in a ``finally`` whatever the tests do.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
import pytest
from omegaconf import OmegaConf, open_dict

from conftest import TINY, WIKI, compose_cfg, free_port, lmlab_command, run_in_home, wiki_head
import lmlab
from lmlab import tracking
from lmlab.errors import LmlabError
from lmlab.train import run

STARTUP_TIMEOUT = 300  # a first start migrates the database; slow on a busy CPU


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {STARTUP_TIMEOUT} s:\n{log.read_text()[-3000:]}")


class Server:
    """A real ``mlflow server`` on 127.0.0.1 that can be killed and started again on the same port and
    database, the way a tracking server goes away and comes back."""

    def __init__(self, root: Path):
        self.root = root
        self.artifacts = root / "artifacts"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.root / "server.log"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                   self.url.rsplit(":", 1)[1], "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                   "--serve-artifacts", "--artifacts-destination", str(self.artifacts), "--workers", "1"]
        with open(log, "a") as out:
            self.proc = subprocess.Popen(command, cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_healthy(self.url, self.proc, log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # The server runs workers of its own: stop the whole process group.
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)  # uvicorn waits for idle keep-alive connections; do not wait long
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(URL, artifacts folder) of a running tracking server that proxies artifact uploads."""
    srv = Server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        srv.start()
        yield srv.url, srv.artifacts
    finally:
        srv.stop()


def artifact_files(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_files(client, run_id, info.path) if info.is_dir else {info.path}
    return out


# -- a sweep logged to the server -----------------------------------------------------------------
@pytest.mark.slow
def test_sweep_logs_runs_and_artifacts_through_the_server(server: tuple[str, Path], tmp_path: Path) -> None:
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    url, artifacts = server
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:300]) + "\n", encoding="utf-8")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    env.update(LMLAB_HOME=str(home), LMLAB_CACHE_DIR=str(tmp_path / "cache"))
    args = ["-m", *TINY, f"data.path={wiki}", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", f"logger.tracking_uri={url}", "logger.experiment_name=over_http",
            "seed=1,2"]
    proc = subprocess.run([*lmlab_command(), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    client = mlflow.MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("over_http")
    # The server chose the artifact location: uploads go through it, not to a path of ours.
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2 and sorted(c.data.params["seed"] for c in children) == ["1", "2"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["logger.tracking_uri"] == url
        assert child.data.params["trainer.max_steps"] == "2"
        assert child.data.metrics["val/loss"] > 0
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        files = artifact_files(client, child.info.run_id)
        assert {"config/config_resolved.yaml", "run_info.json", "model/model.safetensors", "model/config.json",
                "model/tokenizer.json"} <= files, files
        config = json.loads(Path(client.download_artifacts(child.info.run_id, "model/config.json",
                                                           str(tmp_path))).read_text())
        assert config["model_type"] == "gpt2"
        # ...and they lie in the server's artifacts folder, nowhere under the lmlab home.
        stored = artifacts / experiment.experiment_id / child.info.run_id / "artifacts" / "model" / "model.safetensors"
        assert stored.is_file()
    assert "sweep/jobs.json" in artifact_files(client, parents[0].info.run_id)
    assert not (home / "mlflow.db").exists() and not (home / "mlartifacts").exists()


@pytest.mark.slow
def test_a_run_logs_to_the_server_mlflow_tracking_uri_names(server: tuple[str, Path], tmp_path: Path) -> None:
    # MLflow's own variables, as every MLflow user sets them; before, lmlab ignored both and logged
    # to its embedded store. The run also carries Hydra's record of the job and what code made it.
    url, _ = server
    wiki = wiki_head(tmp_path, 200)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    env.update(LMLAB_HOME=str(home), LMLAB_CACHE_DIR=str(tmp_path / "cache"), MLFLOW_TRACKING_URI=url,
               MLFLOW_EXPERIMENT_NAME="from_env")
    args = [*TINY, f"data.path={wiki}", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "export=false"]
    proc = subprocess.run([*lmlab_command(), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert f"open the MLflow UI: open {url} in a browser" in proc.stdout
    assert not (home / "mlflow.db").exists() and not (home / "mlartifacts").exists()

    client = mlflow.MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("from_env")
    (run_,) = client.search_runs([experiment.experiment_id])
    assert run_.info.status == "FINISHED" and run_.data.params["logger.tracking_uri"] == url
    assert run_.data.params["logger.experiment_name"] == "from_env"
    files = artifact_files(client, run_.info.run_id)
    assert {"config/config_resolved.yaml", "config/hydra/config.yaml", "config/hydra/overrides.yaml",
            "config/hydra/hydra.yaml"} <= files, files
    overrides = Path(client.download_artifacts(run_.info.run_id, "config/hydra/overrides.yaml", str(tmp_path)))
    assert [str(o) for o in OmegaConf.load(overrides)] == args
    tags = run_.data.tags
    assert tags["lmlab.command"] == shlex.join(["lmlab", *args])
    assert tags["lmlab.version"] == lmlab.__version__ and tags["mlflow.source.name"] == "lmlab"
    assert run_.info.user_id == tags.get("mlflow.user", "unknown")  # the runs table's User column


# -- a server that is not there -------------------------------------------------------------------
def test_dead_server_fails_fast_with_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(LmlabError) as caught:
        tracking.check_reachable(url)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "logger.tracking_uri" in message and url in message and "unreachable" in message
    assert "mlflow server" in message  # it says how to start one


def test_server_answering_an_error_is_reported() -> None:
    class Unhealthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Unhealthy)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(LmlabError, match="answered HTTP 503 on /health"):
            tracking.check_reachable(f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_local_stores_are_not_probed() -> None:
    tracking.check_reachable("sqlite:////nowhere/mlflow.db")  # nothing to reach: no error


def test_sweep_against_a_dead_server_is_refused_before_any_job(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    env.update(LMLAB_HOME=str(tmp_path / "home"), LMLAB_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([*lmlab_command(), "-m", *TINY, f"logger.tracking_uri={url}", "seed=1,2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("lmlab: error:") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "logger.tracking_uri" in proc.stderr and url in proc.stderr
    assert "Launching" not in proc.stdout + proc.stderr  # no job started
    assert not (tmp_path / "home").exists() and not (tmp_path / "cache").exists()


def test_run_against_a_dead_server_stops_before_any_data_work(wiki_file: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    cfg = compose_cfg([*TINY, f"data.path={wiki_file}", f"logger.tracking_uri={url}"])
    with pytest.raises(LmlabError, match="logger.tracking_uri"):
        run(cfg)
    assert not (tmp_path / "cache").exists()  # no tokenizer trained, no data tokenized
    assert not (tmp_path / "lmlab_home").exists()  # no run directory, no local store


# -- the local store: run names, deleted experiments, folders -------------------------------------
def test_runs_with_the_same_seed_are_named_after_their_run_directories(tmp_path: Path) -> None:
    # MLflow draws its generated names from `random`, which the run seeds: both would be the same.
    wiki = wiki_head(tmp_path, 200)
    overrides = [*TINY, f"data.path={wiki}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                 "checkpoint.every_n_steps=2", "export=false", "seed=42"]
    first, _ = run_in_home(tmp_path, overrides)
    second, _ = run_in_home(tmp_path, overrides)
    client = mlflow.MlflowClient(tracking_uri=first.tracking_uri)
    names = [client.get_run(result.run_id).info.run_name for result in (first, second)]
    assert names[0] != names[1]
    assert names == [first.output_dir.name, second.output_dir.name]


def test_a_run_name_from_the_config_is_kept(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "logger.run_name=baseline"])
    L.seed_everything(42)
    client, run_id, _ = tracking.start_run(cfg, {"lmlab.output_dir": str(tmp_path / "runs" / "2026_clm_gpt2")})
    assert client.get_run(run_id).info.run_name == "baseline"
    # A multirun job's folder is its number: the sweep folder says which sweep.
    job_dir = "/h/multiruns/2026-12-06_03-10-00/3"
    assert tracking.default_run_name({"lmlab.output_dir": job_dir}) == "2026-12-06_03-10-00_3"


def test_a_deleted_experiment_is_a_config_error(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "logger.experiment_name=gone"])
    tracking.check_experiment(cfg)  # no store yet: nothing to check, and none is created
    assert not (tmp_path / "lmlab_home" / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    gone = client.create_experiment("gone")
    tracking.check_experiment(cfg)
    client.delete_experiment(gone)
    with pytest.raises(LmlabError) as caught:
        tracking.check_experiment(cfg)
    message = str(caught.value)
    assert "config key 'logger.experiment_name'" in message and "'gone'" in message and "deleted" in message
    assert f"mlflow experiments restore --experiment-id {gone}" in message


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns", "/srv/mlruns"])
def test_a_folder_as_tracking_store_is_refused(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(LmlabError) as caught:
        tracking.check_reachable(uri)
    message = str(caught.value)
    assert "config key 'logger.tracking_uri'" in message and uri in message
    assert "sqlite:///PATH/mlflow.db" in message and "http://HOST:PORT" in message
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in still works
    tracking.check_reachable(uri)


# -- a server lost in the middle of a run ---------------------------------------------------------
class ServerOutage(L.Callback):
    """Kills the server (SIGKILL) before step ``down``; starts it again before step ``up``, if given."""

    def __init__(self, srv: Server, down: int, up: int | None):
        self.srv, self.down, self.up = srv, down, up

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.down:
            self.srv.stop(signal.SIGKILL)
        if trainer.global_step == self.up:
            self.srv.start()


def run_with_outage(srv: Server, wiki_file: Path, down: int, up: int | None,
                    monkeypatch: pytest.MonkeyPatch):
    from lmlab import checkpointing

    real = checkpointing.callbacks
    monkeypatch.setattr(checkpointing, "callbacks", lambda cfg, last: [*real(cfg, last), ServerOutage(srv, down, up)])
    cfg = compose_cfg([*TINY, f"data.path={wiki_file}", f"logger.tracking_uri={srv.url}", "trainer.max_steps=12",
                       "trainer.log_every_n_steps=1", "trainer.val_check_interval=6", "trainer.limit_val_batches=1"])
    return run(cfg)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Server]:
    """A server of the test's own, which the test may kill and start again."""
    srv = Server(tmp_path / "srv")
    srv.root.mkdir()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_server_lost_mid_run_and_back_loses_nothing(own_server: Server, wiki_file: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    srv = own_server
    result = run_with_outage(srv, wiki_file, down=3, up=8, monkeypatch=monkeypatch)
    client = mlflow.MlflowClient(tracking_uri=srv.url)
    remote = client.get_run(result.run_id)
    assert remote.info.status == "FINISHED"
    # Every step's loss is there, those logged while the server was down included.
    steps = sorted(m.step for m in client.get_metric_history(result.run_id, "train/loss"))
    assert steps == list(range(12)), steps
    assert remote.data.metrics["val/loss"] == pytest.approx(result.metrics["val/loss"])
    assert "model/model.safetensors" in artifact_files(client, result.run_id)
    assert not (result.output_dir / "mlflow_pending.jsonl").exists()
    assert "cannot be reached" in caplog.text and "is back" in caplog.text


@pytest.mark.slow
def test_server_gone_for_good_keeps_the_log_to_send_later(own_server: Server, wiki_file: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    srv = own_server
    result = run_with_outage(srv, wiki_file, down=5, up=None, monkeypatch=monkeypatch)
    assert result.metrics["val/loss"] > 0 and (result.export_dir / "model.safetensors").is_file()
    pending = result.output_dir / "mlflow_pending.jsonl"
    assert pending.is_file() and "python -m lmlab.pending" in caplog.text
    # MLflow retries (with back-off, seconds each) only the write that found the server gone; the
    # run's end asks a known-dead server nothing that retries.
    retries = [r for r in caplog.records if r.name.startswith("urllib3") and "Retrying" in r.getMessage()]
    assert len(retries) <= int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")), [r.getMessage() for r in retries]

    srv.start()
    client = mlflow.MlflowClient(tracking_uri=srv.url)
    assert client.get_run(result.run_id).info.status == "RUNNING"  # its end is in the file too
    proc = subprocess.run([sys.executable, "-m", "lmlab.pending", str(result.output_dir)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not pending.exists()
    again = subprocess.run([sys.executable, "-m", "lmlab.pending", str(result.output_dir)], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "nothing pending" in again.stdout
    typo = subprocess.run([sys.executable, "-m", "lmlab.pending", str(result.output_dir) + "x"],
                          capture_output=True, text=True, timeout=300)
    assert typo.returncode == 2 and "not an lmlab run directory" in typo.stderr
    remote = client.get_run(result.run_id)
    assert remote.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(result.run_id, "train/loss"))
    assert steps == list(range(12)), steps
    assert "model/model.safetensors" in artifact_files(client, result.run_id)


def test_a_sqlite_store_given_keeps_its_artifacts_beside_the_database(tmp_path: Path, wiki_file: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's own default would put them in ./mlruns of whatever directory the command ran in.
    work = tmp_path / "work"
    (work / "stores").mkdir(parents=True)
    monkeypatch.chdir(work)
    result, _ = run_in_home(tmp_path, [*TINY, f"data.path={wiki_file}", "trainer.max_steps=2",
                                       "logger.tracking_uri=sqlite:///stores/runs.db"])
    run = mlflow.MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.artifact_uri.startswith((work / "stores" / "mlartifacts").as_uri())
    assert (work / "stores" / "mlartifacts").is_dir() and not (work / "mlruns").exists()


# -- names, values, the environment and the code a run comes from ---------------------------------
def test_mlflow_tracking_uri_and_experiment_name_come_from_the_environment(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_cfg(TINY)
    assert tracking.tracking_uri(cfg) == tracking.default_tracking_uri(tmp_path / "lmlab_home")
    assert cfg.logger.experiment_name == "lmlab"
    store = tmp_path / "stores" / "team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")
    cfg = compose_cfg(TINY)
    assert tracking.tracking_uri(cfg) == f"sqlite:///{store}" and cfg.logger.experiment_name == "team"
    # Artifacts beside that database, as for one given on the command line (not ./mlruns of the cwd).
    assert tracking.artifact_root(cfg) == (tmp_path / "stores" / "mlartifacts").as_uri()
    client, run_id, _ = tracking.start_run(cfg, {})
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == "team"
    assert store.is_file() and not (tmp_path / "lmlab_home" / "mlflow.db").exists()
    # The command line wins over the environment.
    cfg = compose_cfg([*TINY, "logger.tracking_uri=http://127.0.0.1:1", "logger.experiment_name=mine"])
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:1" and cfg.logger.experiment_name == "mine"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "127.0.0.1:5000")  # a mistake of the environment's says so
    with pytest.raises(LmlabError, match=r"'127.0.0.1:5000' \(from MLFLOW_TRACKING_URI\) has no scheme"):
        tracking.check_reachable(tracking.tracking_uri(compose_cfg(TINY)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # set but empty: the embedded store
    assert tracking.tracking_uri(compose_cfg(TINY)) == tracking.default_tracking_uri(tmp_path / "lmlab_home")


def test_names_mlflow_refuses_are_logged_under_names_it_takes(tmp_path: Path) -> None:
    # Config files of the user's own may hold any key (logger.tags, a plugin's data options); MLflow
    # refused the whole batch of params (and the run stayed RUNNING) for one such name.
    cfg = compose_cfg(TINY)
    with open_dict(cfg):
        cfg.logger.tags = {"team (nlp)": "search", "/root": "r", "..": "up", "ok-tag": "x" * 9000}
        cfg.data.label_names = {"B-person": 1, "a@b": 2, "a_b": 3, "x//y": 4, "c:d": 5}
        cfg.data.long_value = "v" * 7000
    client, run_id, _ = tracking.start_run(cfg, {})
    run_ = client.get_run(run_id)
    params, tags = run_.data.params, run_.data.tags
    assert run_.info.status == "RUNNING"  # the run started; its body ends it
    assert params["data.label_names.B-person"] == "1"
    assert params["data.label_names.a_b"] == "3"  # a name MLflow takes is never the one renamed
    assert params["data.label_names.a_b_2"] == "2"
    assert params["data.label_names.x__y"] == "4" and params["data.label_names.c_d"] == "5"
    assert params["logger.tags.team _nlp_"] == "search"
    assert len(params["data.long_value"]) == tracking.MAX_PARAM_VALUE
    assert params["data.long_value"].endswith("...(truncated)")
    assert tags["team _nlp_"] == "search" and tags["_root"] == "r" and tags["_.."] == "up"
    assert len(tags["ok-tag"]) == tracking.MAX_TAG_VALUE


def test_a_run_whose_start_fails_ends_failed_not_running(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_cfg(TINY)
    created: list[str] = []
    original = mlflow.MlflowClient.create_run

    def create_run(self, *args, **kwargs):
        run_ = original(self, *args, **kwargs)
        created.append(run_.info.run_id)
        return run_

    def refuse(self, *args, **kwargs):
        raise mlflow.exceptions.MlflowException("the store refused the params")

    with monkeypatch.context() as mp, pytest.raises(mlflow.exceptions.MlflowException, match="refused"):
        mp.setattr(mlflow.MlflowClient, "create_run", create_run)
        mp.setattr(mlflow.MlflowClient, "log_batch", refuse)
        tracking.start_run(cfg, {})
    assert len(created) == 1
    assert mlflow.MlflowClient(tracking.tracking_uri(cfg)).get_run(created[0]).info.status == "FAILED"


def test_a_run_carries_lmlab_version_git_commit_and_command(tmp_path: Path) -> None:
    tags = tracking.source_tags()
    assert tags["lmlab.version"] == lmlab.__version__
    assert tags["lmlab.command"] == shlex.join(sys.argv)  # outside Hydra: the process's own command
    head = subprocess.run(["git", "-C", str(Path(lmlab.__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:  # a checkout (an installed wheel has no commit to name)
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["lmlab.git.dirty"] in ("true", "false")
    # A sweep's job: the command that runs that job alone, not the sweep's.
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from lmlab.paths import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["optimizer.lr=3e-05", "seed=2"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.job.num = 1
    HydraConfig.instance().set_config(cfg)
    try:
        assert tracking.command_line() == "lmlab optimizer.lr=3e-05 seed=2"
    finally:
        HydraConfig.instance().cfg = None


def test_a_run_leaves_mlflow_tracking_uri_as_it_found_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning's MLFlowLogger sets MLFLOW_TRACKING_URI to its store (mlflow.set_tracking_uri); as
    # logger.tracking_uri's default, that sent a sweep's next in-process job (say of another
    # paths.root) to the first job's store.
    from lmlab.run_log import RunLog

    cfg = compose_cfg(TINY)
    OmegaConf.resolve(cfg)  # the embedded store, whatever the variable says below
    client, run_id, _ = tracking.start_run(cfg, {})
    for before in (None, "http://127.0.0.1:1"):
        if before is None:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
        logger = RunLog(client, run_id).metrics_logger(cfg)
        logger.log_metrics({"train/loss": 1.0}, step=0)
        assert os.environ.get("MLFLOW_TRACKING_URI") == before
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [1.0, 1.0]


def test_a_resumed_run_keeps_the_params_it_started_with(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """MLflow refuses to change a param: a resume whose world_size differs (trainer.devices=-1 on a
    machine with other GPUs) failed at its first MLflow call."""
    from lmlab.run_log import RunLog

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("resumed")).info.run_id
    RunLog(client, run_id).params({"n_parameters": 5, "world_size": 2})
    RunLog(client, run_id).params({"n_parameters": 5, "world_size": 4, "effective_batch_size": 64})
    assert client.get_run(run_id).data.params == {"n_parameters": "5", "world_size": "2", "effective_batch_size": "64"}
    assert "world_size=2 (now 4)" in caplog.text


def test_a_resumed_run_does_not_log_the_steps_it_holds_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A process killed after logging steps past its last checkpoint trains those steps again on resume:
    each was logged twice, two points per step in MLflow's history and charts."""
    import logging

    from conftest import TINY, compose_cfg

    from lmlab.resume import Resume, open_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_cfg([*TINY, f"logger.tracking_uri={uri}"])
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("lmlab")).info.run_id
    for step in (0, 10, 20):  # the kill came after step 20's log; the checkpoint is step 10's
        client.log_metric(run_id, "train/loss", 3.0 - step / 10, step=step)
    client.log_metric(run_id, "val/loss", 2.5, step=10)
    client.set_terminated(run_id, "KILLED")
    caplog.set_level(logging.INFO, logger="lmlab.resume")
    mlrun = open_run(cfg, Resume(tmp_path / "last.ckpt", tmp_path, run_id), {}, tmp_path, rank_zero=True)
    assert "MLflow holds this run's metrics up to step 20" in caplog.text
    logger = mlrun.metrics_logger(cfg)
    for step in (10, 20, 30):  # trained again from the checkpoint, then on
        logger.log_metrics({"train/loss": 3.0 - step / 10, "train/lr": 0.1}, step=step)
    mlrun.metric("val/loss", 2.5, step=10)
    mlrun.metric("val/loss", 2.25, step=30)
    mlrun.terminate("FINISHED")
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 10, 20, 30]
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [10, 30]
    assert [m.step for m in client.get_metric_history(run_id, "train/lr")] == [10, 20, 30]  # new keys are whole
    assert client.get_run(run_id).info.status == "FINISHED"


def test_runs_starting_together_on_a_fresh_sqlite_store_all_open_it(tmp_path: Path) -> None:
    """MLflow creates a new database's tables when its first client is built: processes doing that at
    the same moment (a SLURM job array on a fresh mlflow.db) failed with `table ... already exists`."""
    import textwrap

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    go = tmp_path / "go"
    starter = textwrap.dedent(f"""
        import pathlib, sys, time
        import mlflow  # imported before the start line, so that every process opens the store at once
        from lmlab.tracking import open_client
        pathlib.Path(sys.argv[1]).touch()
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.001)
        client = open_client({uri!r})
        client.create_run(client.get_experiment_by_name("Default").experiment_id)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", starter, str(tmp_path / f"ready{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(3)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0] * 3, "\n".join(err[-1500:] for _, err in results)
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert len(client.search_runs(["0"])) == 3
