"""What lmlab adds to Lightning's strategies: the rank before Lightning exists, FSDP wrap units, batch sizes.

Lightning runs the processes (DDP, FSDP, DeepSpeed; torchrun and SLURM launch them too); lmlab only
needs to know, before a Trainer exists, whether this process is the one that talks to MLflow.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError, config_error

WRAP_BLOCKS = "transformer_blocks"


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, read from the launcher's environment.

    torchrun sets RANK and SLURM sets SLURM_PROCID for every process; Lightning's own launcher
    starts the other local processes with LOCAL_RANK and NODE_RANK. A plain single process has none.
    A process with a non-zero local or node rank is never global rank 0, whatever else it inherited:
    in an interactive SLURM shell (``salloc``, ``srun --pty bash``) Lightning launches the processes
    itself and every one of them inherits the shell's SLURM_PROCID=0.
    """
    if int(os.environ.get("LOCAL_RANK") or 0) > 0 or int(os.environ.get("NODE_RANK") or 0) > 0:
        return False
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key]) == 0
    return True


def _torchrun_launch() -> bool:
    """Whether torchrun started this process as one of several workers."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID")) and int(os.environ.get("WORLD_SIZE") or 1) > 1


def launch_id() -> str | None:
    """What every process of one launch that starts all ranks at once shares, and no other launch
    does, read from the launcher's environment: for handing global rank 0's decisions to the other
    ranks before a process group exists. None in a plain process, under Lightning's own launcher
    (it starts the other ranks itself, after rank 0: they inherit its environment instead) and
    under launchers not named here.

    torchrun: the rendezvous id (a fresh uuid with ``--standalone``; ``--rdzv-id`` names the job
    otherwise), the master address and port, and the restart count (a restart starts every worker anew).
    srun: the SLURM job step and the job's restart count (a requeue runs the same step again).
    """
    env = os.environ
    if _torchrun_launch():
        return ":".join(("torchrun", env["TORCHELASTIC_RUN_ID"], env.get("MASTER_ADDR", ""),
                         env.get("MASTER_PORT", ""), env.get("TORCHELASTIC_RESTART_COUNT", "0")))
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") and int(env.get("SLURM_NTASKS") or 1) > 1:
        return ":".join(("srun", env["SLURM_JOB_ID"], env["SLURM_STEP_ID"], env.get("SLURM_RESTART_COUNT", "0")))
    return None


def launch_time(pattern: str = "%Y-%m-%d_%H-%M-%S-%f") -> str:
    """The time for a new run directory's name (``hydra.run.dir``): the same in every process of one
    torchrun or srun launch on this machine, the current time elsewhere.

    These launchers start every rank at once and each resolves ``hydra.run.dir`` on its own: with the
    current time each rank named its own directory, and the ranks but 0 left a stray run directory
    each (``.hydra/``, ``cli.log``). torchrun's local workers are children of one agent process,
    whose start time they share; srun's tasks share the job's start time (SLURM_JOB_START_TIME, on
    every node). Lightning's own launcher passes rank 0's ``hydra.run.dir`` to the other ranks itself.
    """
    started = _launch_started()
    return (started or dt.datetime.now()).strftime(pattern)


def torchrun_restart() -> int:
    """How often torchrun (``--max-restarts``) has started this launch's workers again after a
    failure; 0 on the first attempt and outside a multi-process torchrun launch."""
    env = os.environ
    if not _torchrun_launch():
        return 0
    count = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    return int(count) if count.isdigit() else 0


def on_one_node() -> bool:
    """Whether every process of this torchrun launch runs on this machine (one agent starts them all)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or 0) == int(os.environ.get("WORLD_SIZE") or 1)


def _launch_started() -> dt.datetime | None:
    """The launch's shared start. A second srun step of the job (same job start) adds its step number
    in microseconds, to name a new directory. A torchrun restart on one machine names the first
    attempt's directory, whose run it continues (``resume.restarted``); on several machines (each
    agent started at its own time) it adds the restart count, and the restart is a new run."""
    env = os.environ
    if _torchrun_launch():
        started = _process_started(os.getppid())
        offset = 0 if on_one_node() else torchrun_restart()
        return started + dt.timedelta(microseconds=offset) if started else None
    if env.get("SLURM_STEP_ID", "").isdigit() and int(env.get("SLURM_NTASKS") or 1) > 1 and \
            env.get("SLURM_JOB_START_TIME", "").isdigit():
        return (dt.datetime.fromtimestamp(int(env["SLURM_JOB_START_TIME"]))
                + dt.timedelta(microseconds=int(env["SLURM_STEP_ID"])))
    return None


