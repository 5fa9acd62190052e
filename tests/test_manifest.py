"""Manifest loading: every key of spec/manifest.md, defaults, YAML rules, paths, lines, errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from batchgen.errors import ManifestError
from batchgen.manifest import Manifest, PromptFile, PromptText, load_manifest
from batchgen.plan import validate
from batchgen.registry import ModelRegistry

NANO = "google/nano-banana/pro/text-to-image"
FLUX = "blackforestlabs/flux-2/max/text-to-image"
EXAMPLES = Path(__file__).resolve().parents[1] / "manifests"


def write(folder: Path, text: str, name: str = "m.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return info.value


FULL = f"""\
version: 1
name: landscapes
provider: runcomfy
output: out/landscapes
state: state/landscapes.db
strict: true
limits:
  submits_per_minute: 60
  requests_per_second: 10
  max_in_flight: 8
  max_attempts: 5
  job_timeout: 30m
  on_ambiguous_submit: retry
  max_jobs: 5000
  poll_interval: 1500ms
budget:
  max_usd: 25
prices:
  {NANO}: {{1K: 0.15, 2K: 0.15, 4K: 0.30}}
  {FLUX}: 0.05
defaults:
  output_format: png
simulator:
  workers: 4
  latency: 1-5s
  seed: 7
  image_mode: full
  faults: {{http_5xx: 0.1, drop_connection: 0, retry_after: 2s}}
download:
  max_bytes: 1000
  timeout: 2m
  concurrency: 3
sweeps:
  - name: ratios
    model: {NANO}
    prompts:
      - "a lighthouse at dusk, {{watercolor|35mm photo|charcoal}}"
      - file: coast.txt
      - file: table.tsv
        column: Prompt
        where: {{Category: Animals}}
        sample: {{n: 1, seed: 1}}
        limit: 5
        template: false
      - {{text: "as written {{a|b}}", template: false}}
    grid:
      aspect_ratio: [1:1, 16:9]
      resolution: [1K, 2K]
    params:
      output_format: webp
    repeat: 2
  - model: {FLUX}
    prompts: ["a red fox in fresh snow"]
    grid:
      image_size: [square_hd, landscape_16_9]
      seed: {{range: [1, 8]}}
    exclude:
      - {{image_size: square_hd, seed: 3}}
