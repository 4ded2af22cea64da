"""The ``lmlab`` command: Hydra composes the config, lmlab.train runs it."""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError

# Keys under model.config are Hugging Face config fields: any of them may be set, so the
# command line adds them (Hydra's '++') instead of demanding they exist in the YAML. Typos are
# still caught, against the HF config class, in lmlab.models.build.
FREE_FORM_PREFIXES = ("model.config.",)


def _free_form(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        if arg.startswith(FREE_FORM_PREFIXES) and "=" in arg:
            arg = "++" + arg
        out.append(arg)
    return out


def _config_dir_arg(args: list[str]) -> Path | None:
    """The folder given to Hydra's ``--config-dir`` / ``-cd``, if any."""
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if option in ("-cd", "--config-dir"):
            value = value if equals else (args[i + 1] if i + 1 < len(args) else "")
            return Path(value) if value else None
    return None


def register_experiments() -> None:
    """Presets in experiments/*.yaml become the config group ``experiment`` (``+experiment=NAME``)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from lmlab.paths import experiments_dir

    store = ConfigStore.instance()
    for path in sorted(Path(experiments_dir()).glob("*.yaml")):
        store.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")


def help_text(user_dir: Path | None = None) -> str:
    """``lmlab --help``; ``user_dir``: the ``--config-dir`` folder, whose options are listed too."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmlab import registry
    from lmlab.paths import config_dir

    register_experiments()
    GlobalHydra.instance().clear()
    lines = [
        "lmlab: train language models with PyTorch Lightning, composed with Hydra, tracked in MLflow.",
        "",
        "Usage: lmlab [GROUP=OPTION ...] [key=value ...]      one run",
        "       lmlab -m GROUP=A,B key=1,2                     a sweep: one MLflow parent run, a child per job",
        "       lmlab -m hparams_search=classification_optuna  an Optuna search; run again, it resumes",
        "       lmlab --cfg job                                print the composed config",
        "",
        "Config groups (GROUP=OPTION; * marks the default):",
    ]
    # As Hydra's --config-dir does: the folder joins the search path, its options beside lmlab's.
    extra = [f"hydra.searchpath=[file://{user_dir.resolve()}]"] if user_dir is not None and user_dir.is_dir() else []
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        cfg = compose("config", overrides=extra, return_hydra_config=True)
        defaults = {str(k): str(v) for k, v in cfg.hydra.runtime.choices.items()}
        mine = {p.name for p in user_dir.iterdir() if p.is_dir()} if extra and user_dir is not None else set()
        groups = [g for g in sorted(set(loader.list_groups("")) | mine) if g != "hydra"]
        width = max(11, *(len(g) for g in groups))
        for group in groups:
            options = loader.get_group_options(group, config_name="config", overrides=extra)
            shown = [f"{o}*" if defaults.get(group) == o else o for o in options]
            lines.append(f"  {group:<{width}} {', '.join(shown)}")
    GlobalHydra.instance().clear()
    for kind in ("task", "model", "datamodule"):
        lines.append("")
        lines.append(f"Registered {kind}s (entry-point group {registry.GROUPS[kind]}):")
        found = sorted(registry.available(kind).items())
        width = max([11, *(len(name) for name, _ in found)])
        for name, obj in found:
            text = str(getattr(obj, "description", "") or getattr(obj, "__doc__", "") or "")
            about = " ".join(text.strip().split("\n\n")[0].split())  # a docstring's first paragraph
            room = 100 - width - 3
            if len(about) > room:  # cut at a word, and say so
                about = about[: about.rfind(" ", 0, room - 1) if " " in about[: room - 1] else room - 1] + "…"
            lines.append(f"  {name:<{width}} {about}".rstrip())
    lines += [
        "",
        "Examples:",
        "  lmlab                                       tiny GPT-2 on BBC News, CPU, under a minute",
        "  lmlab task=mlm model.size=small trainer=gpu  BERT-small MLM on a GPU",
        "  lmlab data.path=corpus.txt model.config.n_layer=4 trainer.max_steps=1000",
        "  lmlab task=mlm task.whole_word_mask=true task.nsp=true",
        "",
        "Hydra's own help: lmlab --hydra-help",
    ]
    return "\n".join(lines)


def _job(cfg) -> float:
    from lmlab import sweep
    from lmlab.train import run, summary

    ctx = sweep.job_context()
    in_sweep = ctx is not None
    try:
        if in_sweep:
            sweep.check_objective_direction(cfg)
            sweep.check_direction(cfg)
            sweep.check_objective_known(cfg)
        result = run(cfg)
        if in_sweep:
            sweep.check_objective(result.objective_metric, result.metrics, cfg)
    except LmlabError as exc:
        if _preempted(exc):
            # submitit's signal before a time limit or at a preemption: the run is closed, last.ckpt
            # saved; submitit requeues the job and exits here (returns only when it does not requeue).
            sys.modules["lmlab.faults"].requeue(exc)
        if in_sweep and _preempted(exc):
            # The message of a run (resume=<its folder>) is wrong for a job: the sweep's command resumes.
            exc = sweep.preempted_in_sweep(exc, ctx)
        if in_sweep and _diverged(exc):
            # A diverged trial (a learning rate too high, say) is an outcome of the search, not a
            # broken sweep: Optuna records it as a failed trial and the sweep goes on.
            print(f"\nlmlab: this job diverged: {exc}", file=sys.stderr)
            return math.nan
        print(f"\nlmlab: error: {exc}", file=sys.stderr)
        if in_sweep:
            # Hydra marks the job FAILED and the sweeper decides (the grid stops with a summary,
            # Optuna records a failed trial); exiting here would take the whole sweep down with it.
            raise exc
        sys.exit(2)
    print(summary(result), flush=True)
    return result.objective


def _diverged(exc: Exception) -> bool:
    # By name in sys.modules: lmlab.train has imported lmlab.faults by the time a run can diverge.
    faults = sys.modules.get("lmlab.faults")
    return faults is not None and isinstance(exc, getattr(faults, "NonFiniteLoss", ()))


def _preempted(exc: Exception) -> bool:
    faults = sys.modules.get("lmlab.faults")
    return faults is not None and isinstance(exc, getattr(faults, "Preempted", ()))


def _run_hydra() -> None:
    """Hydra's main with a sweep's early end said in one line, after the sweep's parent run is closed."""
    import hydra

    from lmlab.paths import config_dir

    # Loaded by Hydra for a multirun (its callback); absent, no sweep was started.
    def sweep_parent() -> Any:
        return sys.modules.get("lmlab.sweep_parent")

    try:
        hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_job)()
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM on a sweep (lmlab.sweep_parent turns SIGTERM into this); a single run
        # handles its signals itself, so anything else is left as Python reports it.
        message = sweep_parent().stopped_message() if sweep_parent() is not None else None
        if message is None:
            raise
        _end_sweep(sweep_parent(), message)
    except SystemExit as exc:
        from lmlab.sweep import SweepStopped

        if isinstance(exc, SweepStopped):
            _end_sweep(sweep_parent(), exc.message)
        if exc.code == 1:  # Hydra refused the config (or reported a crash) itself
            from lmlab.config_keys import override_hints

            for hint in override_hints(sys.argv[1:]):
                print(hint, file=sys.stderr)
        raise


def _end_sweep(sweep_parent: Any, message: str) -> None:
    # The parent run is closed first (its log line would otherwise come last): the message ends the output.
    if sweep_parent is not None:
        sweep_parent.close_left_open()
    print(f"\nlmlab: error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    args = sys.argv[1:]
    # --help too: a plugin that breaks every run (a clashing name, a shadowing config) is said at once.
    try:
        from lmlab.plugin_configs import check_no_shadowing

        check_no_shadowing(_config_dir_arg(args))
        if "--help" in args or "-h" in args:
            print(help_text(_config_dir_arg(args)))
            return
    except LmlabError as exc:
        print(f"lmlab: error: {exc}", file=sys.stderr)
        sys.exit(2)

    register_experiments()
    sys.argv = [sys.argv[0], *_free_form(args)]
    _run_hydra()


if __name__ == "__main__":
    main()
