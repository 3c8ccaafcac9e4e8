"""The client README's table of the Python zae-limiter 0.17's names: every name it says is the
same is importable from this package, and the table names each of the library's public names."""

from __future__ import annotations

import importlib
import importlib.metadata
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[3]

#: `zae_limiter.__all__` of the Python zae-limiter 0.17.0.
LIBRARY = (
    "__version__ RateLimiter Repository RepositoryBuilder RepositoryProtocol Lease StackManager "
    "SyncRateLimiter SyncRepository SyncRepositoryBuilder SyncRepositoryProtocol SyncLease "
    "SyncConfigCache SyncStackManager Availability BucketOperationResult Limit LimiterInfo "
    "LimitName Entity LimitStatus BucketState UsageSnapshot UsageSummary ResourceCapacity "
    "EntityCapacity StackOptions BackendCapabilities Status CacheStats ConfigSource ScheduleEntry "
    "AuditEvent AuditAction OnUnavailable ZAELimiterError RateLimitError InfrastructureError "
    "EntityError VersionError RateLimitExceeded LeaseExpiredError EntityNotFoundError "
    "EntityExistsError RateLimiterUnavailable PermissionDenied StackOperationError "
    "StackAlreadyExistsError InfrastructureNotFoundError NamespaceNotFoundError "
    "NamespaceStateError VersionMismatchError IncompatibleSchemaError ValidationError "
    "InvalidIdentifierError InvalidNameError FanoutIncomplete ResourceDisabled"
).split()


def table() -> dict[str, str]:
    """Each name of the table, with what it says of it."""
    text = (REPO / "clients/python/README.md").read_text()
    section = text.split("## The Python zae-limiter 0.17's names, and ours", 1)[1]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[1] != "here":
            for name in re.findall(r"`([A-Za-z_]+)`", cells[0]):
                rows[name] = cells[1]
    return rows


def test_the_table_names_every_public_name_of_the_library_once():
    rows = table()
    assert sorted(rows) == sorted(LIBRARY)
    assert set(rows.values()) <= {"same", "differs", "not yet", "not applicable"}


def test_every_name_the_table_says_is_ours_is_importable():
    package = importlib.import_module("zae_limiter_client")
    ours = [name for name, said in table().items() if said in ("same", "differs")]
    assert ours, "the table says something is the same"
    missing = [name for name in ours if not hasattr(package, name)]
    assert missing == []
    for name in ours:
        assert name in package.__all__, name


def test_the_version_and_the_limit_names_are_the_library_s():
    import zae_limiter_client as z

    assert z.__version__ == importlib.metadata.version("zae-limiter-client")
    assert (z.LimitName.RPM, z.LimitName.TPM, z.LimitName.TPD) == ("rpm", "tpm", "tpd")


#: (name, its base) of the exceptions of the Python zae-limiter 0.17.0 that the table says are
#: the same (its exceptions.py).
LIBRARY_BASES = [
    ("RateLimitError", "ZAELimiterError"),
    ("InfrastructureError", "ZAELimiterError"),
    ("EntityError", "ZAELimiterError"),
    ("RateLimitExceeded", "RateLimitError"),
    ("LeaseExpiredError", "RateLimitError"),
    ("RateLimiterUnavailable", "InfrastructureError"),
    ("PermissionDenied", "RateLimiterUnavailable"),
    ("EntityNotFoundError", "EntityError"),
    ("EntityExistsError", "EntityError"),
    ("ValidationError", "ZAELimiterError"),
    ("InvalidIdentifierError", "ValidationError"),
    ("InvalidNameError", "ValidationError"),
    ("ResourceDisabled", "ZAELimiterError"),
]


def test_the_exceptions_are_ranked_as_the_library_s():
    import zae_limiter_client as z

    for name, base in LIBRARY_BASES:
        assert issubclass(getattr(z, name), getattr(z, base)), (name, base)