"""


@pytest.fixture
def full(tmp_path: Path) -> Path:
    write(tmp_path, "a rocky coast\n", "coast.txt")
    write(tmp_path, "Prompt\tCategory\nan owl\tAnimals\na cup\tArtifacts\n", "table.tsv")
    return write(tmp_path, FULL)


def test_every_key_of_the_spec_loads(full: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(full.parent)
    m = load_manifest(full)
    assert (m.version, m.name, m.provider, m.strict) == (1, "landscapes", "runcomfy", True)
    assert m.output == full.parent / "out/landscapes"
    assert m.state == full.parent / "state/landscapes.db"
    assert m.limits.submits_per_minute == 60 and m.limits.requests_per_second == 10
    assert m.limits.max_in_flight == 8 and m.limits.max_attempts == 5
    assert m.limits.job_timeout == 1800.0 and m.limits.on_ambiguous_submit == "retry"
    assert m.limits.max_jobs == 5000 and m.limits.poll_interval == 1.5
    assert m.budget.max_usd == 25
    assert m.prices == {NANO: {"1K": 0.15, "2K": 0.15, "4K": 0.30}, FLUX: 0.05}
    assert m.defaults == {"output_format": "png"}
    assert m.simulator.workers == 4 and m.simulator.latency_range == (1.0, 5.0)
    assert m.simulator.seed == 7 and m.simulator.image_mode == "full"
    assert m.simulator.faults == {"http_5xx": 0.1, "drop_connection": 0.0, "retry_after": "2s"}
    assert (m.download.max_bytes, m.download.timeout, m.download.concurrency) == (1000, 120.0, 3)
    first, second = m.sweeps
    assert first.name == "ratios" and first.model == NANO and first.repeat == 2
    assert isinstance(first.prompts[0], str)
    assert (
        isinstance(first.prompts[1], PromptFile)
        and first.prompts[1].file == full.parent / "coast.txt"
    )
    table = first.prompts[2]
    assert isinstance(table, PromptFile)
    assert (table.column, table.where, table.limit, table.template) == (
        "Prompt",
        {"Category": "Animals"},
        5,
        False,
    )
    assert table.sample is not None and (table.sample.n, table.sample.seed) == (1, 1)
    assert isinstance(first.prompts[3], PromptText) and first.prompts[3].template is False
    assert first.grid == {"aspect_ratio": ["1:1", "16:9"], "resolution": ["1K", "2K"]}
    assert first.params == {"output_format": "webp"}
    assert second.name is None and second.label(1) == "sweep-2"
    assert list(second.grid["seed"]) == list(range(1, 9))
    assert second.exclude == [{"image_size": "square_hd", "seed": 3}]
    assert m.hash == hashlib.sha256(full.read_bytes()).hexdigest()
    assert m.path == full.resolve() and m.base_dir == full.parent.resolve()


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATCHGEN_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    m = load_manifest(write(tmp_path, f"name: d\nsweeps: [{{model: {NANO}, prompts: [x]}}]\n"))
    assert m.version == 1 and m.provider == "runcomfy" and m.strict is False
    assert m.output == tmp_path / "out" / "d"
    assert m.state == tmp_path / "state" / "d.db"
    assert m.wildcards == tmp_path / "wildcards"
    assert m.limits.model_dump() == {
        "submits_per_minute": None,
        "requests_per_second": None,
        "max_in_flight": 8,
        "max_attempts": 5,
        "job_timeout": 1800.0,
        "on_ambiguous_submit": "park",
        "max_jobs": 100_000,
        "poll_interval": None,
    }
    assert m.budget.max_usd is None and m.prices == {} and m.defaults == {}
    assert m.simulator.model_dump() == {
        "workers": 8,
        "latency": "0.5-1.5s",
        "seed": 0,
        "image_mode": "small",
        "faults": {},
    }
    assert m.download.model_dump() == {"max_bytes": 200_000_000, "timeout": 120.0, "concurrency": 8}
    sweep = m.sweeps[0]
    assert (sweep.name, sweep.grid, sweep.params, sweep.repeat, sweep.exclude) == (
        None,
        {},
        {},
        1,
        [],
    )


def test_state_dir_env_sets_the_default_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHGEN_STATE_DIR", str(tmp_path / "elsewhere"))
    m = load_manifest(write(tmp_path, f"name: e\nsweeps: [{{model: {NANO}, prompts: [x]}}]\n"))
    assert m.state == tmp_path / "elsewhere" / "e.db"
    explicit = write(
        tmp_path, f"name: e\nstate: s.db\nsweeps: [{{model: {NANO}, prompts: [x]}}]\n", "e.yaml"
    )
    monkeypatch.chdir(tmp_path)
    assert load_manifest(explicit).state == tmp_path / "s.db"


def test_output_and_state_resolve_against_cwd_prompt_files_against_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "run").mkdir()
    write(tmp_path / "sub", "a fox\n", "p.txt")
    path = write(
        tmp_path / "sub",
        f"name: r\noutput: o\nstate: s.db\n"
        f"sweeps: [{{model: {NANO}, prompts: [{{file: p.txt}}]}}]\n",
    )
    monkeypatch.chdir(tmp_path / "run")
    m = load_manifest(os.path.relpath(path))
    assert m.output == tmp_path / "run" / "o"
    assert m.state == tmp_path / "run" / "s.db"
    prompt = m.sweeps[0].prompts[0]
    assert isinstance(prompt, PromptFile) and prompt.file == tmp_path / "sub" / "p.txt"


def test_yaml_12_scalars_keep_ratios_as_strings(tmp_path: Path) -> None:
    m = load_manifest(
        write(
            tmp_path,
            """\
name: y
defaults: {a: 1:1, b: 16:9, c: yes, d: on, e: 0755, f: 1e3, g: true, h: 0x10}
sweeps: [{model: x/y, prompts: [p]}]
""",
        )
    )
    assert m.defaults == {
        "a": "1:1",
        "b": "16:9",
        "c": "yes",
        "d": "on",
        "e": 755,
        "f": 1000.0,
        "g": True,
        "h": 16,
    }


def test_durations_accept_units_and_numbers(tmp_path: Path) -> None:
    m = load_manifest(
        write(
            tmp_path,
            f"""\
name: t
limits: {{job_timeout: 90, poll_interval: 2s}}
download: {{timeout: 1.5m}}
sweeps: [{{model: {NANO}, prompts: [p]}}]
""",
        )
    )
    assert (m.limits.job_timeout, m.limits.poll_interval, m.download.timeout) == (90.0, 2.0, 90.0)


@pytest.mark.parametrize(
    ("spec", "values"),
    [
        ("[1, 4]", [1, 2, 3, 4]),
        ("[0, 10, 5]", [0, 5, 10]),
        ("[3, 1, -1]", [3, 2, 1]),
        ("[7, 7]", [7]),
    ],
)
def test_ranges_are_inclusive(tmp_path: Path, spec: str, values: list[int]) -> None:
    m = load_manifest(
        write(
            tmp_path,
            f"""\
