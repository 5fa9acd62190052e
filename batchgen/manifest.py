"""The manifest: one YAML file describing a whole batch, loaded into strict pydantic models.

``load_manifest(path)`` reads the file with a line-tracking YAML loader, validates it against the
models below (``extra="forbid"`` everywhere) and returns a :class:`Manifest`. Invariants:

- Every error is a :class:`~batchgen.errors.ManifestError` whose issues name the file, the line
  and the dotted key path (``sweeps[0].grid.resolution``); unknown keys carry a "did you mean".
- YAML is read with YAML 1.2 scalar rules: ``1:1`` and ``16:9`` are strings (not the YAML 1.1
  base-60 integers 61 and 969), only ``true``/``false`` are booleans, ``0755`` is 755.
- Paths a manifest *reads* (prompt files, the wildcards folder) resolve against the manifest's
  folder; ``output`` and ``state`` resolve against the current folder. Every path in a loaded
  Manifest is absolute.
- Grid axes are validated here (non-empty, no duplicate values, ranges of integers that reach
  their end) and stored as sequences: a list, or a lazy ``range`` for ``{range: [a, b(, step)]}``.
- ``Manifest.hash`` is the sha256 of the file's bytes.

The manifest keeps the line of every key and sequence item (``Manifest.line_of``) so that later
stages (prompt loading, schema validation in plan.py) can point at the line that caused a problem.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.functional_validators import BeforeValidator, PlainValidator
from pydantic_core import PydanticCustomError

from .errors import ManifestError, ManifestIssue
from .units import parse_duration, parse_duration_range

__all__ = [
    "STATE_DIR_ENV",
    "Budget",
    "DownloadSettings",
    "Limits",
    "Manifest",
    "PromptFile",
    "PromptText",
    "SimulatorSettings",
    "Sweep",
    "load_manifest",
]

#: env var naming the folder of default state databases (``<dir>/<name>.db``)
STATE_DIR_ENV = "BATCHGEN_STATE_DIR"
#: extensions a prompt file may have
PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")
#: the largest number of values a ``{range: ...}`` grid axis may hold (the size guard is later)
MAX_RANGE_LEN = 10**9
#: Manifest fields batchgen computes; a user may not write them
_COMPUTED_KEYS = ("path", "base_dir", "hash")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# --------------------------------------------------------------------------- YAML with lines


class _LineLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars (no base-60, no yes/no booleans)."""


_LineLoader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)  # YAML 1.2: a leading zero is still decimal


_LineLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _path_str(parts: Sequence[str | int]) -> str:
    """``("sweeps", 0, "grid", "seed")`` → ``sweeps[0].grid.seed``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _record_lines(
    node: yaml.Node,
    parts: tuple[str | int, ...],
    lines: dict[str, int],
    issues: list[ManifestIssue],
    file: str,
) -> None:
    """Walk the composed node tree, recording the line of every key and item by dotted path."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key == "<<":
                continue  # a merge key: its keys are located at the mapping that merges them
            path = (*parts, key)
            if key in seen:
                issues.append(
                    ManifestIssue(
                        file,
                        line,
                        _path_str(path),
                        f"duplicate key '{key}' (first given at line {seen[key]})",
                    )
                )
            seen.setdefault(key, line)
            lines.setdefault(_path_str(path), line)
            _record_lines(value_node, path, lines, issues, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*parts, index)
            lines[_path_str(path)] = item.start_mark.line + 1
            _record_lines(item, path, lines, issues, file)


#: parser events that are a node (a key or a value), as opposed to the end of a collection
_NODE_EVENTS = (yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent, yaml.AliasEvent)


