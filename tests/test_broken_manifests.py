"""R2: every broken manifest gives exit code 2 and one message naming file, line and key.

Each ``tests/broken/*.yaml`` starts with ``# expect: line N key K`` (``key -`` when the problem has
no key, e.g. a document that is not a mapping); the test asserts exactly that location. A
hypothesis fuzzer mutates a valid manifest at random: every outcome is exit 0 or exit 2 with a
located message, never another exit code or a traceback.
"""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from batchgen.cli import cli

BROKEN = Path(__file__).parent / "broken"
FILES = sorted(BROKEN.glob("*.yaml"))
EXPECT = re.compile(r"^# expect: line (\d+) key (\S+)$")


def test_there_are_enough_broken_manifests() -> None:
    assert len(FILES) >= 35


def _validate(path: Path) -> Any:
    return CliRunner().invoke(cli, ["validate", str(path)])


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_broken_manifest_is_refused_with_its_location(path: Path) -> None:
    header = path.read_text(encoding="utf-8").splitlines()[0]
    match = EXPECT.match(header)
    assert match, f"{path.name} lacks its '# expect: line N key K' header"
    line, key = int(match.group(1)), match.group(2)

    result = _validate(path)

    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [row for row in result.stderr.splitlines() if row.strip()]
    assert len(errors) == 1, result.stderr
    prefix = f"Error: {path}:{line}: "
    assert errors[0].startswith(prefix), (errors[0], prefix)
    if key != "-":
        assert errors[0].startswith(f"{prefix}{key}: "), (errors[0], key)
    assert result.stdout == ""


# --------------------------------------------------------------------------- fuzzing

VALID: dict[str, Any] = {
    "name": "fuzz",
    "provider": "simulator",
    "limits": {"max_in_flight": 4, "job_timeout": "5m", "max_jobs": 1000},
    "budget": {"max_usd": 10},
    "prices": {"google/nano-banana/pro/text-to-image": {"1K": 0.15, "2K": 0.15}},
    "defaults": {"output_format": "png"},
    "simulator": {"latency": "0.1-0.2s", "faults": {"http_5xx": 0.1, "retry_after": "2s"}},
    "download": {"max_bytes": 1000000},
    "sweeps": [
        {
            "name": "a",
            "model": "google/nano-banana/pro/text-to-image",
            "prompts": ["a {red|blue} fox", "an owl"],
            "grid": {"aspect_ratio": ["1:1", "16:9"], "resolution": ["1K", "2K"]},
            "exclude": [{"aspect_ratio": "1:1", "resolution": "2K"}],
            "repeat": 2,
        },
        {
            "model": "blackforestlabs/flux-2/max/text-to-image",
            "prompts": ["a fox"],
            "grid": {"seed": {"range": [1, 4]}, "image_size": ["square", "square_hd"]},
        },
    ],
}

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1K", "3K", "16:9", "30m", "-1", "{a|b}", "__x__", "", "nan"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_paths(value, (*prefix, index)))
    return found


@st.composite
def mutated_manifests(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = data
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        action = draw(st.sampled_from(["replace", "delete", "rename", "add"]))
        if action == "replace":
            parent[last] = draw(VALUES)
        elif action == "delete":
            del parent[last]
        elif action == "rename" and isinstance(parent, dict):
            parent[last + "x" if isinstance(last, str) else "x"] = parent.pop(last)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
        elif action == "add" and isinstance(parent, list):
            parent.append(draw(VALUES))
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_manifests())
def test_fuzzed_manifests_exit_0_or_2_with_a_location(data: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        result = _validate(path)
    event(f"exit code {result.exit_code}")
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 2), (result.output, result.exception)
    if result.exit_code == 2:
        assert re.match(rf"Error: {re.escape(str(path))}:\d+: ", result.stderr), result.stderr


def test_the_unmutated_fuzz_base_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(VALID), encoding="utf-8")
    result = _validate(path)
    assert result.exit_code == 0, result.output
