"""Shared test setup: every test runs with a clean environment and its own state folder."""

from __future__ import annotations

from pathlib import Path

import pytest

#: ../shared beside the project, as CI has it; tests that need it skip when it is absent
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the user's token, base URL, state folder or extra models."""
    for name in (
        "RUNCOMFY_API_TOKEN",
        "RUNCOMFY_BASE_URL",
        "BATCHGEN_MODELS_DIR",
        "BATCHGEN_RAISE_ERRORS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BATCHGEN_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def shared_dir() -> Path:
    """The ../shared folder, or skip the test with the reason."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the project (a fresh clone): this test reads its data")
    return SHARED
