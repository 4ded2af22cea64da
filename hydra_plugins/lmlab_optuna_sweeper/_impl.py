"""Ask Optuna for trials, launch them as Hydra jobs, tell it the objectives; resume a stored study.

Resuming: ``n_trials`` is the number of finished trials the study should hold, so a sweep run
again against the same storage and study name runs only what is missing. A trial the sweep was
running when it died stays RUNNING in the storage; its heartbeat (a user attribute the sweep
refreshes) goes stale, and the next sweep marks it FAIL and enqueues its parameters again, so it
is neither lost nor counted twice.

A study is tied to what it searches: it keeps the overrides every trial got unchanged (the command
line's fixed part, ``lmlab_fixed_overrides``), and a sweep with other fixed overrides (another
corpus, say) is refused instead of reporting the stored study's results as its own.
"""

from __future__ import annotations

import logging
import math
import shlex
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from lmlab import sweep as lmlab_sweep
from lmlab.errors import LmlabError, config_error

from . import _space

log = logging.getLogger(__name__)

HEARTBEAT = "lmlab_heartbeat"  # user attribute: when the sweep last saw the trial alive
RETRY_OF = "lmlab_retry_of"  # user attribute of a re-run: the number of the interrupted trial
FIXED = "lmlab_fixed_overrides"  # study user attribute: key -> "key=value" of every trial's fixed overrides
DONE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count towards n_trials: ended, and not an interrupted trial that was re-queued."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    return [t for t in trials if t.state in DONE and t.number not in retried]


def _last_sign_of_life(trial: optuna.trial.FrozenTrial) -> float:
    beat = trial.user_attrs.get(HEARTBEAT)
    if beat is not None:
        return float(beat)
    return trial.datetime_start.timestamp() if trial.datetime_start else 0.0


