"""Hydra sweep syntax -> Optuna distributions, and a trial's values -> Hydra overrides.

    choice(a, b, c) or a,b,c        categorical
    range(1, 10, 2)                 integers 1, 3, ..., 9 (floats when an end or the step is one)
    interval(1e-5, 1e-3)            uniform float (Hydra reads an interval's ends as floats, so
                                    interval(1, 8) is one too; int(interval(1, 8)) for integers)
    tag(log, interval(1e-5, 1e-3))  log-uniform
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (ChoiceSweep, IntervalSweep, Override, Quote, QuotedString, RangeSweep,
                                             Transformer)
from hydra.errors import HydraException
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

PRIMITIVE = (str, int, float, bool, type(None))


@dataclass
class SearchSpace:
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    # parameter name -> the key as the override writes it ("+model.dropout" keeps its "+")
    keys: dict[str, str] = field(default_factory=dict)
    # overrides every trial gets unchanged ("key=value"), in command-line order
    fixed: dict[str, str] = field(default_factory=dict)

    def overrides(self, values: dict[str, Any]) -> list[str]:
        # A resumed study's best trial may hold a key this session no longer searches: as Optuna named it.
        searched = [f"{self.keys.get(name, name)}={value_str(value)}" for name, value in values.items()]
        return [*self.fixed.values(), *searched]

    def grid(self) -> dict[str, list[Any]]:
        """Every value of each parameter, for Optuna's GridSampler."""
        return {name: grid_values(name, dist) for name, dist in self.distributions.items()}


def value_str(value: Any) -> str:
    """``value`` as an override's value that Hydra reads back as the same value and type.

    A choice of quoted strings ('16', 'true', 'null') left bare would reach the job as a number, a
    boolean or null, and a quote inside one would not parse; such a string keeps its quotes.
    """
    bare = Transformer.str(value)
    if not isinstance(value, str):
        return bare
    try:
        same = OverridesParser.create().parse_override(f"key={bare}").value() == value
    except HydraException:
        same = False
    return bare if same else QuotedString(text=value, quote=Quote.single).with_quotes()


def parse(arguments: list[str]) -> SearchSpace:
    """``hydra.sweeper.params`` first, then the command line: a later value for a key wins."""
    space = SearchSpace()
    for override in OverridesParser.create().parse_overrides(arguments):
        name = override.key_or_group
        if override.is_sweep_override():
            space.distributions[name] = distribution(override)
            space.keys[name] = override.get_key_element()
            space.fixed.pop(name, None)
        else:
            space.fixed[name] = f"{override.get_key_element()}={override.get_value_element_as_str()}"
            space.distributions.pop(name, None)
            space.keys.pop(name, None)
    return space


def _plain(value: Any, where: Override) -> Any:
    if isinstance(value, QuotedString):
        return value.text
    if not isinstance(value, PRIMITIVE):
        raise HydraException(f"{where.input_line}: Optuna chooses among strings, numbers, booleans and null only")
    return value


def distribution(override: Override) -> BaseDistribution:
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution([_plain(v, override) for v in sweep.list])
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if sweep.shuffle:
            return CategoricalDistribution(list(sweep.range()))
        if all(isinstance(v, int) for v in (start, stop, step)):
            values = list(range(start, stop, step))
            if not values or step < 0:
                raise HydraException(f"{override.input_line}: the range must hold values and count upwards")
            return IntDistribution(values[0], values[-1], step=step)
        values = [float(v) for v in sweep.range()]
        if not values or step < 0:
            raise HydraException(f"{override.input_line}: the range must hold values and count upwards")
        return FloatDistribution(values[0], values[-1], step=float(step))
    if isinstance(sweep, IntervalSweep):
        log = "log" in sweep.tags
        try:
            if isinstance(sweep.start, int) and isinstance(sweep.end, int):
                return IntDistribution(sweep.start, sweep.end, log=log)
            return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
        except ValueError as exc:  # Optuna's own words, without the override they came from
            raise HydraException(f"{override.input_line}: {exc} (an interval runs from its low end to its "
                                 "high end; a log one needs a low end above 0)") from exc
    raise HydraException(f"{override.input_line}: not a sweep Optuna can search (use choice, range or interval)")


def grid_values(name: str, dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        count = int(math.floor((dist.high - dist.low) / dist.step + 1e-9)) + 1
        return [dist.low + i * dist.step for i in range(count)]
    raise HydraException(f"sampler=grid needs a finite set of values for '{name}': use choice(...) or range(...)")


def representative(space: SearchSpace) -> dict[str, Any]:
    """A value of every parameter without a trial (the low end, the first choice): to compose a job."""
    return {name: dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low
            for name, dist in space.distributions.items()}


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Ask ``trial`` for a value of every parameter (public Trial API only)."""
    values: dict[str, Any] = {}
    for name, dist in space.distributions.items():
        if isinstance(dist, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, IntDistribution):
            values[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            values[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return values
