"""Python client of the zae-limiter daemon.

The API follows the Python zae-limiter (``zae_limiter``), so moving an application over means
changing how the limiter is built::

    from zae_limiter_client import Limit, RateLimiter, RateLimitExceeded

    limiter = RateLimiter()  # $ZAE_LIMITER_SOCKET, else /tmp/zae-limiter.sock
    async with limiter.acquire(
        "api-key-123", "gpt-4", {"rpm": 1, "tpm": 500},
        limits=[Limit.per_minute("rpm", 100), Limit.per_minute("tpm", 10_000)],
    ) as lease:
        response = await call_llm()
        await lease.adjust(tpm=response.usage.total_tokens - 500)
"""

import importlib.metadata

from ._client import (
    DEFAULT_SOCKET,
    DEFAULT_TIMEOUT,
    Lease,
    RateLimiter,
    SyncLease,
    SyncRateLimiter,
)
from ._errors import (
    EntityError,
    EntityExistsError,
    EntityNotFoundError,
    FailedPrecondition,
    InfrastructureError,
    InvalidIdentifierError,
    InvalidNameError,
    LeaseExpiredError,
    LeaseNotFound,
    NotFound,
    PermissionDenied,
    RateLimitError,
    RateLimiterUnavailable,
    RateLimitExceeded,
    ResourceDisabled,
    ValidationError,
    ZAELimiterError,
)
from ._models import (
    AuditAction,
    AuditEvent,
    AuditPage,
    Availability,
    BucketOperationResult,
    Entity,
    EntityCapacity,
    Limit,
    LimitName,
    LimitStatus,
    OnUnavailable,
    ResourceCapacity,
    ScheduleEntry,
    UsageSnapshot,
    UsageSummary,
)

try:
    __version__ = importlib.metadata.version("zae-limiter-client")
except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "DEFAULT_SOCKET",
    "DEFAULT_TIMEOUT",
    "AuditAction",
    "AuditEvent",
    "AuditPage",
    "Availability",
    "BucketOperationResult",
    "Entity",
    "EntityCapacity",
    "EntityError",
    "EntityExistsError",
    "EntityNotFoundError",
    "FailedPrecondition",
    "InfrastructureError",
    "InvalidIdentifierError",
    "InvalidNameError",
    "Lease",
    "LeaseExpiredError",
    "LeaseNotFound",
    "Limit",
    "LimitName",
    "LimitStatus",
    "NotFound",
    "OnUnavailable",
    "PermissionDenied",
    "RateLimitError",
    "RateLimitExceeded",
    "RateLimiter",
    "RateLimiterUnavailable",
    "ResourceCapacity",
    "ResourceDisabled",
    "ScheduleEntry",
    "SyncLease",
    "SyncRateLimiter",
    "UsageSnapshot",
    "UsageSummary",
    "ValidationError",
    "ZAELimiterError",
]
