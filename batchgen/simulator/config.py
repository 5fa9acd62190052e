"""Settings of the simulator: its queue, its images and the faults it injects.

Three front ends fill the same two dataclasses: Python (``SimulatorConfig(...)``), the command
line (``batchgen simulate`` / ``python -m batchgen.simulator``, one flag per field of
:data:`FAULT_OPTIONS`) and the manifest (``simulator: {workers, latency, seed, image_mode,
faults: {...}}`` through :meth:`SimulatorConfig.from_dict`). Invariants, checked on construction:

- every fault is off by default; probabilities are in [0, 1] and the per-call ones
  (``http_429``, ``http_429_retry_after``, ``http_5xx``, ``drop_connection``, ``slow_response``)
  sum to at most 1, since one draw picks at most one of them per call;
- durations are seconds (floats) after parsing, whatever unit the user typed;
- ``latency`` is a ``(low, high)`` pair with ``0 <= low <= high``; a fixed latency has low == high.
"""

from __future__ import annotations

import difflib
import secrets
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ..units import parse_duration, parse_duration_range

ImageMode = Literal["full", "small"]
FailedStatus = Literal["completed", "failed"]

#: how a fault's value is read: a probability, a duration, or a rate (calls per second)
FaultKind = Literal["probability", "seconds", "rate"]


@dataclass(frozen=True)
class FaultOption:
    """One fault setting as users see it: name (snake_case, the manifest key), kind and help."""

    name: str
    kind: FaultKind
    help: str

    @property
    def flag(self) -> str:
        """The command-line flag: ``--http-429-retry-after`` for ``http_429_retry_after``."""
        return "--" + self.name.replace("_", "-")


#: every fault field, in the order flags and docs list them
FAULT_OPTIONS: tuple[FaultOption, ...] = (
    FaultOption("http_429", "probability", "probability per API call of a 429 without Retry-After"),
    FaultOption(
        "http_429_retry_after", "probability", "probability per API call of a 429 with Retry-After"
    ),
    FaultOption("retry_after", "seconds", "Retry-After sent by http_429_retry_after (default 1s)"),
    FaultOption("http_5xx", "probability", "probability per API call of a 500 (error_code 500001)"),
    FaultOption(
        "drop_connection",
        "probability",
        "probability per API call that the connection closes with no answer (no effect)",
    ),
    FaultOption(
        "slow_response",
        "probability",
        "probability per API call that the answer is held back by slow_response_delay",
    ),
    FaultOption("slow_response_delay", "seconds", "delay of a slow response (default 30s)"),
    FaultOption(
        "lost_submit",
        "probability",
        "probability that a submit creates the job, then drops the connection unanswered",
    ),
    FaultOption("job_failure", "probability", "probability that a job ends `failed`"),
    FaultOption(
        "truncated_download",
        "probability",
        "probability that a file download is cut off halfway through its body",
    ),
    FaultOption(
        "url_ttl", "seconds", "result URLs expire this long after the result call (403 after)"
    ),
    FaultOption(
        "rate_limit_rps",
        "rate",
        "API calls per second allowed per token, any 1-second window; 429 + Retry-After beyond",
    ),
)

_FAULT_NAMES = tuple(option.name for option in FAULT_OPTIONS)
#: faults drawn with one random number per API call: at most one of them fires
PER_CALL_FAULTS = (
    "http_429",
    "http_429_retry_after",
    "http_5xx",
    "drop_connection",
    "slow_response",
)


