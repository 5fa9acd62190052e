"""The planner: precedence, identity, seeds, validation, size guard, and hypothesis properties."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from batchgen.errors import ManifestError, PlanTooLargeError
from batchgen.manifest import Manifest, load_manifest
from batchgen.plan import (
    SEED_MAX,
    JobSpec,
    canonical_json,
    count_jobs,
    derive_seed,
    expand,
    iter_jobs,
    job_id,
    sweep_counts,
    validate,
)
from batchgen.registry import ModelRegistry

NANO = "google/nano-banana/pro/text-to-image"
FLUX = "blackforestlabs/flux-2/max/text-to-image"
REGISTRY = ModelRegistry.default()


def load(folder: Path, data: dict[str, Any] | str, name: str = "m.yaml") -> Manifest:
    path = folder / name
    text = data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return load_manifest(path)


def plan(folder: Path, data: dict[str, Any] | str) -> list[JobSpec]:
    manifest = load(folder, data)
    validate(manifest, REGISTRY)
    return expand(manifest, REGISTRY)


# --------------------------------------------------------------------------- expansion


def test_precedence_defaults_params_grid_prompt(tmp_path: Path) -> None:
    jobs = plan(
        tmp_path,
        {
            "name": "p",
            "defaults": {"output_format": "jpeg", "aspect_ratio": "4:3", "resolution": "2K"},
            "sweeps": [
                {
                    "model": NANO,
                    "prompts": ["a fox"],
                    "params": {"output_format": "webp", "aspect_ratio": "3:2"},
                    "grid": {"aspect_ratio": ["1:1"]},
                }
            ],
        },
    )
    assert jobs[0].params == {
        "output_format": "webp",
        "aspect_ratio": "1:1",
        "resolution": "2K",
        "prompt": "a fox",
    }


def test_defaults_apply_only_to_models_that_take_them(tmp_path: Path) -> None:
    jobs = plan(
        tmp_path,
        {
            "name": "d",
            "defaults": {"resolution": "4K", "output_format": "png"},
            "sweeps": [{"model": NANO, "prompts": ["x"]}, {"model": FLUX, "prompts": ["x"]}],
        },
    )
    nano, flux = jobs
    assert nano.params["resolution"] == "4K"
    assert "resolution" not in flux.params and flux.params["output_format"] == "png"


def test_expansion_order_count_exclude_and_fields(tmp_path: Path) -> None:
    jobs = plan(
        tmp_path,
        {
            "name": "o",
            "sweeps": [
                {
                    "name": "s",
                    "model": NANO,
                    "prompts": ["a", "b"],
                    "repeat": 2,
                    "grid": {"aspect_ratio": ["1:1", "16:9"], "resolution": ["1K", "4K"]},
                    "exclude": [{"aspect_ratio": "16:9", "resolution": "4K"}],
                }
            ],
        },
    )
    assert len(jobs) == 2 * 3 * 2
    assert [j.position for j in jobs] == list(range(12))
    assert [
        (j.params["prompt"], j.params["aspect_ratio"], j.params["resolution"], j.sample)
        for j in jobs[:6]
    ] == [
        ("a", "1:1", "1K", 0),
        ("a", "1:1", "1K", 1),
        ("a", "1:1", "4K", 0),
        ("a", "1:1", "4K", 1),
        ("a", "16:9", "1K", 0),
        ("a", "16:9", "1K", 1),
    ]
    assert all(j.sweep == "s" and j.model == NANO for j in jobs)
    assert not any(
        j.params["aspect_ratio"] == "16:9" and j.params["resolution"] == "4K" for j in jobs
    )
    assert [j.estimated_cost for j in jobs[:3]] == [0.15, 0.15, 0.30]
    lines = (tmp_path / "m.yaml").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip() == "- a")
    assert jobs[0].metadata == {"prompt_source": f"m.yaml:{line}"}


def test_ids_match_the_reference_canonical_json(tmp_path: Path) -> None:
    jobs = plan(
        tmp_path,
        {
            "name": "i",
            "sweeps": [
                {
                    "model": NANO,
                    "prompts": ['é "quoted" \\ {"json": 1}', "日本語 🎨"],
                    "grid": {"aspect_ratio": ["1:1", "9:16"]},
                    "repeat": 2,
                },
                {"model": FLUX, "prompts": ["a fox"], "grid": {"seed": {"range": [1, 3]}}},
                {"model": FLUX, "prompts": ["an owl"], "repeat": 3},
            ],
        },
    )
    for job in jobs:
        text = json.dumps(
            {"model": job.model, "params": job.params, "sample": job.sample},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        assert job.id == hashlib.sha256(text.encode()).hexdigest()[:24]
        assert job.id == job_id(job.model, job.params, job.sample)
    assert len({j.id for j in jobs}) == len(jobs)


def test_derived_seeds_are_stable_distinct_per_repeat_and_in_range(tmp_path: Path) -> None:
    data = {"name": "s", "sweeps": [{"model": FLUX, "prompts": ["a fox", "an owl"], "repeat": 3}]}
    first = plan(tmp_path, data)
    second = plan(tmp_path, data)
    assert [(j.id, j.params["seed"]) for j in first] == [(j.id, j.params["seed"]) for j in second]
    seeds = [j.params["seed"] for j in first]
    assert len(set(seeds)) == 6 and all(0 <= s <= SEED_MAX for s in seeds)
    job = first[1]
    without = {k: v for k, v in job.params.items() if k != "seed"}
    identity = canonical_json({"model": job.model, "params": without, "sample": job.sample})
    assert job.params["seed"] == derive_seed(identity)


def test_fixed_seeds_are_kept_and_models_without_seed_get_none(tmp_path: Path) -> None:
    jobs = plan(
        tmp_path,
        {
            "name": "f",
            "sweeps": [
                {"model": FLUX, "prompts": ["x"], "params": {"seed": 42}, "repeat": 2},
                {"model": NANO, "prompts": ["x"], "repeat": 2},
            ],
        },
    )
    assert [j.params.get("seed") for j in jobs] == [42, 42, None, None]
    assert len({j.id for j in jobs}) == 4  # the sample index alone tells repeats apart


def test_unknown_model_is_a_warning_and_submitted_as_written(tmp_path: Path) -> None:
    manifest = load(
        tmp_path,
        {
            "name": "u",
            "defaults": {"anything": 1},
            "sweeps": [{"model": "acme/new-model", "prompts": ["x"], "params": {"steps": 30}}],
        },
    )
    warnings = validate(manifest, REGISTRY)
    assert len(warnings) == 1 and "acme/new-model' is not in the registry" in warnings[0]
    (job,) = expand(manifest, REGISTRY)
    assert job.params == {"anything": 1, "steps": 30, "prompt": "x"}
    assert job.estimated_cost is None
    strict = load(
        tmp_path,
        {"name": "u", "strict": True, "sweeps": [{"model": "acme/new-model", "prompts": ["x"]}]},
        "s.yaml",
    )
    with pytest.raises(ManifestError, match="strict: true"):
        validate(strict, REGISTRY)


# --------------------------------------------------------------------------- validation


def test_validation_aggregates_per_problem_with_job_counts(tmp_path: Path) -> None:
    text = f"""\