def _process_started(pid: int) -> dt.datetime | None:
    """When process ``pid`` started (Linux /proc, to the clock tick); None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = int(fields[19])  # field 22 of stat(5), counted after the command's closing parenthesis
        return dt.datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def block_classes(model: torch.nn.Module) -> set[type]:
    """The classes of the model's layer lists (GPT2Block, BertLayer, T5Block ...).

    A Hugging Face model names its blocks in ``_no_split_modules``: those found in its layer lists
    count even when a list holds one layer (``model.config.n_layer=1``). A model without the
    attribute counts the classes repeated in its layer lists.
    """
    declared = set(getattr(model, "_no_split_modules", None) or ())
    found: set[type] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            kind = next(iter(kinds))
            named = kind.__name__ in declared
            if len(kinds) == 1 and (named or (not declared and len(module) > 1)) \
                    and any(p.requires_grad for p in module[0].parameters()):
                found |= kinds
    return found


def build_strategy(value: Any, model: torch.nn.Module | None) -> Any:
    """``trainer.strategy``: a name Lightning knows, or a ``_target_`` node instantiated here."""
    if not isinstance(value, dict) or "_target_" not in value:
        return value
    options = {k: v for k, v in value.items() if k != "_target_"}
    for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
        if options.get(key) == WRAP_BLOCKS:
            blocks = block_classes(model) if model is not None else set()
            if not blocks:
                raise config_error(f"trainer.strategy.{key}", "found no repeated transformer blocks in the model",
                                   "Set it to null, or to a list of module classes.")
            options[key] = blocks
    if isinstance(options.get("device_mesh"), list):
        # FSDP's (replicas, shard size) for HYBRID_SHARD: Lightning builds the mesh from a tuple only,
        # and the YAML (+trainer.strategy.device_mesh=[2,8]: the preset has no such key) gives a list.
        options["device_mesh"] = tuple(options["device_mesh"])
    strategy_class = _strategy_class(str(value["_target_"]))
    try:
        return strategy_class(**_current_ddp_names(strategy_class, options))
    except Exception as exc:
        hint = DEEPSPEED_INSTALL if "deepspeed" in str(exc).lower() else "Check the trainer.strategy.* keys."
        raise LmlabError(f"config key 'trainer.strategy': {strategy_class.__name__} rejected the options "
                         f"({exc}). {hint}") from exc


def gathered_state_dict(strategy: Any) -> dict[str, Any]:
    """The LightningModule's full weights, for the export; every process must call it (a collective).

    Lightning's ``lightning_module_state_dict`` gathers FSDP's shards on rank 0 only when the strategy
    checkpoints full state dicts; with ``trainer.strategy.state_dict_type=sharded`` (sharded
    checkpoints) it returns each process's shard, so here the strategy gathers as "full" for once.
    DeepSpeed's ZeRO stage 3 partitions the parameters too, and Lightning's DeepSpeedStrategy returns
    the partitions: see :func:`_zero3_state_dict`.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        return _zero3_state_dict(strategy.lightning_module, strategy.is_global_zero)
    if isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") != "full":
        kept = strategy._state_dict_type
        strategy._state_dict_type = "full"
        try:
            return strategy.lightning_module_state_dict()
        finally:
            strategy._state_dict_type = kept
    return strategy.lightning_module_state_dict()


