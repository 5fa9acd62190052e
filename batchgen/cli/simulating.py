"""batchgen commands: simulating (filled in by its owner)."""

from __future__ import annotations
