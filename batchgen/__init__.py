"""batchgen: turn one YAML manifest into thousands of generated images, resumably.

The public API, in the order a run uses it: load a manifest, expand it into jobs, sync them into
the state, and drive them through a provider under rate limits. The simulator lives in
``batchgen.simulator`` (imported on demand: it pulls in the web server).
"""

__version__ = "0.1.0"

from .errors import (
    AmbiguousSubmitError,
    BatchgenError,
    DownloadError,
    ExpiredURLError,
    FatalProviderError,
    JobRejectedError,
    ManifestError,
    ProviderError,
    RateLimitedError,
    StateLockedError,
    StoreError,
    TransientError,
)
from .limits import RateLimiter
from .manifest import Manifest, load_manifest
from .plan import JobSpec, expand, iter_jobs
from .providers import get_provider, register
from .providers.base import Provider
from .registry import ModelRegistry, ModelSpec
from .runner import Runner, RunSummary
from .store import Job, JobState, Output, Store

__all__ = [
    "AmbiguousSubmitError",
    "BatchgenError",
    "DownloadError",
    "ExpiredURLError",
    "FatalProviderError",
    "Job",
    "JobRejectedError",
    "JobSpec",
    "JobState",
    "Manifest",
    "ManifestError",
    "ModelRegistry",
    "ModelSpec",
    "Output",
    "Provider",
    "ProviderError",
    "RateLimitedError",
    "RateLimiter",
    "RunSummary",
    "Runner",
    "StateLockedError",
    "Store",
    "StoreError",
    "TransientError",
    "__version__",
    "expand",
    "get_provider",
    "iter_jobs",
    "load_manifest",
    "register",
]