def _syntax_error_path(text: str) -> str:
    """The dotted key path the parser had reached when it failed (best effort, for messages)."""
    stack: list[list[Any]] = []  # [kind, key-or-index, expecting_key]
    last = ""
    try:
        for event in yaml.parse(text, Loader=_LineLoader):
            # a node (not an end marker) inside the innermost collection: a key or a value
            is_node = isinstance(event, _NODE_EVENTS)
            if is_node and stack and stack[-1][0] == "map":
                frame = stack[-1]
                if frame[2]:  # this event is a key
                    frame[1] = event.value if isinstance(event, yaml.ScalarEvent) else "?"
                    frame[2] = False
                    last = _path_str([f[1] for f in stack if f[1] is not None])
                    continue
                frame[2] = True
            elif is_node and stack and stack[-1][0] == "seq":
                stack[-1][1] = -1 if stack[-1][1] is None else stack[-1][1]
                stack[-1][1] += 1
                last = _path_str([f[1] for f in stack if f[1] is not None])
            if isinstance(event, yaml.MappingStartEvent):
                stack.append(["map", None, True])
            elif isinstance(event, yaml.SequenceStartEvent):
                stack.append(["seq", None, True])
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                stack.pop()
    except yaml.YAMLError:
        pass
    return last


def _read_yaml(path: Path) -> tuple[Any, dict[str, int], bytes]:
    """Parse ``path``: (data, line of every key path, raw bytes). Raises ManifestError."""
    file = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError.at(file, None, "", "manifest file not found") from None
    except IsADirectoryError:
        raise ManifestError.at(file, None, "", "is a folder, not a manifest file") from None
    except OSError as exc:
        raise ManifestError.at(
            file, None, "", f"cannot read the manifest: {exc.strerror}"
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError.at(
            file, line, "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        loader = _LineLoader(text)
    except yaml.reader.ReaderError as exc:
        # raised before any parsing: a control character YAML does not allow anywhere
        line = text[: exc.position].count("\n") + 1
        raise ManifestError.at(
            file,
            line,
            _syntax_error_path(text[: exc.position]),
            f"YAML cannot contain the control character U+{exc.character:04X}"
            " (remove it, or write it as an escape such as \\x01 in a double-quoted string)",
        ) from None
    lines: dict[str, int] = {}
    issues: list[ManifestIssue] = []
    try:
        node = loader.get_single_node()
        if node is None:
            raise ManifestError.at(
                file, 1, "name", "the manifest is empty; it needs at least `name` and `sweeps`"
            )
        # lines first: construction flattens merge keys (<<) into the mapping nodes
        _record_lines(node, (), lines, issues, file)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where: int | None = mark.line + 1 if mark else None
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        started, found = exc.context_mark, exc.problem_mark
        if started is not None and found is not None and started.line != found.line:
            context = f" ({exc.context} that starts at line {started.line + 1})"
        key = _syntax_error_path(text)
        if "expected a single document" in problem or "but found another document" in problem:
            problem = "more than one YAML document; a manifest is a single document"
            context = ""
        raise ManifestError.at(file, where, key, f"YAML syntax error: {problem}{context}") from None
    except yaml.YAMLError as exc:
        raise ManifestError.at(file, None, "", f"YAML syntax error: {exc}") from None
    finally:
        loader.dispose()
    if issues:
        raise ManifestError(issues)
    if not isinstance(data, dict):
        raise ManifestError.at(
            file,
            node.start_mark.line + 1,
            "",
            f"the manifest must be a mapping of keys (name, sweeps, ...), got {_kind(data)}",
        )
    return data, lines, raw


# --------------------------------------------------------------------------- helpers


def _kind(value: Any) -> str:
    """How a YAML value reads to a user: ``a string '2'``, ``a list``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value:g})"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"a string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` when a close choice exists, else the list of valid choices."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    if choices and len(choices) <= 20:
        return f" (expected one of: {', '.join(sorted(choices))})"
    return ""


def _fail(message: str, subpath: str = "") -> PydanticCustomError:
    """A pydantic error carrying our own message and, optionally, a deeper key path."""
    return PydanticCustomError("batchgen", "{message}", {"message": message, "subpath": subpath})


def _duration(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value  # let the type check reject booleans with its own message
    if isinstance(value, (int, float, str)):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        if seconds <= 0:
            raise _fail(f"must be longer than 0 seconds, got {value!r}")
        return seconds
    return value


Duration = Annotated[float, BeforeValidator(_duration)]
OptionalDuration = Annotated[float | None, BeforeValidator(_duration)]


def _axis(value: Any) -> Sequence[Any]:
    """A grid axis: a non-empty list of distinct values, or ``{range: [a, b(, step)]}``."""
    if isinstance(value, dict):
        unknown = [k for k in value if k != "range"]
        if unknown:
            hint = did_you_mean(str(unknown[0]), ["range"])
            raise _fail(
                f"unknown key '{unknown[0]}' in a grid range{hint}",
                str(unknown[0]),
            )
        return _range(value.get("range"))
    if not isinstance(value, list):
        raise _fail(
            f"a grid axis is a list of values or {{range: [start, stop]}}, got {_kind(value)}"
        )
    if not value:
        raise _fail("empty grid axis: give at least one value (an empty axis means zero jobs)")
    seen: dict[str, int] = {}
    for index, item in enumerate(value):
        if item is None:
            raise _fail("a grid value cannot be null", f"[{index}]")
        key = _canonical(item)
        if key in seen:
            raise _fail(
                f"duplicate value {item!r} (also item {seen[key]}): it would plan the "
                "same jobs twice",
                f"[{index}]",
            )
        seen[key] = index
    return value


def _range(spec: Any) -> range:
    if not isinstance(spec, list) or len(spec) not in (2, 3):
        raise _fail(f"range is [start, stop] or [start, stop, step], got {spec!r}", "range")
    for item in spec:
        if isinstance(item, bool) or not isinstance(item, int):
            raise _fail(f"range bounds and step must be integers, got {item!r}", "range")
    start, stop = spec[0], spec[1]
    step = spec[2] if len(spec) == 3 else 1
    if step == 0:
        raise _fail("range step cannot be 0", "range")
    if (stop - start) * step < 0:
        hint = f"; write [{start}, {stop}, {-step}]" if len(spec) == 2 or step in (1, -1) else ""
        raise _fail(
            f"range {spec} never reaches {stop} from {start} with step {step}{hint}", "range"
        )
    if (stop - start) % step:
        last = start + ((stop - start) // step) * step
        raise _fail(
            f"range {spec} never reaches its end {stop} (it stops at {last}); ends are inclusive, "
            f"so make (stop - start) a multiple of the step",
            "range",
        )
    result = range(start, stop + (1 if step > 0 else -1), step)
    if len(result) > MAX_RANGE_LEN:
        raise _fail(
            f"range {spec} holds {len(result):,} values, more than any plan can run", "range"
        )
    return result


def _canonical(value: Any) -> str:
    """Comparable text of a grid value (the canonical JSON plan.py hashes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


GridAxis = Annotated[Sequence[Any], PlainValidator(_axis)]


def _name(value: Any) -> Any:
    if isinstance(value, str) and not _NAME.match(value):
        raise _fail(
            f"{value!r} is not a valid name: use letters, digits, '-', '_' and '.', starting "
            "with a letter or digit, at most 100 characters"
        )
    return value


Name = Annotated[str, BeforeValidator(_name)]


class _Strict(BaseModel):
    """Base: strict types, unknown keys rejected with a suggestion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False)

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = [name for name in cls.model_fields if not name.startswith("_")]
            hidden = _COMPUTED_KEYS if cls.__name__ == "Manifest" else ()
            for key in data:
                if str(key) not in allowed:
                    choices = [a for a in allowed if a not in hidden]
                    raise _fail(f"unknown key '{key}'{did_you_mean(str(key), choices)}", str(key))
        elif data is not None and not isinstance(data, BaseModel):
            raise _fail(f"expected a mapping of keys, got {_kind(data)}")
        return data


# --------------------------------------------------------------------------- models


class Limits(_Strict):
    """How fast and how much: rate limits, concurrency, retries, timeouts, the size guard."""

    submits_per_minute: float | None = Field(default=None, gt=0)
    requests_per_second: float | None = Field(default=None, gt=0)
    max_in_flight: int = Field(default=8, ge=1)
    max_attempts: int = Field(default=5, ge=1)
    job_timeout: Duration = 1800.0
    on_ambiguous_submit: Literal["park", "retry"] = "park"
    max_jobs: int = Field(default=100_000, ge=1)
    poll_interval: OptionalDuration = None


class Budget(_Strict):
    """Spending cap: never submit a job whose estimated cost would pass ``max_usd``."""

    max_usd: float | None = Field(default=None, ge=0)


class SimulatorSettings(_Strict):
    """The embedded simulator's settings, used when ``provider: simulator``."""

    workers: int = Field(default=8, ge=1)
    latency: str = "0.5-1.5s"
    seed: int = 0
    image_mode: Literal["full", "small"] = "small"
    #: fault name → value as written (``0.05``, ``"5%"``, ``"2s"``); checked at load time by the
    #: simulator's own parser (``Faults.from_dict``), which the simulator applies again at start
    faults: dict[str, float | str | None] = Field(default_factory=dict)

    @field_validator("latency", mode="before")
    @classmethod
    def _latency(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = f"{value}s"
        if isinstance(value, str):
            try:
                parse_duration_range(value)
            except ValueError as exc:
                raise _fail(str(exc)) from None
        return value

    @field_validator("faults", mode="before")
    @classmethod
    def _faults_numbers(cls, value: Any) -> Any:
        if isinstance(value, dict):
            # YAML ints are numbers too (strict mode would refuse an int for a float)
            return {
                k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                for k, v in value.items()
            }
        return value

    @field_validator("faults")
    @classmethod
    def _faults_known(cls, value: dict[str, float | str | None]) -> dict[str, float | str | None]:
        if not value:
            return value
        # imported here: the simulator package is only needed when a manifest sets faults
        from .simulator.config import Faults

        for name, item in value.items():
            try:
                Faults.from_dict({name: item})
            except (ValueError, TypeError) as exc:
                raise _fail(str(exc), str(name)) from None
        try:
            Faults.from_dict(dict(value))
        except (ValueError, TypeError) as exc:
            raise _fail(str(exc)) from None
        return value

    @property
    def latency_range(self) -> tuple[float, float]:
        """``latency`` as (low, high) seconds."""
        return parse_duration_range(self.latency)


class DownloadSettings(_Strict):
    """How outputs are fetched: size cap, timeout, parallel downloads."""

    max_bytes: int = Field(default=200_000_000, ge=1)
    timeout: Duration = 120.0
    concurrency: int = Field(default=8, ge=1)


def _resolve_against_base(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise _fail("a path cannot be empty")
        if "\0" in value:
            raise _fail("a path cannot contain a NUL character")
        base = Path((info.context or {}).get("base_dir", "."))
        return (base / Path(value).expanduser()).resolve()
    return value


class SampleSpec(_Strict):
    """A reproducible random subset: ``n`` rows drawn with ``seed``."""

    n: int = Field(ge=0)
    seed: int = 0


class PromptFile(_Strict):
    """Prompts from a file: ``.txt`` (one a line) or ``.csv``/``.tsv``/``.jsonl`` (one a row)."""

    file: Path
    column: str | None = None
    where: dict[str, str | int | float | bool | list[str | int | float | bool]] | None = None
    limit: int | None = Field(default=None, ge=0)
    sample: SampleSpec | None = None
    #: expand ``{a|b}`` / ``__wildcard__`` syntax in the file's prompts
    template: bool = True

    @field_validator("file", mode="before")
    @classmethod
    def _file(cls, value: Any, info: ValidationInfo) -> Any:
        path = _resolve_against_base(value, info)
        if isinstance(path, Path):
            if path.suffix.lower() not in PROMPT_FILE_SUFFIXES:
                raise _fail(
                    f"prompt files are {', '.join(PROMPT_FILE_SUFFIXES)}; got {path.name!r}"
                )
            if not path.exists():
                raise _fail(f"prompt file not found: {path}")
            if not path.is_file():
                raise _fail(f"not a file: {path}")
        return path

    @model_validator(mode="after")
    def _columns_only_for_tables(self) -> PromptFile:
        if self.file.suffix.lower() == ".txt":
            for key in ("column", "where"):
                if getattr(self, key) is not None:
                    raise _fail(f"'{key}' applies to .csv/.tsv/.jsonl files, not .txt", key)
        return self


class PromptText(_Strict):
    """An inline prompt with options: ``{text: "...", template: false}`` sends it as written."""

    text: str
    template: bool = True


def _prompt_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "PromptText" if "text" in value and "file" not in value else "PromptFile"
    if isinstance(value, (PromptFile, PromptText)):
        return type(value).__name__
    return "str"


PromptSource = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[PromptFile, Tag("PromptFile")]
    | Annotated[PromptText, Tag("PromptText")],
    Discriminator(_prompt_kind),
]

#: loc elements pydantic adds for union branches (not keys of the data)
_UNION_TAGS = frozenset({"str", "PromptFile", "PromptText"})


class Sweep(_Strict):
    """One expansion: prompts x grid product (minus exclude) x repeat, on one model."""

    name: Name | None = None
    model: str = Field(min_length=1)
    prompts: list[PromptSource] = Field(min_length=1)
    grid: dict[str, GridAxis] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    repeat: int = Field(default=1, ge=1)
    exclude: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, value: list[Any]) -> list[Any]:
        for index, item in enumerate(value):
            text = item if isinstance(item, str) else getattr(item, "text", None)
            if text is not None and not text.strip():
                raise _fail("a prompt cannot be empty", f"[{index}]")
        return value

    @field_validator("params", "grid")
    @classmethod
    def _no_prompt_param(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "prompt" in value:
            raise _fail("the prompt comes from `prompts`; remove `prompt` here", "prompt")
        return value

    @model_validator(mode="after")
    def _excludes(self) -> Sweep:
        for index, entry in enumerate(self.exclude):
            if not entry:
                raise _fail("an empty exclude entry would exclude every cell", f"exclude[{index}]")
            for key, wanted in entry.items():
                axis = self.grid.get(key)
                if axis is None:
                    raise _fail(
                        f"'{key}' is not a grid axis of this sweep"
                        f"{did_you_mean(str(key), list(self.grid))}",
                        f"exclude[{index}].{key}",
                    )
                if not _axis_contains(axis, wanted):
                    raise _fail(
                        f"{wanted!r} is not a value of grid axis '{key}', so this exclude "
                        "matches no cell (a typo?)",
                        f"exclude[{index}].{key}",
                    )
        return self

    def label(self, index: int) -> str:
        """The sweep's name, else ``sweep-<1-based index>``."""
        return self.name or f"sweep-{index + 1}"


def _axis_contains(axis: Sequence[Any], value: Any) -> bool:
    if isinstance(axis, range):
        return isinstance(value, int) and not isinstance(value, bool) and value in axis
    key = _canonical(value)
    return any(_canonical(item) == key for item in axis)


PriceTable = float | dict[str, float]


class Manifest(_Strict):
    """A whole batch as the user wrote it, validated, with every path absolute."""

    path: Path
    base_dir: Path
    hash: str
    version: int = 1
    name: Name
    provider: Literal["runcomfy", "simulator"] = "runcomfy"
    output: Path
    state: Path
    #: folder of ``__name__`` wildcard files (``name.txt``); default ``wildcards/`` beside the
    #: manifest (load_manifest always sets it)
    wildcards: Path | None = None
    strict: bool = False
    limits: Limits = Field(default_factory=Limits)
    budget: Budget = Field(default_factory=Budget)
    prices: dict[str, PriceTable] = Field(default_factory=dict)
    defaults: dict[str, Any] = Field(default_factory=dict)
    sweeps: list[Sweep] = Field(min_length=1)
    simulator: SimulatorSettings = Field(default_factory=SimulatorSettings)
    download: DownloadSettings = Field(default_factory=DownloadSettings)

    _lines: dict[str, int] = PrivateAttr(default_factory=dict)
    _shown: str = PrivateAttr(default="")
    #: per-manifest memo of loaded prompts (plan.py), so `plan` reads each file once
    _cache: dict[Any, Any] = PrivateAttr(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != 1:
            raise _fail(f"unsupported manifest version {value}; this batchgen reads version 1")
        return value

    @field_validator("prices", mode="before")
    @classmethod
    def _prices(cls, value: Any) -> Any:
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for model, price in value.items():
                if isinstance(price, int) and not isinstance(price, bool):
                    price = float(price)
                elif isinstance(price, dict):
                    price = {
                        str(k): float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                        for k, v in price.items()
                    }
                out[model] = price
            return out
        return value

    @field_validator("prices")
    @classmethod
    def _prices_positive(cls, value: dict[str, PriceTable]) -> dict[str, PriceTable]:
        for model, price in value.items():
            items = price.items() if isinstance(price, dict) else [("", price)]
            for key, amount in items:
                if amount < 0:
                    raise _fail(
                        f"a price cannot be negative, got {amount:g}",
                        f"{model}.{key}" if key else model,
                    )
        return value

    @model_validator(mode="after")
    def _unique_sweep_names(self) -> Manifest:
        seen: dict[str, int] = {}
        for index, sweep in enumerate(self.sweeps):
            label = sweep.label(index)
            if label in seen:
                raise _fail(
                    f"sweep name '{label}' is used twice (also sweeps[{seen[label]}])",
                    f"sweeps[{index}].name",
                )
            seen[label] = index
        return self

    # -- lines -----------------------------------------------------------------------------

    def line_of(self, key: str) -> int | None:
        """Line of ``key`` (a dotted path) in the file, else of its nearest present parent."""
        return _line(self._lines, key)

    def has_key(self, key: str) -> bool:
        """Whether the file itself writes ``key`` (a dotted path)."""
        return key in self._lines

    @property
    def shown_path(self) -> str:
        """The manifest's path as the user gave it (what messages name)."""
        return self._shown or str(self.path)

    def issue(
        self, key: str, message: str, count: int = 1, line: int | None = None
    ) -> ManifestIssue:
        """A ManifestIssue located at ``key`` in this manifest."""
        return ManifestIssue(self.shown_path, line or self.line_of(key), key, message, count)

    def error(self, key: str, message: str) -> ManifestError:
        """A ManifestError for one problem at ``key``."""
        return ManifestError(self.issue(key, message))

    def sweep_label(self, index: int) -> str:
        """The label of ``sweeps[index]`` (its name, else ``sweep-<n>``)."""
        return self.sweeps[index].label(index)


# --------------------------------------------------------------------------- loading


def default_state_path(name: str) -> Path:
    """``$BATCHGEN_STATE_DIR/<name>.db`` when the env var is set, else ``state/<name>.db``."""
    folder = os.environ.get(STATE_DIR_ENV)
    return (Path(folder) if folder else Path("state")).expanduser().resolve() / f"{name}.db"


def _loc_to_path(loc: Sequence[str | int], data: Any) -> list[str | int]:
    """Keep the loc elements that are real keys/indexes of ``data`` (drop union tags)."""
    parts: list[str | int] = []
    node = data
    for index, element in enumerate(loc):
        in_dict = isinstance(node, dict) and element in node
        in_list = isinstance(node, list) and isinstance(element, int) and 0 <= element < len(node)
        if in_dict or in_list:
            node = node[element]
            parts.append(element)
        elif element in _UNION_TAGS or (isinstance(element, int) and isinstance(node, dict)):
            continue
        else:
            # a missing key or a key the data does not hold: name it, stop walking
            parts.extend(loc[index : index + 1])
            break
    return parts


def _message(err: Any) -> tuple[str, str]:
    """(our message, extra subpath) for one pydantic error dict."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "batchgen":
        return str(ctx["message"]), str(ctx.get("subpath", ""))
    if kind == "missing":
        return f"missing required key '{err['loc'][-1]}'", ""
    if kind == "extra_forbidden":
        return f"unknown key '{err['loc'][-1]}'", ""
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected an integer, got {_kind(value)}", ""
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {_kind(value)}", ""
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {_kind(value)}", ""
    if kind in ("string_type",):
        return f"expected a string, got {_kind(value)}", ""
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping of keys, got {_kind(value)}", ""
    if kind in ("list_type",):
        return f"expected a list, got {_kind(value)}", ""
    if kind in ("is_instance_of", "path_type"):
        return f"expected a path (a string), got {_kind(value)}", ""
    if kind == "literal_error":
        return f"{value!r} is not one of {ctx.get('expected', '')}".replace("'", "'"), ""
    if kind == "too_short":
        if ctx.get("min_length") == 1 and isinstance(value, (list, dict)):
            return f"cannot be empty (got {_kind(value)} with no items)", ""
        return f"needs at least {ctx.get('min_length')} item(s)", ""
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {
            "greater_than": ">",
            "greater_than_equal": "≥",
            "less_than": "<",
            "less_than_equal": "≤",
        }[kind]
        bound = next(iter(ctx.values()), "")
        return f"must be {sign} {bound}, got {value!r}", ""
    return f"{err['msg']} (got {_kind(value)})", ""


def _issues_from(
    exc: ValidationError, data: Any, file: str, lines: dict[str, int]
) -> list[ManifestIssue]:
    issues: dict[tuple[str, str], ManifestIssue] = {}
    for err in exc.errors(include_url=False):
        message, subpath = _message(err)
        parts = _loc_to_path(err["loc"], data)
        key = _path_str(parts)
        if subpath:
            key = f"{key}{subpath}" if subpath.startswith("[") or not key else f"{key}.{subpath}"
        line = _line(lines, key)
        issue = ManifestIssue(file, line, key, message)
        issues.setdefault((key, message), issue)
    return sorted(issues.values(), key=lambda i: (i.line or 0, i.key))


def _line(lines: dict[str, int], key: str) -> int | None:
    probe = key
    while probe:
        if probe in lines:
            return lines[probe]
        cut = max(probe.rfind("."), probe.rfind("["))
        probe = probe[:cut] if cut > 0 else ""
    # a missing top-level key: point at the start of the document
    return min(lines.values()) if lines else None


def load_manifest(path: str | Path) -> Manifest:
    """Read, parse and validate a manifest file. Raises ManifestError (exit code 2)."""
    path = Path(path).expanduser()
    absolute = path.resolve()
    data, lines, raw = _read_yaml(path)
    shown = str(path)
    for computed in _COMPUTED_KEYS:
        if computed in data:
            raise ManifestError.at(
                shown,
                lines.get(computed),
                computed,
                f"unknown key '{computed}' (it is computed by batchgen)",
            )
    name = data.get("name")
    full = dict(data)
    full.update(path=absolute, base_dir=absolute.parent, hash=hashlib.sha256(raw).hexdigest())
    valid_name = isinstance(name, str) and bool(_NAME.match(name))
    for key, default in (("output", f"out/{name}"), ("state", None)):
        value = full.get(key)
        if isinstance(value, str) and value.strip() and "\0" not in value:
            full[key] = Path(value).expanduser().resolve()
        elif value is None and valid_name:
            full[key] = Path(default).resolve() if default else default_state_path(str(name))
        elif value is None:
            full[key] = Path("invalid-name").resolve()  # the name error is reported instead
    wildcards = full.get("wildcards", "wildcards")
    if isinstance(wildcards, str) and wildcards.strip():
        full["wildcards"] = (absolute.parent / wildcards).resolve()
    try:
        manifest = Manifest.model_validate(full, context={"base_dir": absolute.parent})
    except ValidationError as exc:
        raise ManifestError(_issues_from(exc, data, shown, lines)) from None
    manifest._lines = lines
    manifest._shown = shown
    return manifest