@dataclass(frozen=True)
class Faults:
    """The faults the simulator injects; all off by default.

    Probabilities are per call (API faults), per job (``job_failure``) or per download
    (``truncated_download``). Faults other than ``lost_submit`` and ``slow_response`` are drawn
    before the call has any effect: a submit answered 429, 500 or dropped created no job.
    """

    http_429: float = 0.0
    http_429_retry_after: float = 0.0
    retry_after: float = 1.0
    http_5xx: float = 0.0
    drop_connection: float = 0.0
    slow_response: float = 0.0
    slow_response_delay: float = 30.0
    lost_submit: float = 0.0
    job_failure: float = 0.0
    truncated_download: float = 0.0
    url_ttl: float | None = None
    rate_limit_rps: float | None = None

    def __post_init__(self) -> None:
        for option in FAULT_OPTIONS:
            value = getattr(self, option.name)
            if option.kind == "probability" and not 0.0 <= value <= 1.0:
                raise ValueError(f"fault {option.name}: a probability is in [0, 1], got {value!r}")
            if option.kind == "seconds" and value is not None and value < 0:
                raise ValueError(f"fault {option.name}: a duration cannot be negative")
            if option.kind == "rate" and value is not None and value <= 0:
                raise ValueError(f"fault {option.name}: a rate must be above 0, got {value!r}")
        total = sum(getattr(self, name) for name in PER_CALL_FAULTS)
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"faults {', '.join(PER_CALL_FAULTS)} are drawn once per call and sum to "
                f"{total:g}; their sum must be at most 1"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Faults:
        """Faults from a plain dict (the manifest's ``simulator.faults``), values parsed.

        Probabilities take ``0.05`` or ``"5%"``; durations ``2``, ``"2s"``, ``"500ms"``; rates a
        number. Unknown names raise ``ValueError`` naming the closest known one.
        """
        values: dict[str, Any] = {}
        for name, raw in data.items():
            option = _option(name)
            values[option.name] = parse_fault_value(option, raw)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The non-default faults, as ``from_dict`` reads them back."""
        default = Faults()
        return {
            name: value for name, value in asdict(self).items() if value != getattr(default, name)
        }

    @property
    def active(self) -> bool:
        """Whether any fault is on."""
        return bool(self.to_dict().keys() - {"retry_after", "slow_response_delay"})


def _option(name: str) -> FaultOption:
    key = str(name).replace("-", "_")
    for option in FAULT_OPTIONS:
        if option.name == key:
            return option
    close = difflib.get_close_matches(key, _FAULT_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(_FAULT_NAMES)})"
    raise ValueError(f"unknown simulator fault {name!r}{hint}")


def parse_fault_value(option: FaultOption, raw: Any) -> float | None:
    """The value of one fault from what a user typed (see :meth:`Faults.from_dict`)."""
    if raw is None:
        if option.kind == "probability":
            raise ValueError(f"fault {option.name}: expected a probability, got null")
        return None
    if isinstance(raw, bool):
        raise ValueError(f"fault {option.name}: expected a number, got {raw!r}")
    try:
        if option.kind == "seconds":
            return parse_duration(raw)
        if isinstance(raw, str) and option.kind == "probability" and raw.strip().endswith("%"):
            return float(raw.strip()[:-1]) / 100.0
        return float(raw)
    except ValueError as exc:
        expected = {"probability": "a probability like 0.05 or 5%", "rate": "a number"}
        if option.kind == "seconds":
            raise ValueError(f"fault {option.name}: {exc}") from None
        raise ValueError(
            f"fault {option.name}: expected {expected[option.kind]}, got {raw!r}"
        ) from None


def parse_latency(value: tuple[float, float] | list[float] | str | float) -> tuple[float, float]:
    """``(low, high)`` seconds from ``"1-5s"``, ``"500ms"``, ``2`` or a ``(low, high)`` pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"latency: expected (low, high) seconds, got {value!r}")
        low, high = (parse_duration(v) for v in value)
        if low > high:
            raise ValueError(f"latency: {low:g}s is above {high:g}s")
        return low, high
    try:
        return parse_duration_range(value)
    except ValueError as exc:
        raise ValueError(f"latency: {exc}") from None


