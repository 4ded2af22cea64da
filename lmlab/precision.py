"""``trainer.precision`` in Lightning's own words: the one place lmlab reads what precision a run uses.

Lightning takes the short aliases ``16``, ``"16"``, ``"bf16"``, ``32``, ``"32"``, ``64`` and ``"64"``
for ``"16-mixed"``, ``"bf16-mixed"``, ``"32-true"`` and ``"64-true"`` (and warns about the mixed
ones), so lmlab compares its choices (lmlab/clipping.py, lmlab/flops.py) against the full names.
"""

from __future__ import annotations

from typing import Any

# Lightning's _PRECISION_INPUT_STR_ALIAS_CONVERSION (lightning.fabric.plugins.precision.precision);
# the integers are the same keys, as Hydra reads `trainer.precision=16`.
ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


def precision_name(value: Any) -> Any:
    """The full name of a ``trainer.precision`` alias (``bf16`` -> ``bf16-mixed``, ``16`` -> ``16-mixed``).

    Full names and None come back unchanged, and so do values Lightning does not know: its own
    error names them as they were written.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return value
    return ALIASES.get(str(value), value)
