"""Cost estimates: built-in prices, manifest overrides, tiers, defaults, image counts."""

from __future__ import annotations

from batchgen.pricing import BUILTIN_PRICES, estimate, tier_param
from batchgen.registry import ModelRegistry, ModelSpec

NANO = "google/nano-banana/pro/text-to-image"
FLUX = "blackforestlabs/flux-2/max/text-to-image"
REGISTRY = ModelRegistry.default()


def test_builtin_nano_banana_tiers_and_default() -> None:
    spec = REGISTRY.get(NANO)
    assert estimate(NANO, {"resolution": "1K"}, None, spec) == 0.15
    assert estimate(NANO, {"resolution": "2K"}, None, spec) == 0.15
    assert estimate(NANO, {"resolution": "4K"}, None, spec) == 0.30
    assert estimate(NANO, {"prompt": "x"}, None, spec) == 0.15  # the model's default, 1K


def test_flux_has_no_builtin_price() -> None:
    assert FLUX not in BUILTIN_PRICES
    assert estimate(FLUX, {"image_size": "square_hd"}, None, REGISTRY.get(FLUX)) is None
    assert estimate("acme/unknown", {}, None, None) is None


def test_manifest_prices_override_with_a_number_or_a_tier_mapping() -> None:
    spec = REGISTRY.get(FLUX)
    assert estimate(FLUX, {}, {FLUX: 0.07}, spec) == 0.07
    tiers = {FLUX: {"square_hd": 0.08, "square": 0.02}}
    assert estimate(FLUX, {"image_size": "square"}, tiers, spec) == 0.02
    # landscape_4_3 is the model's default image_size and has no entry: unknown, never guessed
    assert estimate(FLUX, {}, tiers, spec) is None
    assert estimate(NANO, {"resolution": "4K"}, {NANO: 1.0}, REGISTRY.get(NANO)) == 1.0


def test_price_multiplies_by_the_number_of_images() -> None:
    spec = ModelSpec(
        "acme/multi",
        {
            "properties": {
                "prompt": {"type": "string"},
                "size": {"enum": ["s", "l"], "default": "s"},
                "num_images": {"type": "integer", "default": 2},
            }
        },
    )
    prices = {"acme/multi": {"s": 0.01, "l": 0.04}}
    assert estimate("acme/multi", {"size": "l", "num_images": 3}, prices, spec) == 0.12
    assert estimate("acme/multi", {}, prices, spec) == 0.02  # default size s, default 2 images
    assert tier_param({}, spec) == "size"