name: v
sweeps:
  - model: {NANO}
    prompts: [a, b, c]
    repeat: 2
    grid:
      resolution: [1K, 3K, 5K]
      aspect_ratio: ["1:1", "16:9"]
"""
    manifest = load(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        validate(manifest, REGISTRY)
    issues = info.value.issues
    assert [(i.line, i.key, i.message, i.count) for i in issues] == [
        (7, "sweeps[0].grid.resolution", "'3K' is not one of 1K, 2K, 4K", 12),
        (7, "sweeps[0].grid.resolution", "'5K' is not one of 1K, 2K, 4K", 12),
    ]
    assert "m.yaml:7: sweeps[0].grid.resolution: '3K' is not one of 1K, 2K, 4K (12 jobs)" in str(
        info.value
    )


def test_validation_runs_once_per_cell_not_per_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(500)), "utf-8")
    manifest = load(
        tmp_path,
        {
            "name": "c",
            "sweeps": [
                {
                    "model": NANO,
                    "prompts": [{"file": "p.txt"}],
                    "grid": {"aspect_ratio": ["1:1", "16:9"]},
                }
            ],
        },
    )
    calls = 0
    real = jsonschema.Draft202012Validator.iter_errors

    def counting(self: Any, instance: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(self, instance, *args, **kwargs)

    monkeypatch.setattr(jsonschema.Draft202012Validator, "iter_errors", counting)
    monkeypatch.setattr(jsonschema.Draft7Validator, "iter_errors", counting)
    monkeypatch.setattr(jsonschema.Draft4Validator, "iter_errors", counting)
    assert validate(manifest, REGISTRY) == []
    assert 1 <= calls <= 2


def test_the_size_guard_trips_before_anything_is_built(tmp_path: Path) -> None:
    manifest = load(
        tmp_path,
        {
            "name": "g",
            "limits": {"max_jobs": 1000},
            "sweeps": [
                {"model": FLUX, "prompts": ["a {x|y}"], "grid": {"seed": {"range": [1, 10**8]}}}
            ],
        },
    )
    with pytest.raises(PlanTooLargeError) as info:
        count_jobs(manifest)
    message = str(info.value)
    assert "200,000,000 jobs" in message and "limits.max_jobs = 1,000" in message
    assert info.value.issues[0].key == "limits.max_jobs" and info.value.issues[0].line is not None
    with pytest.raises(PlanTooLargeError):
        next(iter_jobs(manifest, REGISTRY))
    assert count_jobs(manifest, guard=False) == 200_000_000


def test_overlapping_sweeps_are_refused(tmp_path: Path) -> None:
    manifest = load(
        tmp_path,
        {
            "name": "o",
            "sweeps": [
                {"model": FLUX, "prompts": ["a", "b"], "params": {"seed": 1}},
                {"model": FLUX, "prompts": ["b"], "grid": {"seed": [1, 2]}},
            ],
        },
    )
    with pytest.raises(ManifestError, match=r"sweep-2 plans 1 job\(s\) that sweep-1 already plans"):
        validate(manifest, REGISTRY)


def test_budget_over_the_plan_warns(tmp_path: Path) -> None:
    manifest = load(
        tmp_path,
        {
            "name": "b",
            "budget": {"max_usd": 0.2},
            "sweeps": [{"model": NANO, "prompts": ["a", "b"]}],
        },
    )
    (warning,) = validate(manifest, REGISTRY)
    assert "estimated at $0.30, over the budget of $0.20" in warning


# --------------------------------------------------------------------------- properties

NAMES = st.sampled_from(["aspect_ratio", "resolution", "output_format"])
VALUES = {
    "aspect_ratio": ["21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16"],
    "resolution": ["1K", "2K", "4K"],
    "output_format": ["jpeg", "png", "webp"],
}


@st.composite
def sweeps(draw: st.DrawFn, prompt_pool: list[str]) -> dict[str, Any]:
    if draw(st.booleans()):
        model = NANO
        axes = draw(st.lists(NAMES, unique=True, max_size=3))
        grid: dict[str, Any] = {
            a: draw(st.lists(st.sampled_from(VALUES[a]), min_size=1, max_size=4, unique=True))
            for a in axes
        }
    else:
        model = FLUX
        grid = {}
        if draw(st.booleans()):
            start = draw(st.integers(0, 50))
            grid["seed"] = {"range": [start, start + draw(st.integers(0, 6))]}
        if draw(st.booleans()):
            grid["image_size"] = draw(
                st.lists(
                    st.sampled_from(["square_hd", "square", "landscape_16_9"]),
                    min_size=1,
                    unique=True,
                )
            )
    exclude: list[dict[str, Any]] = []
    if grid and draw(st.booleans()):
        axis = draw(st.sampled_from(sorted(grid)))
        values = grid[axis]
        value = values["range"][0] if isinstance(values, dict) else draw(st.sampled_from(values))
        exclude.append({axis: value})
    prompts = draw(st.lists(st.sampled_from(prompt_pool), min_size=1, max_size=4, unique=True))
    return {
        "model": model,
        "prompts": prompts,
        "grid": grid,
        "exclude": exclude,
        "repeat": draw(st.integers(1, 3)),
    }


PROMPTS = ["a fox", "an owl", 'é 🎨 {"k": 1}', "a {red|blue} kite", "tea", "x" * 300]
MANIFESTS = st.lists(sweeps(PROMPTS), min_size=1, max_size=3).map(
    lambda s: {"name": "h", "sweeps": s}
)


def implied(data: dict[str, Any]) -> int:
    total = 0
    for sweep in data["sweeps"]:
        sizes = {
            k: (v["range"][1] - v["range"][0] + 1) if isinstance(v, dict) else len(v)
            for k, v in sweep["grid"].items()
        }
        cells = math.prod(sizes.values())
        for entry in sweep["exclude"]:
            (axis,) = entry
            cells -= cells // sizes[axis]
        prompts = sum(2 if "{red|blue}" in p else 1 for p in sweep["prompts"])
        total += prompts * cells * sweep["repeat"]
    return total


def _plan_or_overlap(data: dict[str, Any]) -> list[JobSpec] | None:
    with tempfile.TemporaryDirectory() as folder:
        manifest = load(Path(folder), data)
        try:
            validate(manifest, REGISTRY)
        except ManifestError as exc:
            assert "already plans" in str(exc), str(exc)  # the only refusal these can meet
            event("overlapping sweeps refused")
            return None
        event("planned")
        jobs = expand(manifest, REGISTRY)
        assert count_jobs(manifest) == len(jobs)
        per_sweep = [
            sum(1 for j in jobs if j.sweep == manifest.sweep_label(i))
            for i in range(len(manifest.sweeps))
        ]
        assert sweep_counts(manifest) == per_sweep
        return jobs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MANIFESTS)
def test_count_is_the_implied_product_and_ids_never_collide(data: dict[str, Any]) -> None:
    jobs = _plan_or_overlap(data)
    if jobs is None:
        return
    assert len(jobs) == implied(data)
    assert len({j.id for j in jobs}) == len(jobs)
    assert [j.position for j in jobs] == list(range(len(jobs)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MANIFESTS, sweeps(["a brand new prompt", "another new one"]), st.data())
def test_ids_are_stable_across_reruns_and_unrelated_edits(
    data: dict[str, Any], extra: dict[str, Any], more: st.DataObject
) -> None:
    before = _plan_or_overlap(data)
    if before is None:
        return
    assert [j.id for j in before] == [j.id for j in _plan_or_overlap(data) or []]
    # add a sweep and a prompt to an existing sweep: every earlier job keeps its id
    edited = json.loads(json.dumps(data))
    edited["sweeps"].append(extra)
    index = more.draw(st.integers(0, len(data["sweeps"]) - 1))
    edited["sweeps"][index]["prompts"].append("one more prompt")
    after = _plan_or_overlap(edited)
    if after is None:
        return
    old = {(j.id, j.sweep, json.dumps(j.params, sort_keys=True)) for j in before}
    new = {(j.id, j.sweep, json.dumps(j.params, sort_keys=True)) for j in after}
    assert old <= new


# --------------------------------------------------------------------------- scale


def test_a_million_jobs_stream_in_constant_memory(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(1000)), "utf-8")
    manifest = load(
        tmp_path,
        {
            "name": "m",
            "limits": {"max_jobs": 1_000_000},
            "sweeps": [
                {
                    "model": FLUX,
                    "prompts": [{"file": "p.txt"}],
                    "grid": {"seed": {"range": [1, 1000]}},
                }
            ],
        },
    )
    assert validate(manifest, REGISTRY) == []
    assert count_jobs(manifest) == 1_000_000
    import tracemalloc

    tracemalloc.start()
    n = 0
    for _job in iter_jobs(manifest, REGISTRY):
        n += 1
        if n == 200_000:
            break
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 200_000
    assert peak < 20_000_000  # streaming: nothing grows with the number of jobs


def test_a_missing_required_parameter_names_the_sweep(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "edit.json").write_text(
        json.dumps(
            {
                "model_id": "acme/edit",
                "input": {
                    "type": "object",
                    "required": ["prompt", "image_url"],
                    "properties": {"prompt": {"type": "string"}, "image_url": {"type": "string"}},
                },
            }
        ),
        encoding="utf-8",
    )
    registry = ModelRegistry.default(extra_dirs=[folder])
    manifest = load(tmp_path, "name: r\nsweeps:\n  - model: acme/edit\n    prompts: [a, b]\n")
    with pytest.raises(ManifestError) as info:
        validate(manifest, registry)
    (issue,) = info.value.issues
    assert (issue.key, issue.line, issue.count) == ("sweeps[0]", 3, 2)
    assert issue.message == (
        "'image_url' is a required property of acme/edit: set it in params, grid or defaults"
    )
