"""Prompt sources: inline templates and prompt files, turned into a list of :class:`Prompt`.

Sources (one sweep's ``prompts:`` list, in order):

- an inline string — a ``dynamicprompts`` template, expanded combinatorially: ``{a|b}`` variants
  (with ``{2$$a|b|c}`` bounds and nesting) and ``__name__`` wildcards read from the manifest's
  wildcards folder (``wildcards/`` next to the manifest: ``__color__`` reads
  ``wildcards/color.txt``);
- ``{text: "...", template: false}`` — an inline prompt sent exactly as written;
- ``{file: x.txt}`` — one prompt per line; blank lines and lines starting with ``#`` skipped;
- ``{file: x.csv | x.tsv | x.jsonl, column, where, sample, limit}`` — one prompt per row; the other
  columns are kept as job metadata.

Invariants:

- Only real template syntax is expanded. Braces with no ``|`` inside (``{"k": 1}``), unbalanced
  braces, ``#``, ``$``, ``%`` and single underscores are literal text and survive as written
  (dynamicprompts alone would treat ``#`` as a comment and reject ``$`` and ``%``).
- A ``__name__`` that names no wildcard file is an error, never sent as literal text (a typo).
- Every prompt carries where it came from (``file.tsv:12``) for messages and metadata.
- Selection is reproducible: ``where`` filters, then ``sample: {n, seed}`` draws with its own seeded
  ``random.Random`` (kept in file order), then ``limit`` keeps the first rows.
- Within a sweep, a prompt text that appears twice is kept once (a warning says how many were
  dropped): the same prompt twice would plan the very same jobs twice.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError
from .manifest import Manifest, PromptFile, did_you_mean

__all__ = [
    "Prompt",
    "PromptFileError",
    "TemplateError",
    "TemplateExpander",
    "check_prompts",
    "load_prompts",
    "read_prompt_file",
]


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt text, where it came from, and the metadata of its row (tabular files)."""

    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- templates

# Private-use code points stand in for characters that are literal in the user's text but would
# be syntax to dynamicprompts; they are mapped back after expansion.
_LITERAL = {c: chr(0xF0000 + i) for i, c in enumerate("{}#$%_|")}
_RESTORE = {ord(v): k for k, v in _LITERAL.items()}
_WILDCARD = re.compile(r"__([A-Za-z0-9][A-Za-z0-9_./*-]*?)__")
_BOUND = re.compile(r"^\s*(?:\d+-\d+|\d+|-\d+|\d+-)?\$\$(?:[^$|{}]*\$\$)?")