def _zero3_state_dict(module: torch.nn.Module, rank_zero: bool) -> dict[str, Any]:
    """``module.state_dict()`` of a ZeRO-3 model with whole tensors, on CPU on rank 0 ({} elsewhere).

    One module's own parameters are gathered at a time (DeepSpeed's ``GatheredParameters``, on every
    process), so no process ever holds more than one layer beyond its partition.
    """
    import deepspeed

    keys = set(module.state_dict())  # the names, with partitioned (empty) parameters
    full: dict[str, Any] = {}
    for prefix, child in module.named_modules():
        params = list(child.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            if not rank_zero:
                continue
            for name, tensor in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                key = f"{prefix}.{name}" if prefix else name
                if key in keys and key not in full:
                    full[key] = tensor.detach().cpu().clone()
    return full


def _current_ddp_names(strategy_class: type, options: dict[str, Any]) -> dict[str, Any]:
    """DDP's ``broadcast_buffers`` (the presets' spelling, which every torch 2.x knows) under the name
    torch >= 2.13 wants, ``forward_sync_buffers``; the old name warns on every process there."""
    from lightning.pytorch.strategies import DDPStrategy

    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    if (issubclass(strategy_class, DDPStrategy) and "broadcast_buffers" in options
            and "forward_sync_buffers" in parameters and "forward_sync_buffers" not in options):
        options = dict(options)
        options["forward_sync_buffers"] = options.pop("broadcast_buffers")
    return options


DEEPSPEED_INSTALL = 'Install it: pip install "lmlab[deepspeed]" (needs a CUDA toolkit).'


def check_strategy(trainer_cfg: dict[str, Any]) -> None:
    """What ``build_strategy`` and Lightning's launcher would refuse, said before any data or MLflow work
    (``build_strategy`` runs with the model in hand, after both): a ``_target_`` that cannot be imported,
    DeepSpeed's strategy without the deepspeed package, and devices or nodes the launcher did not start
    (``check_launch``)."""
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, dict) and "_target_" in strategy:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy_class = _strategy_class(str(strategy["_target_"]))
        if issubclass(strategy_class, DeepSpeedStrategy) and importlib.util.find_spec("deepspeed") is None:
            raise config_error("trainer.strategy", "DeepSpeedStrategy needs the deepspeed package, which is not "
                               "installed", DEEPSPEED_INSTALL)
    check_launch(trainer_cfg)


def _strategy_class(target: str) -> type:
    """The class ``trainer.strategy._target_`` names, or an error naming that key."""
    from hydra.utils import get_class

    try:
        return get_class(target)
    except Exception as exc:
        raise config_error("trainer.strategy._target_", f"cannot import '{target}' ({exc})",
                           "Use a Lightning strategy class, e.g. lightning.pytorch.strategies.DDPStrategy.") from exc


def check_launch(trainer_cfg: dict[str, Any]) -> None:
    """``trainer.devices`` and ``trainer.num_nodes`` against what SLURM or torchrun launched, before any
    data or MLflow work.

    Lightning checks the same (its cluster environment's ``validate_settings``) only inside
    ``Trainer.fit``, when its launcher starts: after the data was tokenized and an MLflow run opened
    and left FAILED, with a traceback that names no config key. Its own check is the one run here, so
    the two cannot disagree; only multi-process strategies are checked, as Lightning does.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    count, nodes = _device_count(trainer_cfg), int(trainer_cfg.get("num_nodes") or 1)
    strategy = trainer_cfg.get("strategy")
    name = str(strategy.get("_target_", "")) if isinstance(strategy, dict) else str(strategy or "auto")
    if count * nodes == 1 and not any(kind in name.lower() for kind in ("ddp", "fsdp", "deepspeed")):
        return
    # Lightning's order: torchrun first, which can run inside a SLURM job (its SLURM_* then describe the job).
    for environment, launcher in ((TorchElasticEnvironment, "torchrun"), (SLURMEnvironment, "SLURM")):
        if not environment.detect():
            continue
        try:
            environment().validate_settings(num_devices=count, num_nodes=nodes)
        except ValueError as exc:
            key = "trainer.num_nodes" if str(exc).startswith("You set `num_nodes=") else "trainer.devices"
            flags = "--ntasks-per-node and --nodes" if launcher == "SLURM" else "--nproc-per-node and --nnodes"
            raise config_error(key, f"{launcher} started this job with another number of processes ({exc})",
                               f"Set trainer.devices and trainer.num_nodes to what {launcher}'s {flags} say.") from exc
        return


def _device_count(trainer_cfg: dict[str, Any]) -> int:
    """How many processes per node ``trainer.devices`` asks for, in any of Lightning's spellings."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and "," in devices:  # Lightning's "0,1": these GPU indices
        devices = [part for part in devices.split(",") if part.strip()]
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif devices in (-1, "-1", "auto"):
        accelerator = str(trainer_cfg.get("accelerator") or "auto")
        gpus = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        count = max(1, torch.cuda.device_count()) if gpus else 1
    else:
        count = int(devices)
    return count


def effective_batch(trainer_cfg: dict[str, Any], batch_size: int) -> dict[str, int]:
    """Examples per optimizer step over all processes: what makes runs on N devices comparable."""
    count = _device_count(trainer_cfg)
    nodes = int(trainer_cfg.get("num_nodes") or 1)
    accumulate = int(trainer_cfg.get("accumulate_grad_batches") or 1)
    return {"world_size": count * nodes, "per_device_batch_size": batch_size,
            "effective_batch_size": batch_size * count * nodes * accumulate}
