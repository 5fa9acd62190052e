"""The model registry: which models batchgen knows, with their input schemas.

The two seed models ship inside the package (``batchgen/data/models/*.json``, the shape of
``shared/spec/models``); users add more by naming a folder of files of the same shape
(``--models-dir`` or ``BATCHGEN_MODELS_DIR``). A model the registry does not know can still be
submitted as written: the planner warns instead of validating.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ManifestError

MODELS_DIR_ENV = "BATCHGEN_MODELS_DIR"


@dataclass(frozen=True)
class ModelSpec:
    """One model: its id, the JSON Schema of its request body and the shape of its output."""

    model_id: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] = field(default_factory=dict)
    source: str = "built-in"

    @property
    def properties(self) -> dict[str, dict[str, Any]]:
        """Input parameters by name, as the schema gives them."""
        props: dict[str, dict[str, Any]] = self.input_schema.get("properties", {})
        return props

    @property
    def required(self) -> list[str]:
        """Names of the parameters the model requires."""
        return list(self.input_schema.get("required", []))

    @property
    def defaults(self) -> dict[str, Any]:
        """Documented default of every parameter that has one (except the placeholder prompt)."""
        return {
            name: prop["default"]
            for name, prop in self.properties.items()
            if "default" in prop and name != "prompt"
        }

    @property
    def takes_seed(self) -> bool:
        """Whether the model accepts a ``seed`` parameter."""
        return "seed" in self.properties


def _load_file(path: Path, source: str) -> ModelSpec:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ModelSpec(
            model_id=str(data["model_id"]),
            input_schema=dict(data["input"]),
            output_schema=dict(data.get("output", {})),
            source=source,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError.at(path, None, "model_id", f"not a model definition: {exc}") from exc


class ModelRegistry:
    """Models by id: the built-in ones plus any loaded from folders."""

    def __init__(self, models: dict[str, ModelSpec] | None = None) -> None:
        self._models: dict[str, ModelSpec] = dict(models or {})

    @classmethod
    def default(cls, extra_dirs: list[Path] | None = None) -> ModelRegistry:
        """The built-in models, then ``BATCHGEN_MODELS_DIR`` and ``extra_dirs`` (later ones win)."""
        registry = cls()
        folder = resources.files("batchgen") / "data" / "models"
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".json"):
                with resources.as_file(entry) as path:
                    registry.register(_load_file(path, "built-in"))
        dirs = [Path(p) for p in os.environ.get(MODELS_DIR_ENV, "").split(os.pathsep) if p]
        for directory in dirs + list(extra_dirs or []):
            registry.load_dir(directory)
        return registry

    def load_dir(self, directory: Path) -> None:
        """Add every ``*.json`` model definition in ``directory``."""
        if not directory.is_dir():
            raise ManifestError.at(directory, None, "models", "models folder does not exist")
        for path in sorted(directory.glob("*.json")):
            self.register(_load_file(path, str(path)))

    def register(self, spec: ModelSpec) -> None:
        """Add or replace one model."""
        self._models[spec.model_id] = spec

    def get(self, model_id: str) -> ModelSpec | None:
        """The model with this id, or None when the registry does not know it."""
        return self._models.get(model_id)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(sorted(self._models.values(), key=lambda m: m.model_id))

    def __len__(self) -> int:
        return len(self._models)
