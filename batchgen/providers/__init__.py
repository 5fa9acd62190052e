"""Providers: the remote APIs batchgen can drive, by name.

``get_provider(name, **options)`` builds one. Built-ins are registered with the same
:func:`register` a plugin would call:

- ``runcomfy``: the RunComfy Model API (:class:`~batchgen.providers.runcomfy.RunComfyProvider`);
  options ``base_url``, ``token``, ``timeout``, ``max_connections``, ``include_cost``.
- ``simulator``: starts the embedded simulator on a free loopback port and talks to it through
  the very same RunComfy code (:mod:`batchgen.providers.simulator`); options ``simulator`` (the
  manifest's ``simulator:`` settings), ``subprocess``, ``timeout``, ``max_connections``.

Every built-in factory accepts ``max_connections``, ``timeout`` and ``simulator`` (ignored by
``runcomfy``), so a runner can pass the same options whatever the manifest's provider is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ManifestError
from .base import CancelOutcome, Provider, RemoteResult, RemoteStatus, Submission
from .runcomfy import RunComfyProvider
from .simulator import start_simulator_provider

#: a callable building a provider from keyword options
ProviderFactory = Callable[..., Provider]

_FACTORIES: dict[str, ProviderFactory] = {}


def register(name: str, factory: ProviderFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available as ``get_provider(name)``."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"provider names are letters, digits, '-' and '_', got {name!r}")
    if name in _FACTORIES and not replace:
        raise ValueError(f"provider {name!r} is already registered (pass replace=True)")
    _FACTORIES[name] = factory


def get_provider(name: str, **options: Any) -> Provider:
    """Build the provider registered as ``name`` with ``options``."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        known = ", ".join(sorted(_FACTORIES))
        raise ManifestError.at(
            "manifest", None, "provider", f"unknown provider {name!r} (known: {known})"
        ) from None
    return factory(**options)


def provider_names() -> list[str]:
    """Names of every registered provider, sorted."""
    return sorted(_FACTORIES)


def _runcomfy(*, simulator: object = None, **options: Any) -> Provider:
    # ``simulator`` settings only matter to the simulator provider; accepted so callers need
    # not know which provider a manifest names
    del simulator
    return RunComfyProvider(**options)


register("runcomfy", _runcomfy)
register("simulator", start_simulator_provider)

__all__ = [
    "CancelOutcome",
    "Provider",
    "ProviderFactory",
    "RemoteResult",
    "RemoteStatus",
    "RunComfyProvider",
    "Submission",
    "get_provider",
    "provider_names",
    "register",
]
