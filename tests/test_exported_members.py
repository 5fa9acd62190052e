"""The package's public names are exactly ``__all__``, sorted, and each one resolves."""

from __future__ import annotations

import batchgen


def test_all_is_sorted_and_complete() -> None:
    public = {name for name in vars(batchgen) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(batchgen, name)).__name__ == "module"}
    assert batchgen.__all__ == sorted(batchgen.__all__)
    assert set(batchgen.__all__) - {"__version__"} == public - modules


def test_every_name_resolves() -> None:
    for name in batchgen.__all__:
        assert getattr(batchgen, name) is not None, name
