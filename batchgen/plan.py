"""The planner: a validated manifest → a stream of :class:`JobSpec`, one per job.

Expansion of one sweep: prompts x grid product (minus ``exclude``) x ``repeat``, in that order
(prompt-major, so the first jobs already cover every cell of the first prompt). Parameter
precedence: ``defaults`` < sweep ``params`` < grid cell < the prompt. A ``defaults`` key applies
only to the models that take it (every key must be taken by at least one model of the manifest).

Invariants:

- **Identity**: ``JobSpec.id`` = sha256 hex[:24] of the canonical JSON (sorted keys, ``(",", ":")``
  separators, ``ensure_ascii=False``) of ``{"model", "params", "sample"}`` with the full params
  (prompt and seed included). The same manifest always yields the same ids, and editing one
  sweep, adding a prompt or a grid value never changes the id of a job that was already planned.
- **Seeds**: when the model takes ``seed`` and the manifest fixes none, each job gets
  ``seed = derive_seed(identity without the seed)`` — a rerun asks for the very same images,
  repeats differ. A model without ``seed`` is told apart by ``sample`` alone.
- **No duplicates**: grid values and prompts are unique per sweep (manifest.py, prompts.py) and
  :func:`validate` rejects two sweeps that would plan the same job, so ids never collide.
- **Cheap per job**: everything that does not depend on the prompt (merged params, schema
  validation, cost, the JSON around the prompt) is computed once per grid cell; a job costs a
  dict copy, a string join and one or two sha256 — 1,000,000 jobs stream in constant memory.
- **Size guard**: :func:`count_jobs` counts from the grid sizes (never building a job) and raises
  PlanTooLargeError past ``limits.max_jobs`` before anything is built or written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema

from .errors import ManifestError, ManifestIssue, PlanTooLargeError
from .manifest import Manifest, Sweep, did_you_mean
from .pricing import estimate, tier_param
from .prompts import check_prompts, load_prompts
from .registry import ModelRegistry, ModelSpec

__all__ = [
    "SEED_MAX",
    "JobSpec",
    "canonical_json",
    "count_jobs",
    "derive_seed",
    "expand",
    "iter_jobs",
    "job_id",
    "summary",
    "sweep_counts",
    "validate",
]

#: derived seeds are in [0, SEED_MAX] (fits a signed 32-bit int, which every API accepts)
SEED_MAX = 2**31 - 1
_ID_LEN = 24


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job as planned: what to submit, where it came from, what it should cost."""

    #: sha256 hex[:24] of canonical JSON {"model", "params", "sample"}
    id: str
    #: sweep ``name``, else ``sweep-<1-based index>``
    sweep: str
    model: str
    #: exactly the JSON body to submit (prompt, seed; model defaults not added)
    params: dict[str, Any]
    #: 0-based repeat index
    sample: int
    #: prompt metadata (tabular columns, ``prompt_source``); shared between jobs, do not mutate
    metadata: dict[str, Any]
    #: USD for this job, None = unknown price
    estimated_cost: float | None
    #: 0-based order in the expansion (claiming order)
    position: int


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` that ids hash: sorted keys, compact, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def job_id(model: str, params: Mapping[str, Any], sample: int) -> str:
    """The id of a job (reference implementation; the planner builds the same text faster)."""
    text = canonical_json({"model": model, "params": params, "sample": sample})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_ID_LEN]


def derive_seed(identity: str, low: int = 0, high: int = SEED_MAX) -> int:
    """A seed in ``[low, high]`` from the canonical JSON of a job's identity without its seed."""
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return low + int.from_bytes(digest[:8], "big") % (high - low + 1)


# --------------------------------------------------------------------------- cells


@dataclass(slots=True)
class _Cell:
    """Everything about one grid cell that does not depend on the prompt."""

    values: dict[str, Any]  # grid axis → value
    params: dict[str, Any]  # merged defaults < params < cell, without prompt (and derived seed)
    cost: float | None
    # canonical JSON around the prompt / seed / sample (see _templates)
    head: str
    mid: str
    after: str
    seed_head: str
    seed_mid: str


def _axis_keys(axis: Sequence[Any]) -> list[str]:
    if isinstance(axis, range):
        return [str(v) for v in axis]
    return [canonical_json(v) for v in axis]


def _cells(sweep: Sweep) -> Iterator[dict[str, Any]]:
    """The grid cells of a sweep, in product order, without the excluded ones."""
    names = list(sweep.grid)
    axes = [sweep.grid[n] for n in names]
    if not sweep.exclude:
        for combo in itertools.product(*axes):
            yield dict(zip(names, combo, strict=True))
        return
    excluded = _exclude_matchers(sweep)
    keyed = [list(zip(axis, _axis_keys(axis), strict=True)) for axis in axes]
    position = {n: i for i, n in enumerate(names)}
    for combo in itertools.product(*keyed):
        if any(all(combo[position[k]][1] == v for k, v in entry) for entry in excluded):
            continue
        yield {n: value for n, (value, _) in zip(names, combo, strict=True)}


def _exclude_matchers(sweep: Sweep) -> list[list[tuple[str, str]]]:
    return [
        [
            (k, str(v) if isinstance(sweep.grid[k], range) else canonical_json(v))
            for k, v in e.items()
        ]
        for e in sweep.exclude
    ]


def _cell_count(sweep: Sweep) -> int:
    """Cells of a sweep after exclusion, counted on the excluded axes only."""
    total = math.prod(len(axis) for axis in sweep.grid.values())
    if not sweep.exclude or total == 0:
        return total
    axes = sorted({k for entry in sweep.exclude for k in entry})
    sub = math.prod(len(sweep.grid[a]) for a in axes)
    matchers = _exclude_matchers(sweep)
    position = {a: i for i, a in enumerate(axes)}
    matched = 0
    for combo in itertools.product(*(_axis_keys(sweep.grid[a]) for a in axes)):
        if any(all(combo[position[k]] == v for k, v in entry) for entry in matchers):
            matched += 1
    return total - matched * (total // sub)


def _templates(model: str, params: Mapping[str, Any], with_seed: bool) -> tuple[str, str, str]:
    """Split the canonical identity JSON around the prompt and seed values.

    Returns (head, mid, after) such that the identity of a job is
    ``head + json(prompt) + mid + [str(seed) + after] + str(sample) + "}"`` — ``"prompt"`` sorts
    before ``"seed"``, so the prompt always comes first; ``after`` is "" without a seed.
    """
    probe: dict[str, Any] = dict(params)
    probe["prompt"] = "\0P\0"
    if with_seed:
        probe["seed"] = "\0S\0"
    text = canonical_json({"model": model, "params": probe, "sample": 0})
    # json escapes a real NUL as \u0000, so these markers cannot come from user data
    head, rest = text.split('"\\u0000P\\u0000"')
    if not rest.endswith(',"sample":0}'):
        raise AssertionError("canonical identity JSON changed shape")
    rest = rest[: -len("0}")]
    if not with_seed:
        return head, rest, ""
    mid, after = rest.split('"\\u0000S\\u0000"')
    return head, mid, after


def _merge(manifest: Manifest, sweep: Sweep, spec: ModelSpec | None) -> dict[str, Any]:
    base: dict[str, Any] = {}
    for key, value in manifest.defaults.items():
        if spec is None or key in spec.properties:
            base[key] = value
    base.update(sweep.params)
    return base


def _derives_seed(manifest: Manifest, sweep: Sweep, spec: ModelSpec | None) -> bool:
    if spec is None or not spec.takes_seed:
        return False
    return not ("seed" in sweep.grid or "seed" in sweep.params or "seed" in manifest.defaults)


def _seed_bounds(spec: ModelSpec | None) -> tuple[int, int]:
    prop = spec.properties.get("seed", {}) if spec else {}
    low = prop.get("minimum", 0)
    high = prop.get("maximum", SEED_MAX)
    low = int(low) if isinstance(low, (int, float)) else 0
    high = min(int(high), SEED_MAX) if isinstance(high, (int, float)) else SEED_MAX
    if high < low:  # a schema we cannot honour: fall back to the usual non-negative int32
        return 0, SEED_MAX
    return low, high


def _build_cells(manifest: Manifest, sweep: Sweep, spec: ModelSpec | None) -> Iterator[_Cell]:
    base = _merge(manifest, sweep, spec)
    derive = _derives_seed(manifest, sweep, spec)
    for values in _cells(sweep):
        params = dict(base)
        params.update(values)
        cost = estimate(sweep.model, params, manifest.prices, spec)
        head, mid, after = _templates(sweep.model, params, derive)
        if derive:
            seed_head, seed_mid, _ = _templates(sweep.model, params, False)
        else:
            seed_head = seed_mid = ""
        yield _Cell(values, params, cost, head, mid, after, seed_head, seed_mid)


# --------------------------------------------------------------------------- counting


def _sweep_count(manifest: Manifest, index: int, cap: int) -> int:
    sweep = manifest.sweeps[index]
    cells = _cell_count(sweep)
    if cells == 0:
        return 0
    prompts, _ = load_prompts(manifest, index, cap=cap)
    return len(prompts) * cells * sweep.repeat


def count_jobs(manifest: Manifest, *, guard: bool = True) -> int:
    """How many jobs the manifest expands to, without building any.

    With ``guard`` (the default), raises PlanTooLargeError past ``limits.max_jobs``.
    """
    limit = manifest.limits.max_jobs
    cap = limit + 1
    counts = [_sweep_count(manifest, i, cap) for i in range(len(manifest.sweeps))]
    total = sum(counts)
    if guard and total > limit:
        truncated = any(
            len(load_prompts(manifest, i, cap=cap)[0]) >= cap for i in range(len(counts))
        )
        amount = f"more than {total:,}" if truncated else f"{total:,}"
        biggest = max(range(len(counts)), key=counts.__getitem__)
        key = "limits.max_jobs" if manifest.has_key("limits.max_jobs") else f"sweeps[{biggest}]"
        raise PlanTooLargeError(
            manifest.issue(
                key,
                f"the manifest expands to {amount} jobs, over limits.max_jobs = {limit:,} "
                f"(largest: {manifest.sweep_label(biggest)} with {counts[biggest]:,}); "
                f"shrink the grid or prompts, or raise the guard: limits: {{max_jobs: {total}}}",
            )
        )
    return total


def sweep_counts(manifest: Manifest) -> list[int]:
    """Jobs per sweep (no guard)."""
    cap = manifest.limits.max_jobs + 1
    return [_sweep_count(manifest, i, cap) for i in range(len(manifest.sweeps))]


# --------------------------------------------------------------------------- expansion


def iter_jobs(manifest: Manifest, registry: ModelRegistry) -> Iterator[JobSpec]:
    """Stream every job of the manifest in claiming order (size guard first)."""
    count_jobs(manifest)
    position = 0
    sha256 = hashlib.sha256
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    for index, sweep in enumerate(manifest.sweeps):
        spec = registry.get(sweep.model)
        label = sweep.label(index)
        prompts, _ = load_prompts(manifest, index, cap=manifest.limits.max_jobs + 1)
        cells = list(_build_cells(manifest, sweep, spec))
        derive = _derives_seed(manifest, sweep, spec)
        low, high = _seed_bounds(spec)
        span = high - low + 1
        samples = [(s, f"{s}}}") for s in range(sweep.repeat)]
        model = sweep.model
        for prompt in prompts:
            text = prompt.text
            quoted = dumps(text)
            metadata = prompt.metadata
            for cell in cells:
                front = cell.head + quoted + cell.mid
                after, cost = cell.after, cell.cost
                for sample, tail in samples:
                    params = cell.params.copy()
                    params["prompt"] = text
                    if derive:
                        identity = cell.seed_head + quoted + cell.seed_mid + tail
                        digest = sha256(identity.encode()).digest()
                        seed = low + int.from_bytes(digest[:8], "big") % span
                        params["seed"] = seed
                        full = front + str(seed) + after + tail
                    else:
                        full = front + tail
                    yield JobSpec(
                        sha256(full.encode()).hexdigest()[:_ID_LEN],
                        label,
                        model,
                        params,
                        sample,
                        metadata,
                        cost,
                        position,
                    )
                    position += 1


def expand(manifest: Manifest, registry: ModelRegistry) -> list[JobSpec]:
    """Every job of the manifest, as a list (for small manifests and tests)."""
    return list(iter_jobs(manifest, registry))


# --------------------------------------------------------------------------- validation


def _describe(error: jsonschema.ValidationError) -> str:
    value = error.instance
    kind = error.validator
    if kind == "enum":
        options = ", ".join(str(o) for o in error.validator_value)
        return f"{value!r} is not one of {options}"
    if kind == "type":
        return f"{value!r} is not of type {error.validator_value}"
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"{value!r} is out of range ({kind} {error.validator_value})"
    return str(error.message)


def _origin(manifest: Manifest, index: int, sweep: Sweep, name: str, value: Any) -> str:
    """The key path that set parameter ``name`` for this sweep (for locating errors)."""
    if name in sweep.grid:
        axis = sweep.grid[name]
        if not isinstance(axis, range):
            for i, item in enumerate(axis):
                if canonical_json(item) == canonical_json(value):
                    return f"sweeps[{index}].grid.{name}[{i}]"
        return f"sweeps[{index}].grid.{name}"
    if name in sweep.params:
        return f"sweeps[{index}].params.{name}"
    if name in manifest.defaults:
        return f"defaults.{name}"
    return f"sweeps[{index}]"


def _shown_key(key: str) -> str:
    # "sweeps[0].grid.resolution[1]" is located at the item, named by the axis
    return key[: key.rfind("[")] if key.endswith("]") and ".grid." in key else key


def validate(manifest: Manifest, registry: ModelRegistry) -> list[str]:
    """Check everything before anything is spent; warnings returned, problems raised.

    Raises ManifestError with one issue per distinct problem (with the number of jobs it hits).
    """
    warnings: list[str] = []
    issues: list[ManifestIssue] = []
    try:
        check_prompts(manifest)
    except ManifestError as exc:
        issues.extend(exc.issues)
    if issues:
        raise ManifestError(issues)
    for index in range(len(manifest.sweeps)):
        warnings.extend(load_prompts(manifest, index, cap=manifest.limits.max_jobs + 1)[1])
    # the size guard first: nothing below may walk the cells of a runaway grid
    count_jobs(manifest)

    # unknown models, and defaults no model takes
    known_props: set[str] = set()
    any_unknown = False
    for index, sweep in enumerate(manifest.sweeps):
        spec = registry.get(sweep.model)
        if spec is None:
            any_unknown = True
            message = (
                f"model '{sweep.model}' is not in the registry"
                f"{did_you_mean(sweep.model, [m.model_id for m in registry])}; its parameters "
                "cannot be checked"
            )
            if manifest.strict:
                issues.append(manifest.issue(f"sweeps[{index}].model", message + " (strict: true)"))
            else:
                warnings.append(
                    str(
                        manifest.issue(
                            f"sweeps[{index}].model", message + "; it is submitted as written"
                        )
                    )
                )
        else:
            known_props.update(spec.properties)
    if not any_unknown:
        for key in manifest.defaults:
            if key not in known_props:
                issues.append(
                    manifest.issue(
                        f"defaults.{key}",
                        f"no model of this manifest takes '{key}'"
                        f"{did_you_mean(key, sorted(known_props))}",
                    )
                )

    # per sweep: unknown params, schema of each distinct cell
    for index, sweep in enumerate(manifest.sweeps):
        spec = registry.get(sweep.model)
        if spec is None:
            continue
        issues.extend(_check_sweep(manifest, index, sweep, spec))
    issues.extend(_check_prices(manifest, registry))
    if issues:
        raise ManifestError(sorted(issues, key=lambda i: (i.line or 0, i.key)))

    _check_overlaps(manifest, registry)
    total = count_jobs(manifest)  # memoised prompt counts: cheap the second time
    if manifest.budget.max_usd is not None and total:
        planned = summary(manifest, registry)["estimated_cost"]
        if planned is not None and planned > manifest.budget.max_usd:
            warnings.append(
                f"{manifest.shown_path}:{manifest.line_of('budget.max_usd')}: budget.max_usd: "
                f"the plan is estimated at ${planned:,.2f}, over the budget of "
                f"${manifest.budget.max_usd:,.2f}; the run stops submitting at the budget"
            )
    return warnings


def _check_sweep(
    manifest: Manifest, index: int, sweep: Sweep, spec: ModelSpec
) -> list[ManifestIssue]:
    issues: list[ManifestIssue] = []
    props = spec.properties
    for where, keys in (
        (f"sweeps[{index}].params", sweep.params),
        (f"sweeps[{index}].grid", sweep.grid),
    ):
        for key in keys:
            if key not in props:
                issues.append(
                    manifest.issue(
                        f"{where}.{key}",
                        f"'{key}' is not a parameter of {sweep.model}"
                        f"{did_you_mean(key, [p for p in props if p != 'prompt'])}",
                    )
                )
    if issues:
        return issues
    prompts, _ = load_prompts(manifest, index, cap=manifest.limits.max_jobs + 1)
    if not prompts:
        return [
            manifest.issue(
                f"sweeps[{index}].prompts",
                "this sweep has no prompts (every source came out empty)",
            )
        ]
    per_cell = len(prompts) * sweep.repeat
    validator_cls = jsonschema.validators.validator_for(spec.input_schema)
    schema_validator = validator_cls(spec.input_schema)
    found: dict[tuple[str, str], int] = defaultdict(int)
    representative = prompts[0].text
    for params in (cell.params for cell in _build_cells(manifest, sweep, spec)):
        instance = dict(params)
        instance["prompt"] = representative
        if "seed" in props and "seed" not in instance:
            instance["seed"] = 0
        for error in schema_validator.iter_errors(instance):
            if error.path and error.path[0] == "prompt":
                continue  # prompts are checked one by one below
            if error.validator == "required":
                key = f"sweeps[{index}]"
                message = f"{error.message} of {sweep.model}: set it in params, grid or defaults"
            else:
                name = str(error.path[0]) if error.path else ""
                key = _origin(manifest, index, sweep, name, params.get(name))
                message = _describe(error)
            found[(key, message)] += per_cell
    prompt_schema = props.get("prompt")
    if prompt_schema and set(prompt_schema) - {"type", "title", "description", "default"}:
        prompt_validator = validator_cls(prompt_schema)
        for prompt in prompts:
            for error in prompt_validator.iter_errors(prompt.text):
                found[
                    (f"sweeps[{index}].prompts", f"prompt from {prompt.source}: {error.message}")
                ] += _cell_count(sweep) * sweep.repeat
    for (key, message), count in found.items():
        issues.append(
            ManifestIssue(
                manifest.shown_path, manifest.line_of(key), _shown_key(key), message, count
            )
        )
    return issues


def _check_prices(manifest: Manifest, registry: ModelRegistry) -> list[ManifestIssue]:
    issues = []
    used = {s.model for s in manifest.sweeps}
    for model, table in manifest.prices.items():
        if model not in used:
            issues.append(
                manifest.issue(
                    f"prices.{model}",
                    f"no sweep uses model '{model}'{did_you_mean(model, sorted(used))}",
                )
            )
            continue
        spec = registry.get(model)
        if isinstance(table, dict) and spec is not None:
            name = tier_param({}, spec)
            enum = spec.properties.get(name, {}).get("enum") if name else None
            if name is None:
                issues.append(
                    manifest.issue(
                        f"prices.{model}",
                        f"{model} has no resolution-like parameter; give one price per output",
                    )
                )
            elif enum:
                for key in table:
                    if key not in enum:
                        issues.append(
                            manifest.issue(
                                f"prices.{model}.{key}",
                                f"'{key}' is not a value of {name} ({', '.join(map(str, enum))})",
                            )
                        )
    return issues


def _check_overlaps(manifest: Manifest, registry: ModelRegistry) -> None:
    """Two sweeps of one model must not plan the same job (same params, prompt and sample)."""
    by_model: dict[str, list[int]] = defaultdict(list)
    for index, sweep in enumerate(manifest.sweeps):
        by_model[sweep.model].append(index)
    cap = manifest.limits.max_jobs + 1
    for model, indexes in by_model.items():
        if len(indexes) < 2:
            continue
        spec = registry.get(model)
        seen: dict[str, tuple[int, set[str], int]] = {}
        for index in indexes:
            sweep = manifest.sweeps[index]
            texts = {p.text for p in load_prompts(manifest, index, cap=cap)[0]}
            for cell in _build_cells(manifest, sweep, spec):
                key = canonical_json(cell.params)
                earlier = seen.get(key)
                if earlier is not None:
                    other, other_texts, other_repeat = earlier
                    shared = len(texts & other_texts) * min(sweep.repeat, other_repeat)
                    if shared:
                        raise manifest.error(
                            f"sweeps[{index}]",
                            f"{manifest.sweep_label(index)} plans {shared} job(s) that "
                            f"{manifest.sweep_label(other)} already plans (same model, "
                            f"parameters {canonical_json(cell.params)} and prompt); remove the "
                            "overlap",
                        )
                else:
                    seen[key] = (index, texts, sweep.repeat)


def summary(manifest: Manifest, registry: ModelRegistry) -> dict[str, Any]:
    """Counts and estimated cost per sweep and model, without building every job's params."""
    sweeps: list[dict[str, Any]] = []
    by_model: dict[str, dict[str, Any]] = {}
    cap = manifest.limits.max_jobs + 1
    total_cost = 0.0
    unknown_jobs = 0
    for index, sweep in enumerate(manifest.sweeps):
        spec = registry.get(sweep.model)
        prompts, _ = load_prompts(manifest, index, cap=cap)
        per_cell = len(prompts) * sweep.repeat
        jobs = 0
        cost = 0.0
        unknown = 0
        for cell in _build_cells(manifest, sweep, spec):
            jobs += per_cell
            if cell.cost is None:
                unknown += per_cell
            else:
                cost += cell.cost * per_cell
        entry = {
            "sweep": sweep.label(index),
            "model": sweep.model,
            "prompts": len(prompts),
            "cells": _cell_count(sweep),
            "repeat": sweep.repeat,
            "jobs": jobs,
            "estimated_cost": None if unknown == jobs and jobs else round(cost, 6),
            "unpriced_jobs": unknown,
        }
        sweeps.append(entry)
        model = by_model.setdefault(
            sweep.model,
            {"model": sweep.model, "jobs": 0, "estimated_cost": 0.0, "unpriced_jobs": 0},
        )
        model["jobs"] += jobs
        model["estimated_cost"] += cost
        model["unpriced_jobs"] += unknown
        total_cost += cost
        unknown_jobs += unknown
    for model in by_model.values():
        if model["jobs"] and model["unpriced_jobs"] == model["jobs"]:
            model["estimated_cost"] = None
        else:
            model["estimated_cost"] = round(model["estimated_cost"], 6)
    total = sum(s["jobs"] for s in sweeps)
    return {
        "total": total,
        "sweeps": sweeps,
        "models": list(by_model.values()),
        "estimated_cost": None if total and unknown_jobs == total else round(total_cost, 6),
        "unpriced_jobs": unknown_jobs,
    }
