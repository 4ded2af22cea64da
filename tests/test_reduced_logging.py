"""lmlab.reduced_logging silences Lightning's sync_dist advice for its own names only."""

from __future__ import annotations

import warnings

from lmlab.reduced_logging import _silence_sync_advice


def advice(name: str) -> str:
    # Lightning's wording (lightning/pytorch/trainer/connectors/logger_connector/result.py).
    return (f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)` when logging on epoch level "
            "in distributed setting to accumulate the metric across devices.")


def test_only_the_names_logged_as_reduced_lose_the_advice() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _silence_sync_advice("val/reduced_in_this_test")
        warnings.warn(advice("val/reduced_in_this_test"))
        warnings.warn(advice("val/plugin_metric"))  # a plugin's per-process value: the advice stands
        warnings.warn(advice("val/reduced_in_this_test_extra"))
    assert [str(w.message) for w in caught] == [advice("val/plugin_metric"), advice("val/reduced_in_this_test_extra")]
