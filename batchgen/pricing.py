"""Cost estimates per job, in USD: built-in estimates, overridden by the manifest's ``prices``.

A price is per output image: either one number, or a mapping keyed by the value of the model's
resolution-like parameter (the first of :data:`TIER_PARAMS` the model takes), e.g.
``{1K: 0.15, 2K: 0.15, 4K: 0.30}``. When the job leaves that parameter out, the model's documented
default is used. When the model takes an image-count parameter (:data:`COUNT_PARAMS`), the price
is multiplied by it. ``None`` means unknown: no price, or no entry for this tier — it is never
guessed. Built-in figures are public prices of the same models elsewhere (spec/models/README.md),
labelled as estimates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .registry import ModelSpec

__all__ = ["BUILTIN_PRICES", "COUNT_PARAMS", "TIER_PARAMS", "estimate", "tier_param"]

#: model id → USD per output image (a number, or a mapping by resolution tier)
BUILTIN_PRICES: dict[str, float | dict[str, float]] = {
    "google/nano-banana/pro/text-to-image": {"1K": 0.15, "2K": 0.15, "4K": 0.30},
    # blackforestlabs/flux-2/max: priced per megapixel elsewhere, no verified figure → unknown
}

#: parameters that select a price tier, in order of preference
TIER_PARAMS = ("resolution", "image_size", "size", "quality")
#: parameters that ask for several images in one job
COUNT_PARAMS = ("num_images", "num_outputs", "batch_size")


def tier_param(params: Mapping[str, Any], spec: ModelSpec | None) -> str | None:
    """Name of the resolution-like parameter of this model (or of these params)."""
    known = spec.properties if spec is not None else {}
    for name in TIER_PARAMS:
        if name in params or name in known:
            return name
    return None


def _param(name: str, params: Mapping[str, Any], spec: ModelSpec | None) -> Any:
    if name in params:
        return params[name]
    if spec is not None:
        return spec.properties.get(name, {}).get("default")
    return None


def estimate(
    model_id: str,
    params: Mapping[str, Any],
    prices: Mapping[str, float | Mapping[str, float]] | None = None,
    spec: ModelSpec | None = None,
) -> float | None:
    """Estimated USD cost of one job, or None when unknown.

    :param prices: the manifest's overrides (a model there replaces its built-in price entirely)
    :param spec: the model's registry entry, for parameter defaults
    """
    table: float | Mapping[str, float] | None
    if prices is not None and model_id in prices:
        table = prices[model_id]
    else:
        table = BUILTIN_PRICES.get(model_id)
    if table is None:
        return None
    if isinstance(table, Mapping):
        name = tier_param(params, spec)
        if name is None:
            return None
        value = _param(name, params, spec)
        if value is None or str(value) not in table:
            return None
        unit = float(table[str(value)])
    else:
        unit = float(table)
    for name in COUNT_PARAMS:
        if name in params or (spec is not None and name in spec.properties):
            count = _param(name, params, spec)
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                unit *= count
            break
    return unit