name: r
sweeps: [{{model: {FLUX}, prompts: [p], grid: {{seed: {{range: {spec}}}}}}}]
""",
        )
    )
    assert list(m.sweeps[0].grid["seed"]) == values


def test_line_of_names_every_key_and_item(full: Path) -> None:
    m = load_manifest(full)
    lines = full.read_text().splitlines()
    assert lines[m.line_of("limits.job_timeout") - 1].strip().startswith("job_timeout:")  # type: ignore[operator]
    assert "resolution" in lines[m.line_of("sweeps[0].grid.resolution") - 1]  # type: ignore[operator]
    assert "coast.txt" in lines[m.line_of("sweeps[0].prompts[1]") - 1]  # type: ignore[operator]
    # a key the file does not write is located at its nearest parent
    assert m.line_of("sweeps[1].grid.seed.nothing") == m.line_of("sweeps[1].grid.seed")


def test_errors_are_aggregated_with_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
name: two
limits:
  max_in_flight: 0
  max_attempts: lots
sweeps: [{{model: {NANO}, prompts: [p]}}]
""",
    )
    error = error_of(path)
    assert [(i.line, i.key) for i in error.issues] == [
        (3, "limits.max_in_flight"),
        (4, "limits.max_attempts"),
    ]
    assert all(i.file == str(path) for i in error.issues)


def test_did_you_mean_and_the_list_of_keys(tmp_path: Path) -> None:
    close = error_of(
        write(tmp_path, f"name: n\nsweeps: [{{model: {NANO}, prompts: [p], repet: 2}}]\n")
    )
    assert "unknown key 'repet' (did you mean 'repeat'?)" in str(close)
    far = error_of(write(tmp_path, "name: n\nbudget: {zzz: 1}\nsweeps: []\n", "b.yaml"))
    assert "unknown key 'zzz' (expected one of: max_usd)" in str(far)


def test_computed_keys_cannot_be_written(tmp_path: Path) -> None:
    error = error_of(
        write(tmp_path, f"name: n\nhash: abc\nsweeps: [{{model: {NANO}, prompts: [p]}}]\n")
    )
    assert error.issues[0].key == "hash" and error.issues[0].line == 2


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    assert "manifest file not found" in str(error_of(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: x\nsweeps: \xff\n")
    error = error_of(bad)
    assert error.issues[0].line == 2 and "not UTF-8" in str(error)


def test_sweep_names_must_be_unique(tmp_path: Path) -> None:
    error = error_of(
        write(
            tmp_path,
            f"""\
name: u
sweeps:
  - {{name: a, model: {NANO}, prompts: [p]}}
  - {{name: a, model: {FLUX}, prompts: [p]}}
""",
        )
    )
    assert error.issues[0].key == "sweeps[1].name" and error.issues[0].line == 4


def test_model_copy_keeps_lines(full: Path) -> None:
    m = load_manifest(full)
    copied = m.model_copy(update={"state": Path("/tmp/x.db")})
    assert isinstance(copied, Manifest) and copied.line_of("limits") == m.line_of("limits")
    assert copied.shown_path == str(full)


@pytest.mark.parametrize("name", ["demo", "dataset", "sweep"])
def test_example_manifests_load_and_validate(name: str) -> None:
    m = load_manifest(EXAMPLES / f"{name}.yaml")
    assert validate(m, ModelRegistry.default()) == []


def test_demo_is_small_fast_and_covers_both_models() -> None:
    m = load_manifest(EXAMPLES / "demo.yaml")
    assert m.provider == "simulator" and m.simulator.image_mode == "small"
    assert m.simulator.latency_range[1] <= 1.0
    assert {s.model for s in m.sweeps} == {NANO, FLUX}


def test_yaml_anchors_and_merge_keys_work_and_keep_lines(tmp_path: Path) -> None:
    m = load_manifest(
        write(
            tmp_path,
            f"""\
name: a
sweeps:
  - &base
    model: {NANO}
    prompts: [a fox]
    grid: {{resolution: [1K, 2K]}}
  - <<: *base
    name: second
    prompts: [an owl]
""",
        )
    )
    assert m.sweeps[1].model == NANO and m.sweeps[1].grid == {"resolution": ["1K", "2K"]}
    assert m.line_of("sweeps[1].name") == 8
