"""The entry-point registry and plugin configs, with real distributions written to a tmp dir."""

from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from conftest import compose_cfg

from lmlab import registry
from lmlab.errors import LmlabError
from lmlab.plugin_configs import check_no_shadowing, plugin_config_dirs
from lmlab.registry import RegistryError
from lmlab.specs import ModelSpec, TaskSpec


@pytest.fixture
def registry_cache():
    registry.clear_cache()
    yield
    registry.clear_cache()


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry_cache):
    """``install(dist, entry_points, files)`` writes an installed distribution onto sys.path:
    ``<dist>-0.1.dist-info`` with METADATA and entry_points.txt, plus the given module files."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def _install(dist: str, entry_points: dict[str, dict[str, str]], files: dict[str, str] | None = None) -> Path:
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        sections = [
            f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items())
            for group, eps in entry_points.items()
        ]
        (info / "entry_points.txt").write_text("\n".join(sections))
        for rel, text in (files or {}).items():
            path = site / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
            modules.append(Path(rel).parts[0].removesuffix(".py"))
        registry.clear_cache()
        return site

    yield _install
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]


TOY_TASK = """
from lmlab.specs import TaskSpec

TASK = TaskSpec(
    name="toy", head=lambda cfg: "causal_lm", build_module=lambda cfg, model, tok: None,
    packing=lambda cfg: "causal", description="a toy task from a plugin",
)
"""


def _declared(group: str) -> list[str]:
    """Names lmlab's own pyproject.toml declares in an entry-point group."""
    import tomllib

    from conftest import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return sorted(project["entry-points"][group])


BUILTIN_TASKS = _declared("lmlab.tasks")


def test_builtins(registry_cache):
    assert registry.names("task") == BUILTIN_TASKS
    assert {"clm", "mlm"} <= set(BUILTIN_TASKS)
    assert registry.names("model") == _declared("lmlab.models")
    assert {"bert", "gpt2"} <= set(registry.names("model"))
    assert registry.names("datamodule") == _declared("lmlab.datamodules")
    assert "text" in registry.names("datamodule")
    for kind, name in (("task", "clm"), ("task", "mlm")):
        spec = registry.get(kind, name)
        assert isinstance(spec, TaskSpec) and spec.name == name
    for name in ("gpt2", "bert"):
        spec = registry.get("model", name)
        assert isinstance(spec, ModelSpec) and spec.name == name
    from lmlab.data.text_datamodule import TextDataModule

    assert registry.get("datamodule", "text") is TextDataModule
    mlm = registry.get("task", "mlm")
    assert mlm.packing(OmegaConf.create({"task": {"nsp": True}})) == "sentence_pairs"
    assert mlm.head(OmegaConf.create({"task": {"nsp": False}})) == "masked_lm"


def test_unknown_name_lists_the_valid_ones(registry_cache):
    with pytest.raises(RegistryError) as info:
        registry.get("model", "gpt5")
    message = str(info.value)
    assert "gpt5" in message and "bert" in message and "gpt2" in message
    assert isinstance(info.value, LmlabError)


def test_a_plugin_adds_a_task(install):
    install("lmlab-toy-plugin", {"lmlab.tasks": {"toy": "lmlab_toy_plugin:TASK"}}, {"lmlab_toy_plugin.py": TOY_TASK})
    assert registry.names("task") == sorted([*BUILTIN_TASKS, "toy"])
    task = registry.get("task", "toy")
    assert isinstance(task, TaskSpec) and task.name == "toy" and task.packing(None) == "causal"


def test_duplicate_registration_across_distributions(install):
    install("lmlab-dup-plugin", {"lmlab.tasks": {"clm": "lmlab_dup_plugin:TASK"}}, {"lmlab_dup_plugin.py": TOY_TASK})
    with pytest.raises(RegistryError) as info:
        registry.names("task")
    message = str(info.value)
    assert "'clm'" in message and "lmlab.tasks" in message
    assert "lmlab_dup_plugin:TASK" in message and "lmlab.tasks.clm:TASK" in message
    assert "lmlab-dup-plugin 0.1" in message


