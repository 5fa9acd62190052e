"""batchgen commands: planning (filled in by its owner)."""

from __future__ import annotations
