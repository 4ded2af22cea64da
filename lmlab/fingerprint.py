"""Content fingerprints that key lmlab's caches (tokenizers and tokenized data)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any


def of_texts(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def of_params(**params: Any) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