def test_same_registration_seen_twice_is_not_a_clash(install):
    """One package visible twice (an editable checkout plus a wheel) registers the same value."""
    install("lmlab-shadow-copy", {"lmlab.tasks": {"clm": "lmlab.tasks.clm:TASK"}})
    assert registry.names("task") == BUILTIN_TASKS
    assert registry.get("task", "clm").name == "clm"


def test_broken_plugin_warns_and_the_rest_still_load(install):
    install(
        "lmlab-mixed-plugins",
        {"lmlab.tasks": {"toy": "lmlab_good_plugin:TASK", "broken": "lmlab_broken_plugin:TASK"}},
        {
            "lmlab_good_plugin.py": TOY_TASK,
            "lmlab_broken_plugin.py": "import lmlab_dependency_that_is_not_installed\nTASK = None\n",
        },
    )
    assert registry.names("task") == sorted([*BUILTIN_TASKS, "broken", "toy"])
    with pytest.warns(RuntimeWarning, match="broken") as record:
        loaded = registry.available("task")
    assert sorted(loaded) == sorted([*BUILTIN_TASKS, "toy"])
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "lmlab_broken_plugin:TASK" in messages[0] and "lmlab_dependency_that_is_not_installed" in messages[0]
    assert "lmlab-mixed-plugins 0.1" in messages[0]
    with pytest.raises(RegistryError, match="broken"):
        registry.get("task", "broken")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.get("task", "toy").name == "toy"
        assert registry.get("model", "gpt2").name == "gpt2"


def test_a_broken_plugin_says_why_every_time_it_is_asked_for(install):
    """The warning is said once per process; a later get() (a sweep's next job) still needs the cause."""
    install("lmlab-broken-again", {"lmlab.tasks": {"broken": "lmlab_broken_again:TASK"}},
            {"lmlab_broken_again.py": "import lmlab_dependency_that_is_not_installed\nTASK = None\n"})
    with pytest.warns(RuntimeWarning, match="lmlab_dependency_that_is_not_installed"):
        assert "broken" not in registry.available("task")
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing new is warned: the error itself holds the cause
            with pytest.raises(RegistryError) as info:
                registry.get("task", "broken")
        message = str(info.value)
        assert "task 'broken' (lmlab_broken_again:TASK, from lmlab-broken-again 0.1)" in message
        assert "ModuleNotFoundError: No module named 'lmlab_dependency_that_is_not_installed'" in message


WRONG_TYPES = """
from lmlab.models.gpt2 import MODEL as GPT2

TASK = {"name": "dicttask"}
MODEL = GPT2.config_class  # a class, not the ModelSpec describing it
DATAMODULE = 42
"""


def test_entry_points_of_the_wrong_type_are_named(install):
    install("lmlab-wrong-types", {"lmlab.tasks": {"dicttask": "lmlab_wrong_types:TASK"},
                                  "lmlab.models": {"classmodel": "lmlab_wrong_types:MODEL"},
                                  "lmlab.datamodules": {"number": "lmlab_wrong_types:DATAMODULE"}},
            {"lmlab_wrong_types.py": WRONG_TYPES})
    for kind, name, got, wanted in [("task", "dicttask", "dict", "lmlab.specs.TaskSpec"),
                                    ("model", "classmodel", "type", "lmlab.specs.ModelSpec"),
                                    ("datamodule", "number", "int", "datamodule class")]:
        with pytest.raises(RegistryError) as info:
            registry.get(kind, name)
        message = str(info.value)
        assert f"{kind} '{name}' (lmlab_wrong_types:" in message and "lmlab-wrong-types 0.1" in message
        assert f"is a {got}," in message and wanted in message
        # Listings (lmlab --help, compatible models) skip it with a warning instead of failing later.
        with pytest.warns(RuntimeWarning, match=name):
            assert name not in registry.available(kind)
    assert registry.get("model", "gpt2").name == "gpt2"


def test_plugin_config_may_not_shadow_core_files(install):
    install(
        "lmlab-shadowing-configs",
        {"lmlab.configs": {"shadowing": "lmlab_shadowing_configs"}},
        {"lmlab_shadowing_configs/__init__.py": "", "lmlab_shadowing_configs/task/clm.yaml": "name: clm\n"},
    )
    with pytest.raises(LmlabError) as info:
        check_no_shadowing()
    message = str(info.value)
    assert "task/clm.yaml" in message and "shadowing" in message and "lmlab_shadowing_configs" in message


