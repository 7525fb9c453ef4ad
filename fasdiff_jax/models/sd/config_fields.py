"""Typed readers of diffusers ``config.json`` fields, shared by the UNet, VAE and ControlNet.

A hand-edited or corrupt config (``null``, ``0``, a string ``"false"``) must fail here naming
the field, not deep inside flax or as ``bool("false")``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from fasdiff_jax.errors import UnsupportedConfigError


def invalid_field(field: str, value: Any, why: str, owner: str = "") -> UnsupportedConfigError:
    """The error for a config value of the wrong type or range, naming field and value."""
    return UnsupportedConfigError(f"{owner}config field {field}={value!r} is invalid: {why}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not 1 channel


def config_int(cfg: Mapping[str, Any], field: str, default: int, minimum: int = 1,
               owner: str = "") -> int:
    """An integer field >= ``minimum`` (bools and floats rejected)."""
    v = cfg.get(field, default)
    if not _is_int(v) or v < minimum:
        raise invalid_field(field, v, f"need an integer >= {minimum}", owner)
    return v


def config_ints(cfg: Mapping[str, Any], field: str, default: Any, n: int, minimum: int = 1,
                owner: str = "") -> tuple[int, ...]:
    """A per-block field: one integer for all ``n`` blocks or a list of ``n`` integers."""
    v = cfg.get(field, default)
    values = (v,) * n if _is_int(v) else v
    if (not isinstance(values, (list, tuple)) or len(values) != n
            or not all(_is_int(x) and x >= minimum for x in values)):
        raise invalid_field(field, v, f"need an integer >= {minimum} or a list of {n} "
                            f"(one per block)", owner)
    return tuple(values)


def config_channels(cfg: Mapping[str, Any], field: str, default: Sequence[int],
                    owner: str = "") -> tuple[int, ...]:
    """A non-empty list of positive channel counts (``block_out_channels``)."""
    v = cfg.get(field, default)
    if (not isinstance(v, (list, tuple)) or not v
            or not all(_is_int(c) and c > 0 for c in v)):
        raise invalid_field(field, v, "need a non-empty list of positive integers", owner)
    return tuple(v)


def config_flag(cfg: Mapping[str, Any], field: str, default: bool, owner: str = "") -> bool:
    """A JSON boolean; ``null`` is False as in diffusers (``if flag:``), a string is an error
    (``bool("false")`` is True)."""
    v = cfg.get(field, default)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise invalid_field(field, v, "need true or false", owner)
    return v


def config_float(cfg: Mapping[str, Any], field: str, default: Any, positive: bool = False,
                 owner: str = "", allow_none: bool = False) -> Optional[float]:
    """A finite JSON number (``positive``: > 0); ``null`` only where ``allow_none``."""
    v = cfg.get(field, default)
    if v is None and allow_none:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (positive and v <= 0):
        raise invalid_field(field, v, f"need a finite{' positive' if positive else ''} number",
                            owner)
    return float(v)


def check_groups(groups: int, channels: Sequence[int], field: str = "norm_num_groups",
                 owner: str = "") -> None:
    """GroupNorm needs ``groups`` to divide every block's channels; say so before flax does
    (its message names neither the field nor the block)."""
    for i, c in enumerate(channels):
        if c % groups:
            raise invalid_field(field, groups, f"block {i} has {c} channels (block_out_channels"
                                f" {list(channels)}), not divisible into {groups} groups", owner)