@dataclass
class SimulatorConfig:
    """How a simulator behaves.

    :param token: the bearer token it accepts; ``None`` generates one (``secrets``)
    :param workers: requests that run at once (the virtual GPUs); the rest wait ``in_queue``
    :param latency: run time of one request, seconds: ``(low, high)`` drawn uniformly, a fixed
        number, or a string such as ``"1-5s"`` / ``"500ms"``; stored as a ``(low, high)`` pair
    :param seed: seeds request ids, run times, job failures and faults, so that a sequence of
        calls made in the same order gets the same answers
    :param image_mode: ``"full"`` serves images at the size the parameters ask for; ``"small"``
        the same format and aspect ratio with the longest side ``small_side`` (for benchmarks)
    :param host: interface to listen on
    :param port: port to listen on; 0 picks a free one
    :param faults: a :class:`Faults` or a dict of fault names to values
    :param rate_limit_rps: shortcut for ``faults.rate_limit_rps``
    :param failed_status: what ``/status`` says for a failed job (the spec infers ``completed``)
    :param small_side: longest side of images in ``small`` mode
    :param image_cache_bytes: rendered images kept in memory (LRU), bytes
    :param price_per_image: ``cost`` reported per image by ``?include_cost=true`` for models
        without a built-in simulated price
    """

    token: str | None = None
    workers: int = 8
    latency: tuple[float, float] | str | float = (0.5, 1.5)
    seed: int = 0
    image_mode: ImageMode = "full"
    host: str = "127.0.0.1"
    port: int = 0
    faults: Faults | dict[str, Any] = field(default_factory=Faults)
    rate_limit_rps: float | None = None
    failed_status: FailedStatus = "completed"
    small_side: int = 256
    image_cache_bytes: int = 64 * 1024 * 1024
    price_per_image: float = 0.05

    def __post_init__(self) -> None:
        if self.token is None:
            self.token = secrets.token_urlsafe(24)
        if not self.token or any(c.isspace() for c in self.token):
            raise ValueError("token: must be non-empty and contain no whitespace")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers: expected an integer ≥ 1, got {self.workers!r}")
        self.latency = parse_latency(self.latency)
        if self.image_mode not in ("full", "small"):
            raise ValueError(f"image_mode: expected 'full' or 'small', got {self.image_mode!r}")
        if self.failed_status not in ("completed", "failed"):
            raise ValueError(
                f"failed_status: expected 'completed' or 'failed', got {self.failed_status!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535, got {self.port!r}")
        if self.small_side < 16:
            raise ValueError(f"small_side: expected at least 16 pixels, got {self.small_side!r}")
        faults = Faults.from_dict(self.faults) if isinstance(self.faults, dict) else self.faults
        # rate_limit_rps lives in Faults (so the manifest's faults map 1:1) and on the config
        # (the documented shortcut): keep the two in step.
        if self.rate_limit_rps is not None:
            if faults.rate_limit_rps not in (None, self.rate_limit_rps):
                raise ValueError(
                    f"rate_limit_rps given twice: {self.rate_limit_rps!r} and "
                    f"faults.rate_limit_rps {faults.rate_limit_rps!r}"
                )
            faults = Faults(**{**asdict(faults), "rate_limit_rps": float(self.rate_limit_rps)})
        self.rate_limit_rps = faults.rate_limit_rps
        self.faults = faults

    @property
    def fault_settings(self) -> Faults:
        """The faults, typed (``faults`` is always a :class:`Faults` after construction)."""
        assert isinstance(self.faults, Faults)
        return self.faults

    @property
    def latency_range(self) -> tuple[float, float]:
        """``(low, high)`` run time in seconds."""
        assert isinstance(self.latency, tuple)
        return self.latency

    @property
    def api_token(self) -> str:
        """The token (always set after construction)."""
        assert self.token is not None
        return self.token

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulatorConfig:
        """A config from plain values (the manifest's ``simulator`` block or JSON).

        Unknown keys raise ``ValueError`` naming the closest known one.
        """
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown simulator setting {key!r}{hint}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values that :meth:`from_dict` turns back into this config."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["latency"] = list(self.latency_range)
        data["faults"] = self.fault_settings.to_dict()
        data.pop("rate_limit_rps")  # carried by faults
        return data


def config_from_flags(values: dict[str, Any]) -> SimulatorConfig:
    """A config from command-line values as typed (strings; ``None`` = flag not given).

    Keys: the :class:`SimulatorConfig` field names, ``fail_rate`` (alias of the ``job_failure``
    fault) and every fault name. Shared by ``batchgen simulate`` and ``python -m
    batchgen.simulator`` so that both read flags the same way.
    """
    settings: dict[str, Any] = {}
    faults: dict[str, Any] = {}
    for key, raw in values.items():
        if raw is None:
            continue
        if key == "fail_rate":
            if values.get("job_failure") not in (None, raw):
                raise ValueError("--fail-rate and --job-failure disagree: give one of them")
            key = "job_failure"
        if key in _FAULT_NAMES:
            faults[key] = raw
        elif key in ("workers", "seed", "port", "small_side"):
            settings[key] = int(raw)
        else:
            settings[key] = raw
    settings["faults"] = Faults.from_dict(faults)
    return SimulatorConfig(**settings)