HYDRA_OPTIONS = [  # a file of this path on Hydra's search path -> what it would replace or be hidden by
    # lmlab's Optuna sweeper stores its samplers in Hydra's ConfigStore: a plugin's tpe.yaml replaced TPE.
    ("hydra/sweeper/sampler/tpe.yaml", "the option hydra/sweeper/sampler/tpe that 'lmlab' stores in Hydra's ConfigStore"),
    ("hydra/launcher/basic.yaml", "the option hydra/launcher/basic that 'hydra' stores in Hydra's ConfigStore"),
    ("hydra/job_logging/default.yaml", "Hydra's own hydra/job_logging/default.yaml (pkg://hydra.conf)"),
]


@pytest.mark.parametrize(("rel", "owner"), HYDRA_OPTIONS)
def test_plugin_config_may_not_shadow_hydras_options(install, rel: str, owner: str):
    name = rel.split("/")[-2]
    install(f"lmlab-{name}-configs", {"lmlab.configs": {name: f"lmlab_{name}_configs"}},
            {f"lmlab_{name}_configs/__init__.py": "",
             f"lmlab_{name}_configs/{rel}": "_target_: optuna.samplers.RandomSampler\nseed: 999\n"})
    with pytest.raises(LmlabError) as info:
        check_no_shadowing()
    assert f"plugin '{name}' (lmlab_{name}_configs) ships '{rel}', which would shadow {owner}." in str(info.value)


@pytest.mark.parametrize(("rel", "owner"), HYDRA_OPTIONS)
def test_config_dir_may_not_shadow_hydras_options(tmp_path: Path, rel: str, owner: str):
    mine = tmp_path / "my_conf"
    (mine / rel).parent.mkdir(parents=True)
    (mine / rel).write_text("seed: 999\n")
    with pytest.raises(LmlabError) as info:
        check_no_shadowing(mine)
    assert f"--config-dir '{mine}' holds '{rel}', which would shadow {owner}." in str(info.value)
    (mine / rel).rename((mine / rel).with_name("my_options.yaml"))
    check_no_shadowing(mine)


def test_two_plugins_may_not_ship_the_same_file(install):
    for name in ("alpha", "beta"):
        install(
            f"lmlab-{name}-configs",
            {"lmlab.configs": {name: f"lmlab_{name}_configs"}},
            {f"lmlab_{name}_configs/__init__.py": "", f"lmlab_{name}_configs/task/toy.yaml": "name: toy\n"},
        )
    with pytest.raises(LmlabError, match="task/toy.yaml"):
        check_no_shadowing()


def test_missing_plugin_config_package_warns(install):
    install("lmlab-ghost-configs", {"lmlab.configs": {"ghost": "lmlab_ghost_configs_not_there"}})
    with pytest.warns(RuntimeWarning, match="ghost"):
        assert plugin_config_dirs() == {}


BROKEN_INIT = {  # a config package's __init__ -> what the warning must say
    "runtime": ("raise RuntimeError('no licence file')\n", "RuntimeError: no licence file"),
    "syntax": ("def oops(:\n", "SyntaxError"),
    "import": ("import lmlab_dependency_that_is_not_installed\n", "lmlab_dependency_that_is_not_installed"),
}


@pytest.mark.parametrize("nested", [False, True], ids=["package", "subpackage"])
@pytest.mark.parametrize("error", list(BROKEN_INIT))
def test_plugin_config_that_fails_to_import_is_one_warning(install, error: str, nested: bool):
    """Every command (--help included) still works, and the warning names the plugin once."""
    from lmlab.cli import help_text

    source, said = BROKEN_INIT[error]
    name = f"broken{error}{'nested' if nested else ''}"  # warnings are said once per process: one name per case
    top = f"lmlab_{name}_configs"
    package, folder = (f"{top}.conf", f"{top}/conf") if nested else (top, top)
    # The broken __init__ last: with no subpackage, top and folder are one.
    files = {f"{folder}/task/{name}.yaml": f"name: {name}\n", f"{folder}/__init__.py": "", f"{top}/__init__.py": source}
    install(f"lmlab-{name}-configs", {"lmlab.configs": {name: package}}, files)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_no_shadowing()
        assert name not in plugin_config_dirs()
        assert compose_cfg([]).task.name == "clm"  # Hydra's search path leaves it out too
        assert name not in help_text()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and name in str(w.message)]
    assert len(messages) == 1, messages
    assert f"'{name}' ({package}, from lmlab-{name}-configs 0.1) failed to import" in messages[0]
    assert said in messages[0]


