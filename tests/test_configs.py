"""Command-line overrides (`--set section.field=value`) of config dataclasses."""
import dataclasses

import pytest

from jaxpoison.configs import ConfigError, apply_override


@dataclasses.dataclass(frozen=True)
class Inner:
    ratios: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()
    names: tuple = ()
    lr: float = 1e-3
    on: bool = False


@dataclasses.dataclass(frozen=True)
class Outer:
    grid: Inner = Inner()
    seeds: tuple = (0, 1)


def test_empty_tuple_field_takes_its_element_type_from_the_hint():
    cfg = apply_override(Outer(), "grid.ratios=0.5,0.25")
    assert cfg.grid.ratios == (0.5, 0.25) and all(isinstance(x, float) for x in cfg.grid.ratios)
    cfg = apply_override(Outer(), "grid.counts=12")
    assert cfg.grid.counts == (12,) and isinstance(cfg.grid.counts[0], int)
    assert apply_override(Outer(), "grid.names=a,b").grid.names == ("a", "b")      # bare tuple: strings
    assert apply_override(Outer(), "grid.ratios=(0.5,)").grid.ratios == (0.5,)    # literal form still works


def test_typed_values_and_clear_errors():
    assert apply_override(Outer(), "seeds=3,4,5").seeds == (3, 4, 5)
    assert apply_override(Outer(), "grid.lr=1").grid.lr == 1.0
    assert apply_override(Outer(), "grid.on=yes").grid.on is True
    with pytest.raises(ConfigError, match="grid.counts"):
        apply_override(Outer(), "grid.counts=x")
    with pytest.raises(ConfigError, match="unknown config field 'grid.nope'"):
        apply_override(Outer(), "grid.nope=1")
    with pytest.raises(ConfigError, match="not of the form"):
        apply_override(Outer(), "grid.lr")
