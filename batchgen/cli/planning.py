"""Planning commands: ``validate``, ``plan`` (a dry run) and ``models``.

None of them writes anything: ``plan`` opens an existing state database read-only to tell done
jobs from new ones, and never creates one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..manifest import Manifest, did_you_mean
from ..plan import JobSpec, iter_jobs, summary, validate
from ..registry import ModelRegistry, ModelSpec
from . import cli
from .common import echo_json, load, manifest_argument, state_option

models_dir_option = click.option(
    "--models-dir",
    "models_dirs",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A folder of extra model definitions (*.json, the shape of spec/models); repeatable.",
)


def _registry(models_dirs: tuple[Path, ...]) -> ModelRegistry:
    return ModelRegistry.default(extra_dirs=list(models_dirs))


def _money(amount: float | None, unpriced: int = 0) -> str:
    if amount is None:
        return "unknown"
    text = f"${amount:,.2f}"
    if unpriced:
        text += f" + {unpriced:,} unpriced"
    return text


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


def _check(manifest: Manifest, registry: ModelRegistry) -> tuple[list[str], dict[str, Any]]:
    warnings = validate(manifest, registry)
    return warnings, summary(manifest, registry)


@cli.command("validate")
@manifest_argument
@models_dir_option
def validate_command(manifest_path: Path, models_dirs: tuple[Path, ...]) -> None:
    """Check a manifest without spending anything: exit 0, or 2 with every problem found.

    Checks the YAML, every key and type, prompt files, grid ranges, each job's parameters
    against its model's input schema, prices, and the size guard.

    Example:

    \b
        batchgen validate manifests/demo.yaml
    """
    manifest = load(manifest_path)
    warnings, plan = _check(manifest, _registry(models_dirs))
    _warn(warnings)
    models = len(plan["models"])
    sweeps = len(plan["sweeps"])
    click.echo(
        f"{manifest_path}: ok: {plan['total']:,} job{'s' * (plan['total'] != 1)} in {sweeps} "
        f"sweep{'s' * (sweeps != 1)} "
        f"on {models} model{'s' * (models != 1)}, estimated cost "
        f"{_money(plan['estimated_cost'], plan['unpriced_jobs'])}"
    )


def _sample_jobs(manifest: Manifest, registry: ModelRegistry, n: int) -> list[JobSpec]:
    """The first job of each sweep, then the next ones in order, up to ``n``."""
    if n <= 0:
        return []
    picked: list[JobSpec] = []
    seen_sweeps: set[str] = set()
    rest: list[JobSpec] = []
    for job in iter_jobs(manifest, registry):
        if job.sweep not in seen_sweeps:
            seen_sweeps.add(job.sweep)
            picked.append(job)
        elif len(rest) < n:
            rest.append(job)
        if len(seen_sweeps) == len(manifest.sweeps) and len(picked) + len(rest) >= n:
            break
    return sorted((picked + rest)[:n], key=lambda j: j.position)


def _job_json(job: JobSpec) -> dict[str, Any]:
    return {
        "id": job.id,
        "sweep": job.sweep,
        "model": job.model,
        "sample": job.sample,
        "params": job.params,
        "metadata": job.metadata,
        "estimated_cost": job.estimated_cost,
    }


@cli.command("plan")
@manifest_argument
@state_option
@models_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (for scripts).")
@click.option(
    "--samples",
    default=3,
    show_default=True,
    type=click.IntRange(0, 100),
    help="How many sample jobs to show.",
)
def plan_command(
    manifest_path: Path,
    state_path: Path | None,
    models_dirs: tuple[Path, ...],
    as_json: bool,
    samples: int,
) -> None:
    """Dry run: jobs per sweep and model, already done, new, estimated cost. Writes nothing.

    When the state database exists it is read (never written) to count the jobs already done;
    otherwise every job is new.

    Example:

    \b
        batchgen plan manifests/demo.yaml
        batchgen plan manifests/sweep.yaml --json --state state/other.db
    """
    manifest = load(manifest_path, state_path)
    registry = _registry(models_dirs)
    warnings, plan = _check(manifest, registry)
    state = manifest.state
    state_exists = state.exists()
    if state_exists:
        from ..store import Store  # imported here: validate and models never need the store

        store = Store(state, readonly=True)
        try:
            diff = store.compare(iter_jobs(manifest, registry))
        finally:
            store.close()
        new, done, retire = diff.new, diff.done, diff.retire
        by_state = dict(diff.by_state)
        new_by_sweep, new_by_model = dict(diff.new_by_sweep), dict(diff.new_by_model)
        new_cost: float | None = diff.new_cost
        new_unpriced = diff.new_unpriced
    else:
        new, done, retire, by_state = plan["total"], 0, 0, {}
        new_by_sweep = {s["sweep"]: s["jobs"] for s in plan["sweeps"]}
        new_by_model = {m["model"]: m["jobs"] for m in plan["models"]}
        new_cost, new_unpriced = plan["estimated_cost"], plan["unpriced_jobs"]
    if new_cost is not None and new and new_unpriced == new:
        new_cost = None
    for entry in plan["sweeps"]:
        entry["new"] = new_by_sweep.get(entry["sweep"], 0)
    for entry in plan["models"]:
        entry["new"] = new_by_model.get(entry["model"], 0)
    jobs = _sample_jobs(manifest, registry, samples)

    if as_json:
        echo_json(
            {
                "manifest": str(manifest_path),
                "name": manifest.name,
                "provider": manifest.provider,
                "state": str(state),
                "state_exists": state_exists,
                "total": plan["total"],
                "new": new,
                "done": done,
                "retire": retire,
                "by_state": by_state,
                "sweeps": plan["sweeps"],
                "models": plan["models"],
                "estimated_cost": plan["estimated_cost"],
                "unpriced_jobs": plan["unpriced_jobs"],
                "new_estimated_cost": new_cost,
                "new_unpriced_jobs": new_unpriced,
                "budget_usd": manifest.budget.max_usd,
                "warnings": warnings,
                "samples": [_job_json(j) for j in jobs],
            }
        )
        return

    _warn(warnings)
    click.echo(f"Plan for {manifest_path} ({manifest.name}, provider {manifest.provider})")
    width = max([len(s["sweep"]) for s in plan["sweeps"]] + [5])
    mwidth = max([len(m["model"]) for m in plan["models"]] + [5])
    header = f"  {'sweep':<{width}}  {'model':<{mwidth}}  {'jobs':>9}  {'new':>9}  est. cost"
    click.echo(header)
    for s in plan["sweeps"]:
        click.echo(
            f"  {s['sweep']:<{width}}  {s['model']:<{mwidth}}  {s['jobs']:>9,}  {s['new']:>9,}"
            f"  {_money(s['estimated_cost'], s['unpriced_jobs'] if s['estimated_cost'] else 0)}"
        )
    if len(plan["models"]) > 1:
        click.echo("  per model:")
        for m in plan["models"]:
            click.echo(
                f"  {'':<{width}}  {m['model']:<{mwidth}}  {m['jobs']:>9,}  {m['new']:>9,}"
                f"  {_money(m['estimated_cost'], m['unpriced_jobs'] if m['estimated_cost'] else 0)}"
            )
    click.echo(
        f"  {'total':<{width}}  {'':<{mwidth}}  {plan['total']:>9,}  {new:>9,}"
        f"  {_money(plan['estimated_cost'], plan['unpriced_jobs'])}"
    )
    if state_exists:
        others = ", ".join(f"{k} {v:,}" for k, v in by_state.items() if v and k != "done")
        click.echo(
            f"State {state}: {done:,} done, {new:,} new"
            + (f", {others}" if others else "")
            + (f", {retire:,} would be retired (left the manifest)" if retire else "")
        )
        click.echo(f"New jobs would cost {_money(new_cost, new_unpriced if new_cost else 0)}")
    else:
        click.echo(f"State {state} does not exist yet: every job is new")
    if manifest.budget.max_usd is not None:
        click.echo(f"Budget: ${manifest.budget.max_usd:,.2f}")
    if jobs:
        click.echo("Sample jobs:")
        for job in jobs:
            params = {k: v for k, v in job.params.items() if k != "prompt"}
            prompt = job.params.get("prompt", "")
            prompt = prompt if len(prompt) <= 70 else prompt[:67] + "..."
            click.echo(f"  {job.id}  {job.sweep}  #{job.sample}  {params}  {prompt!r}")


def _describe_param(name: str, prop: dict[str, Any], required: bool) -> str:
    kind = prop.get("type", "any")
    parts = [f"{name}: {kind}"]
    if required:
        parts.append("required")
    if "enum" in prop:
        parts.append("one of " + ", ".join(str(v) for v in prop["enum"]))
    for bound in ("minimum", "maximum"):
        if bound in prop:
            parts.append(f"{bound} {prop[bound]}")
    if "default" in prop and name != "prompt":
        parts.append(f"default {prop['default']!r}")
    return "  ".join([parts[0], ", ".join(parts[1:])]) if len(parts) > 1 else parts[0]


def _model_json(spec: ModelSpec) -> dict[str, Any]:
    return {
        "model_id": spec.model_id,
        "source": spec.source,
        "parameters": {
            name: {
                "type": prop.get("type"),
                "required": name in spec.required,
                **({"enum": prop["enum"]} if "enum" in prop else {}),
                **({"default": prop["default"]} if "default" in prop and name != "prompt" else {}),
                **({"description": prop["description"]} if prop.get("description") else {}),
            }
            for name, prop in spec.properties.items()
        },
    }


@cli.command("models")
@click.argument("model_id", required=False)
@models_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON.")
def models_command(model_id: str | None, models_dirs: tuple[Path, ...], as_json: bool) -> None:
    """List the models batchgen knows, with their parameters, types, enums and defaults.

    Built-in models ship with batchgen; add more with --models-dir or $BATCHGEN_MODELS_DIR
    (folders of *.json files shaped like spec/models).

    Example:

    \b
        batchgen models
        batchgen models google/nano-banana/pro/text-to-image
    """
    registry = _registry(models_dirs)
    if model_id is not None:
        spec = registry.get(model_id)
        if spec is None:
            hint = did_you_mean(model_id, [m.model_id for m in registry])
            raise click.BadParameter(
                f"unknown model {model_id!r}{hint}",
                param_hint="MODEL_ID",
            )
        specs = [spec]
    else:
        specs = list(registry)
    if as_json:
        echo_json([_model_json(s) for s in specs])
        return
    for index, spec in enumerate(specs):
        if index:
            click.echo()
        click.echo(f"{spec.model_id}  ({spec.source})")
        for name, prop in spec.properties.items():
            click.echo("  " + _describe_param(name, prop, name in spec.required))


__all__ = ["models_command", "plan_command", "validate_command"]