def test_plugin_config_may_not_shadow_an_experiment_preset(install):
    install(
        "lmlab-preset-configs",
        {"lmlab.configs": {"preset": "lmlab_preset_configs"}},
        {"lmlab_preset_configs/__init__.py": "",
         "lmlab_preset_configs/experiment/debug.yaml": "# @package _global_\nseed: 7\n"},
    )
    with pytest.raises(LmlabError) as info:
        check_no_shadowing()
    message = str(info.value)
    assert "plugin 'preset'" in message and "'experiment/debug.yaml'" in message
    assert "experiments/debug.yaml (+experiment=debug)" in message and "experiment/preset_debug.yaml" in message


@pytest.mark.parametrize("form", ["-cd", "--config-dir="])
def test_config_dir_may_not_shadow_an_experiment_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture, form: str):
    from lmlab.cli import main

    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "debug.yaml").write_text("# @package _global_\nseed: 7\n")
    (mine / "my_own.yaml").write_text("# @package _global_\nseed: 8\n")
    args = ["-cd", str(mine.parent)] if form == "-cd" else [f"{form}{mine.parent}"]
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # main() sets it; restored after the test
    monkeypatch.setattr(sys, "argv", ["lmlab", *args, "--help"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "lmlab: error: --config-dir" in error and "'experiment/debug.yaml'" in error
    assert "experiments/debug.yaml (+experiment=debug)" in error and "my_own" not in error

    (mine / "debug.yaml").unlink()
    check_no_shadowing(mine.parent)  # a preset of its own name is what --config-dir is for


def test_config_dir_may_not_shadow_a_plugin_file(install, tmp_path: Path):
    # Hydra found the plugin's data/toy_data.yaml first and dropped the user's without a word.
    install(
        "lmlab-toydata-configs",
        {"lmlab.configs": {"toydata": "lmlab_toydata_configs"}},
        {"lmlab_toydata_configs/__init__.py": "", "lmlab_toydata_configs/data/toy_data.yaml": "batch_size: 4\n"},
    )
    mine = tmp_path / "my_conf" / "data"
    mine.mkdir(parents=True)
    (mine / "toy_data.yaml").write_text("batch_size: 8\n")
    with pytest.raises(LmlabError) as info:
        check_no_shadowing(mine.parent)
    assert "'data/toy_data.yaml', which would shadow the file of plugin 'toydata'" in str(info.value)
    (mine / "toy_data.yaml").rename(mine / "my_toy_data.yaml")
    check_no_shadowing(mine.parent)


def test_plugin_config_becomes_a_group_option(install):
    site = install(
        "lmlab-toy-configs",
        {"lmlab.configs": {"toy": "lmlab_toy_configs"}, "lmlab.tasks": {"toy": "lmlab_toy_task:TASK"}},
        {
            "lmlab_toy_configs/__init__.py": "",
            "lmlab_toy_configs/task/toy.yaml": "# A toy task from a plugin.\nname: toy\nwidth: 7\n",
            "lmlab_toy_task.py": TOY_TASK,
        },
    )
    check_no_shadowing()  # adds an option, shadows nothing
    assert plugin_config_dirs() == {"toy": ("lmlab_toy_configs", site / "lmlab_toy_configs")}
    cfg = compose_cfg(["task=toy"])
    assert cfg.task.name == "toy" and cfg.task.width == 7
    assert cfg.model.name == "gpt2"
    assert registry.get("task", cfg.task.name).name == "toy"
    # The core options are still there beside it.
    assert compose_cfg(["task=mlm"]).task.name == "mlm"


def test_without_the_plugin_the_option_is_unknown(registry_cache):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="toy"):
        compose_cfg(["task=toy"])