def recover_interrupted(study: optuna.Study, grace_period: float) -> list[optuna.trial.FrozenTrial]:
    """Fail and re-queue RUNNING trials whose sweep died; returns them.

    A trial whose heartbeat is younger than ``grace_period`` may belong to a live sweep on the same
    study, so it is waited for (at most one grace period) rather than failed at once.
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    newest = min(time.time() - _last_sign_of_life(t) for t in running)
    if newest < grace_period:
        wait = min(grace_period, grace_period - newest)  # a clock ahead of ours must not stall us
        log.info("Trials %s are RUNNING in study '%s' (heartbeat %.0f s ago): waiting %.0f s to tell a dead "
                 "sweep from a live one", [t.number for t in running], study.study_name, newest, wait)
        time.sleep(wait)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    now = time.time()
    recovered = []
    for trial in running:
        if now - _last_sign_of_life(trial) < grace_period:
            continue  # another sweep is still beating for it
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # finished meanwhile by its own sweep
            continue
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
        recovered.append(trial)
    if recovered:
        log.warning("Study '%s': trials %s were interrupted; marked FAIL and queued again", study.study_name,
                    [t.number for t in recovered])
    return recovered


def check_same_search(study: optuna.Study, fixed: dict[str, str], storage: str | None) -> None:
    """Tie ``study`` to the fixed overrides of the sweep that first ran trials in it; refuse others.

    n_trials, n_jobs and the search space may change between sessions (that extends a study); the
    fixed overrides decide what a trial's number means. A study without finished trials takes the
    overrides of whoever runs it next (a first attempt refused before training, say).
    """
    stored = study.user_attrs.get(FIXED)
    if stored == fixed:
        return
    if stored is None or not finished_trials(study):
        if stored is None and finished_trials(study):
            log.warning("Study '%s' has no record of the overrides its trials ran with (an older lmlab made it): "
                        "it is tied to this command's from now on", study.study_name)
        study.set_user_attr(FIXED, fixed)
        return
    changes = []
    for key in sorted(set(stored) | set(fixed)):
        was, now = stored.get(key), fixed.get(key)
        if was != now:
            changes.append(f"{was or key + ' not set'} in the study, {now or 'not set'} now")
    where = f" in {storage}" if storage else ""
    raise config_error(
        "hydra.sweeper.study_name",
        f"study '{study.study_name}'{where} has {len(finished_trials(study))} finished trials of another search: "
        + "; ".join(changes),
        "Give this search its own study with hydra.sweeper.study_name=NEW_NAME, or resume that one with its own "
        f"overrides: lmlab -m {shlex.join(stored.values())}.",
    )


class Heartbeat:
    """Marks the running trials alive every ``interval`` seconds while the launcher works."""

    def __init__(self, trials: list[optuna.trial.Trial], interval: float) -> None:
        self.trials = trials
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)

    def _beat(self) -> None:
        for trial in self.trials:
            try:
                trial.set_user_attr(HEARTBEAT, time.time())
            except Exception as exc:  # a locked SQLite file now and then must not end the sweep
                log.debug("heartbeat for trial %s failed: %s", trial.number, exc)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._beat()

    def __enter__(self) -> Heartbeat:
        self._beat()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def _storage(url: str | None) -> Any:
    if url is None:
        log.warning("hydra.sweeper.storage is null: the study lives in memory and cannot be resumed")
        return None
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
    # A generous SQLite busy timeout: the heartbeat thread and the main thread share the file.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


class OptunaSweeperImpl:
    def __init__(self, sampler: Any, direction: str, storage: str | None, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, params: dict[str, str] | None, heartbeat_interval: int,
                 grace_period: int | None) -> None:
        if direction not in ("minimize", "maximize"):
            raise HydraException(f"hydra.sweeper.direction must be minimize or maximize, not '{direction}'")
        if n_trials < 1 or n_jobs < 1:
            raise HydraException("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be at least 1")
        self.sampler_conf = sampler
        self.direction = direction
        self.storage_url = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = dict(params or {})
        self.heartbeat_interval = max(1, int(heartbeat_interval))
        self.grace_period = float(grace_period if grace_period is not None else 3 * self.heartbeat_interval)
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _sampler(self, space: _space.SearchSpace, trials_so_far: int) -> Any:
        kwargs: dict[str, Any] = {}
        seed = self.sampler_conf.get("seed")
        if seed is not None:
            # A resumed sweep must not replay the random draws of the first one.
            kwargs["seed"] = int(seed) + trials_so_far
        sampler = instantiate(self.sampler_conf, **kwargs)
        if self.sampler_conf.get("_partial_"):  # GridSampler: the values come from the search space
            sampler = sampler(space.grid())
        return sampler

    def _open_study(self, space: _space.SearchSpace) -> optuna.Study:
        storage = _storage(self.storage_url)
        study = optuna.create_study(study_name=self.study_name, storage=storage, direction=self.direction,
                                    load_if_exists=True)
        if study.direction.name.lower() != self.direction:
            raise config_error("hydra.sweeper.direction",
                               f"study '{study.study_name}' in {self.storage_url} was created to "
                               f"{study.direction.name.lower()}, not to {self.direction}",
                               "Give this search its own study with hydra.sweeper.study_name=NEW_NAME.")
        check_same_search(study, dict(space.fixed), self.storage_url)
        study.sampler = self._sampler(space, len(study.trials))
        return study

    def _target(self, space: _space.SearchSpace) -> int:
        if not self.sampler_conf.get("_partial_"):
            return self.n_trials
        size = math.prod(len(v) for v in space.grid().values())
        if size < self.n_trials:
            log.info("The grid has %d points: n_trials %d -> %d", size, self.n_trials, size)
        return min(self.n_trials, size)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        space = _space.parse([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        if not space.distributions:
            raise HydraException("Nothing to search: give hydra.sweeper.params or a sweep on the command line "
                                 "(optimizer.lr='tag(log, interval(1e-5, 1e-3))')")
        # Before the study exists: a stored study keeps its direction, and its fixed overrides
        # are those of its first trials, so a key that does not compose must not get that far.
        self.validate_batch_is_legal([space.overrides(_space.representative(space))])
        try:
            lmlab_sweep.check_sweeper_direction(self.config, self.direction)
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
            study = self._open_study(space)
        except LmlabError as exc:
            raise lmlab_sweep.SweepStopped(str(exc)) from exc
        for trial in recover_interrupted(study, self.grace_period):
            attrs = trial.user_attrs
            if "hydra_job" in attrs and "hydra_sweep_dir" in attrs:  # the sweep dir of the run that died
                try:
                    lmlab_sweep.job_killed(attrs["hydra_sweep_dir"], int(attrs["hydra_job"]))
                except Exception as exc:  # a run from another store or sweep dir: the trial still re-runs
                    log.warning("Could not close the MLflow run of interrupted trial %d: %s", trial.number, exc)
        target = self._target(space)
        done = len(finished_trials(study))
        log.info("Optuna study '%s' (%s, %s): %d of %d trials finished, %d to run; space: %s",
                 study.study_name, self.storage_url or "in memory", self.direction, done, target,
                 max(0, target - done), ", ".join(f"{k}={v}" for k, v in space.distributions.items()))
        records = lmlab_sweep.job_records(sweep_dir)
        job_idx = max(records, default=-1) + 1  # a resumed sweep keeps the earlier jobs' folders

        while done < target:
            trials = [study.ask() for _ in range(min(self.n_jobs, target - done))]
            batch = self._prepare(study, space, trials, sweep_dir, job_idx)
            try:
                self.validate_batch_is_legal(batch)
            except Exception:
                for trial in trials:  # a key that does not compose: the user's to fix, never re-queued
                    study.tell(trial, state=TrialState.FAIL)
                raise
            try:
                with Heartbeat(trials, self.heartbeat_interval):
                    returns = list(self.launcher.launch(batch, initial_job_idx=job_idx))
            except BaseException:
                # Ctrl-C, SIGTERM, a launcher error: these trials did not end; they run again next time.
                self._requeue(study, trials)
                raise
            failed = self._tell(study, trials, returns, sweep_dir, job_idx)
            job_idx += len(trials)
            done += len(trials)
            if failed and len(failed) / len(trials) > self.max_failure_rate:
                self._stop(study, space, len(trials), failed, target)
        return self._results(study, sweep_dir, space)

    def _stop(self, study: optuna.Study, space: _space.SearchSpace, batch: int,
              failed: list[tuple[int, optuna.trial.Trial, JobReturn]], target: int) -> None:
        """More failed jobs in a batch than max_failure_rate allows: end the sweep, summed up in a line.

        A trial that failed with an lmlab error (a config or data problem, not its values: those diverge
        and return NaN) is no result of the search: queued again, it runs once the cause is fixed.
        """
        assert self.config is not None
        num, trial, ret = failed[0]
        error = lmlab_sweep.reportable_failure(ret)
        for _, other, other_ret in failed:
            if isinstance(other_ret._return_value, LmlabError):  # the exception; .return_value raises it
                study.enqueue_trial(other.params, user_attrs={RETRY_OF: other.number})
        if error is None:
            _ = ret.return_value  # Hydra's own report, with the traceback
        self._results(study, Path(str(self.config.hydra.sweep.dir)), space)
        searched = set(space.keys.values())
        values = " ".join(o for o in ret.overrides or [] if o.split("=", 1)[0] in searched)
        more = f", {len(failed)} of the {batch} jobs of its batch did" if batch > 1 else ""
        raise lmlab_sweep.SweepStopped(
            f"job {num} (trial {trial.number}: {values}) failed{more}, which hydra.sweeper.max_failure_rate="
            f"{self.max_failure_rate} does not allow, so the sweep stopped at {len(finished_trials(study))} of "
            f"{target} finished trials "
            f"({lmlab_sweep.where_the_error_is(self.config.hydra.launcher, error)}). Fix the cause, then run the "
            "same command again: the study keeps its finished trials and runs this one again.")

    @staticmethod
    def _requeue(study: optuna.Study, trials: list[optuna.trial.Trial]) -> None:
        for trial in trials:
            try:
                attrs = trial.user_attrs
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
                if "hydra_job" in attrs and "hydra_sweep_dir" in attrs:
                    lmlab_sweep.job_killed(attrs["hydra_sweep_dir"], int(attrs["hydra_job"]))
            except Exception as exc:  # the storage may be what failed; keep the first error visible
                log.warning("Could not re-queue trial %d: %s", trial.number, exc)

    @staticmethod
    def _prepare(study: optuna.Study, space: _space.SearchSpace, trials: list[optuna.trial.Trial],
                 sweep_dir: Path, job_idx: int) -> list[list[str]]:
        """Each trial's overrides; trial and Hydra job point at each other (user attrs, job record)."""
        batch = []
        for offset, trial in enumerate(trials):
            num = job_idx + offset
            trial.set_user_attr("hydra_job", num)
            trial.set_user_attr("hydra_sweep_dir", str(sweep_dir.resolve()))
            lmlab_sweep.record_job(sweep_dir, num, tags={"optuna.study": study.study_name,
                                                         "optuna.trial": trial.number})
            batch.append(space.overrides(_space.suggest(trial, space)))
        return batch

    def validate_batch_is_legal(self, batch: list[list[str]]) -> None:
        # Compose every job here, so a bad value fails before anything is launched.
        assert self.hydra_context is not None and self.config is not None
        for overrides in batch:
            self.hydra_context.config_loader.load_sweep_config(master_config=self.config,
                                                               sweep_overrides=list(overrides))

    def _tell(self, study: optuna.Study, trials: list[optuna.trial.Trial], returns: list[JobReturn],
              sweep_dir: Path, job_idx: int) -> list[tuple[int, optuna.trial.Trial, JobReturn]]:
        failed = []
        records = lmlab_sweep.job_records(sweep_dir)
        for offset, (trial, ret) in enumerate(zip(trials, returns)):
            run_id = records.get(job_idx + offset, {}).get("run_id")
            if run_id:
                trial.set_user_attr("mlflow_run_id", run_id)
            value = ret.return_value if ret.status == JobStatus.COMPLETED else None
            if ret.status != JobStatus.COMPLETED:
                failed.append((job_idx + offset, trial, ret))
                state, values = TrialState.FAIL, None
            elif isinstance(value, (int, float)) and math.isfinite(value):
                state, values = TrialState.COMPLETE, [float(value)]
            else:
                log.warning("Trial %d returned %r, not a finite number: recorded as FAIL", trial.number, value)
                state, values = TrialState.FAIL, None
            try:
                study.tell(trial, state=state, values=values)
            except RuntimeError as exc:
                # GridSampler stops the study when the grid is used up; outside optimize() that is an error.
                if "Study.stop" not in str(exc):
                    raise
        return failed

    def _results(self, study: optuna.Study, sweep_dir: Path, space: _space.SearchSpace) -> dict[str, Any]:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "storage": self.storage_url,
                                   "direction": self.direction, "n_complete": len(complete),
                                   "n_finished": len(finished_trials(study))}
        if complete:
            best = study.best_trial
            # The best job's overrides as Hydra reads them, fixed ones included (as a grid's parent
            # records them): `lmlab <best_overrides>` trains that trial again.
            results.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                           best_overrides=space.overrides(best.params),
                           best_mlflow_run_id=best.user_attrs.get("mlflow_run_id"))
            log.info("Best trial %d: %s = %s, params %s", best.number, self.direction, best.value, best.params)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        return results