class TemplateError(ValueError):
    """A prompt template that cannot be expanded (unknown wildcard, bad syntax)."""


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for index in range(start, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
    return -1


def _split_options(inner: str) -> list[str]:
    """Split a variant body on ``|`` at brace depth 0."""
    options: list[str] = []
    current: list[str] = []
    depth = 0
    for char in inner:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == "|" and depth == 0:
            options.append("".join(current))
            current = []
        else:
            current.append(char)
    options.append("".join(current))
    return options


def _mark(text: str, wildcards: list[str]) -> tuple[str, bool]:
    """Escape everything that is not template syntax; (marked text, has template syntax)."""
    out: list[str] = []
    has_template = False
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if char == "{":
            end = _matching_brace(text, index)
            if end > 0:
                options = _split_options(text[index + 1 : end])
                if len(options) >= 2:
                    bound = _BOUND.match(options[0])
                    prefix = bound.group(0) if bound else ""
                    if prefix:
                        options[0] = options[0][len(prefix) :]
                    marked = [_mark(option, wildcards)[0] for option in options]
                    out.append("{" + prefix + "|".join(marked) + "}")
                    has_template = True
                else:
                    inner, inner_template = _mark(text[index + 1 : end], wildcards)
                    out.append(_LITERAL["{"] + inner + _LITERAL["}"])
                    has_template = has_template or inner_template
                index = end + 1
                continue
            out.append(_LITERAL["{"])
        elif char == "_" and text.startswith("__", index):
            match = _WILDCARD.match(text, index)
            if match:
                wildcards.append(match.group(1))
                out.append(match.group(0))
                has_template = True
                index = match.end()
                continue
            out.append(_LITERAL["_"])
        elif char in _LITERAL:
            out.append(_LITERAL[char])
        else:
            out.append(char)
        index += 1
    return "".join(out), has_template


class TemplateExpander:
    """Expands prompt templates combinatorially, with wildcards from one folder."""

    def __init__(self, wildcards_dir: Path | None) -> None:
        self.wildcards_dir = wildcards_dir
        self._generator: Any = None
        self._manager: Any = None

    def _setup(self) -> None:
        if self._generator is None:
            # imported lazily: dynamicprompts (pyparsing) costs ~0.3 s to import
            from dynamicprompts.generators import CombinatorialPromptGenerator
            from dynamicprompts.wildcards import WildcardManager

            folder = (
                self.wildcards_dir if self.wildcards_dir and self.wildcards_dir.is_dir() else None
            )
            self._manager = WildcardManager(folder)
            self._generator = CombinatorialPromptGenerator(wildcard_manager=self._manager)

    def expand(self, text: str, cap: int | None = None) -> list[str]:
        """Every prompt ``text`` stands for (``[text]`` when it holds no template syntax)."""
        if "{" not in text and "__" not in text:
            return [text]
        if any(sentinel in text for sentinel in _LITERAL.values()):
            return [text]  # our stand-in characters already in the text: never risk a rewrite
        wildcards: list[str] = []
        marked, has_template = _mark(text, wildcards)
        if not has_template:
            return [text]
        self._setup()
        for name in wildcards:
            if not self._wildcard_exists(name):
                folder = self.wildcards_dir or Path("wildcards")
                known = sorted(self._manager.get_collection_names()) if self._manager else []
                raise TemplateError(
                    f"wildcard __{name}__ not found: expected {folder / (name + '.txt')}"
                    f"{did_you_mean(name, known) if known else ''}; to send the text as written "
                    "use {text: ..., template: false}"
                )
        try:
            results = self._generator.generate(marked, max_prompts=cap)
        except Exception as exc:  # pyparsing raises its own exception types
            raise TemplateError(f"cannot expand template {text!r}: {exc}") from None
        return [str(r).translate(_RESTORE) for r in results]

    def _wildcard_exists(self, name: str) -> bool:
        if self.wildcards_dir is None or not self.wildcards_dir.is_dir():
            return False
        try:
            return bool(self._manager.get_all_values(name))
        except Exception:
            return False


# --------------------------------------------------------------------------- files


def _norm(value: Any) -> str:
    """Comparable text of a cell value or a ``where`` value (``true``, ``3``, ``Animals``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(slots=True)
class _Row:
    line: int
    values: dict[str, Any]


class PromptFileError(ValueError):
    """A problem in a prompt file; ``key`` is the PromptFile key it concerns (``column``, ...)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _read_table(path: Path) -> tuple[list[str], Iterator[_Row]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    handle = path.open("r", encoding="utf-8-sig", newline="")
    if suffix == ".tsv":
        # TSV has no quoting: a '"' inside a prompt is a character (PartiPrompts has many)
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        handle.close()
        return [], iter(())
    header = [h.strip() for h in header]

    def rows() -> Iterator[_Row]:
        with handle:
            start = reader.line_num + 1
            for record in reader:
                line = start
                start = reader.line_num + 1
                if not record or all(not cell.strip() for cell in record):
                    continue
                if len(record) != len(header):
                    raise PromptFileError(
                        "file",
                        f"{path.name}:{line}: row has {len(record)} fields, the header has "
                        f"{len(header)}",
                    )
                yield _Row(line, dict(zip(header, record, strict=True)))

    return header, rows()


def _read_jsonl(path: Path) -> tuple[list[str], Iterator[_Row]]:
    rows: list[_Row] = []
    columns: dict[str, None] = {}
    with path.open("r", encoding="utf-8-sig") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise PromptFileError(
                    "file", f"{path.name}:{number}: not a JSON line: {exc}"
                ) from None
            if not isinstance(value, dict):
                raise PromptFileError(
                    "file", f"{path.name}:{number}: a JSON line must be an object"
                )
            columns.update(dict.fromkeys(value))
            rows.append(_Row(number, value))
    return list(columns), iter(rows)


def _read_txt(path: Path) -> list[_Row]:
    rows: list[_Row] = []
    with path.open("r", encoding="utf-8-sig") as handle:
        for number, text in enumerate(handle, start=1):
            line = text.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            rows.append(_Row(number, {"prompt": line.strip()}))
    return rows


def read_prompt_file(spec: PromptFile, relative_to: Path | None = None) -> list[Prompt]:
    """The prompts of one prompt file, after ``where``, ``sample`` and ``limit`` (no templating).

    Raises PromptFileError (load_prompts turns it into a located ManifestError).
    """
    path = spec.file
    try:
        shown = path.relative_to(relative_to).as_posix() if relative_to else path.name
    except ValueError:
        shown = path.name
    try:
        if path.suffix.lower() == ".txt":
            rows = _read_txt(path)
            column = "prompt"
        else:
            header, row_iter = _read_table(path)
            if not header:
                raise PromptFileError("file", f"{path.name} is empty: no header row")
            column = _pick_column(spec, header, path)
            for key in spec.where or {}:
                if key not in header:
                    raise PromptFileError(
                        f"where.{key}",
                        f"no column '{key}' in {path.name}{did_you_mean(key, header)}",
                    )
            rows = list(_filtered(row_iter, spec))
    except UnicodeDecodeError as exc:
        raise PromptFileError("file", f"{path.name} is not UTF-8 text: {exc.reason}") from None
    except csv.Error as exc:
        raise PromptFileError("file", f"{path.name}: {exc}") from None
    except OSError as exc:
        raise PromptFileError("file", f"cannot read {path}: {exc.strerror}") from None
    if spec.sample is not None and spec.sample.n < len(rows):
        chosen = sorted(random.Random(spec.sample.seed).sample(range(len(rows)), spec.sample.n))
        rows = [rows[i] for i in chosen]
    if spec.limit is not None:
        rows = rows[: spec.limit]
    prompts: list[Prompt] = []
    for row in rows:
        text = row.values.get(column)
        if text is None or (isinstance(text, str) and not text.strip()):
            continue
        metadata = {k: v for k, v in row.values.items() if k != column}
        metadata["prompt_source"] = f"{shown}:{row.line}"
        prompts.append(Prompt(str(text).strip(), f"{shown}:{row.line}", metadata))
    return prompts


def _pick_column(spec: PromptFile, header: list[str], path: Path) -> str:
    if spec.column is not None:
        if spec.column not in header:
            raise PromptFileError(
                "column",
                f"no column '{spec.column}' in {path.name}{did_you_mean(spec.column, header)}",
            )
        return spec.column
    for name in header:
        if name.lower() == "prompt":
            return name
    if len(header) == 1:
        return header[0]
    raise PromptFileError(
        "file",
        f"{path.name} has no 'prompt' column: name one with `column:` "
        f"(columns: {', '.join(header)})",
    )


def _filtered(rows: Iterator[_Row], spec: PromptFile) -> Iterator[_Row]:
    if not spec.where:
        yield from rows
        return
    wanted = {
        key: {_norm(v) for v in (value if isinstance(value, list) else [value])}
        for key, value in spec.where.items()
    }
    for row in rows:
        if all(_norm(row.values.get(key)) in allowed for key, allowed in wanted.items()):
            yield row


# --------------------------------------------------------------------------- per sweep


def load_prompts(
    manifest: Manifest, sweep_index: int, *, cap: int | None = None
) -> tuple[list[Prompt], list[str]]:
    """(prompts, warnings) of ``manifest.sweeps[sweep_index]``, expanded and de-duplicated.

    ``cap`` bounds how many prompts are built (the size guard passes ``max_jobs + 1`` so a
    runaway template stops early). Results are memoised on the manifest. Raises ManifestError.
    """
    memo_key = ("prompts", sweep_index, cap)
    cached = manifest._cache.get(memo_key)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    sweep = manifest.sweeps[sweep_index]
    base = f"sweeps[{sweep_index}].prompts"
    expander = manifest._cache.get("expander")
    if expander is None:
        expander = manifest._cache["expander"] = TemplateExpander(manifest.wildcards)
    shown_manifest = Path(manifest.shown_path).name
    prompts: list[Prompt] = []
    seen: set[str] = set()
    duplicates = 0
    warnings: list[str] = []
    for index, source in enumerate(sweep.prompts):
        key = f"{base}[{index}]"
        room = None if cap is None else max(cap - len(prompts), 1)
        try:
            if isinstance(source, PromptFile):
                try:
                    rows = read_prompt_file(source, manifest.base_dir)
                except PromptFileError as problem:
                    raise manifest.error(f"{key}.{problem.key}", problem.message) from None
                if not rows:
                    warnings.append(
                        f"{manifest.shown_path}:{manifest.line_of(key)}: {key}: "
                        f"{source.file.name} gives no prompts (after where/sample/limit)"
                    )
                expanded: list[Prompt] = []
                for row in rows:
                    texts = expander.expand(row.text, room) if source.template else [row.text]
                    expanded.extend(Prompt(t, row.source, row.metadata) for t in texts)
            else:
                text = source if isinstance(source, str) else source.text
                template = True if isinstance(source, str) else source.template
                where = f"{shown_manifest}:{manifest.line_of(key)}"
                texts = expander.expand(text, room) if template else [text]
                expanded = [Prompt(t, where, {"prompt_source": where}) for t in texts]
        except TemplateError as exc:
            raise manifest.error(key, str(exc)) from None
        for prompt in expanded:
            if prompt.text in seen:
                duplicates += 1
                continue
            seen.add(prompt.text)
            prompts.append(prompt)
        if cap is not None and len(prompts) >= cap:
            break
    if duplicates:
        warnings.append(
            f"{manifest.shown_path}:{manifest.line_of(base)}: {base}: {duplicates} duplicate "
            f"prompt(s) dropped (each prompt is planned once per cell)"
        )
    result = (prompts, warnings)
    manifest._cache[memo_key] = result
    return result


def check_prompts(manifest: Manifest) -> None:
    """Load every sweep's prompts once, raising every problem found (as one ManifestError)."""
    issues = []
    for index in range(len(manifest.sweeps)):
        try:
            load_prompts(manifest, index, cap=manifest.limits.max_jobs + 1)
        except ManifestError as exc:
            issues.extend(exc.issues)
    if issues:
        raise ManifestError(issues)
