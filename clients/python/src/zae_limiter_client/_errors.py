"""The package's exceptions. Every failure of a call is one of these, carrying the daemon's message;
no raw gRPC exception leaves the package."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from ._models import LimitStatus


class ZAELimiterError(Exception):
    """Base of every exception of this package. ``code`` is the daemon's gRPC status name (for
    example ``"INVALID_ARGUMENT"``) when the daemon answered, else ``None``."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class RateLimitError(ZAELimiterError):
    """Base of the refusals by the limits (``RateLimitExceeded``) and of a lease used after its
    block (``LeaseExpiredError``), as the Python zae-limiter's."""


class InfrastructureError(ZAELimiterError):
    """Base of ``RateLimiterUnavailable`` (and so ``PermissionDenied``), as the Python
    zae-limiter's."""


class EntityError(ZAELimiterError):
    """Base of ``EntityNotFoundError`` and ``EntityExistsError``, as the Python zae-limiter's."""


class RateLimitExceeded(RateLimitError):
    """The daemon refused: one or more limits would be exceeded. Nothing was consumed.

    ``statuses`` has every limit checked, ``violations`` the exceeded ones and ``passed`` the
    others. ``retry_after_seconds`` is the longest wait over the violations, ``None`` when the
    request can never fit (it asks more than a limit's capacity). ``refused_by`` is the cascade
    parent whose limits refused (the statuses are then the parent's), else ``None``. With
    ``acquire(also=...)``, ``statuses`` has every resource's limits (each status names its
    resource) and ``refused_resource`` the first resource refused. ``contended`` is the
    library's flag for a refusal by write contention rather than by the limits; the daemon retries
    contention itself, so it is always ``False`` here.
    """

    contended: bool = False

    def __init__(
        self,
        statuses: Sequence[LimitStatus],
        *,
        retry_after_seconds: float | None,
        refused_by: str | None = None,
        refused_resource: str | None = None,
    ) -> None:
        self.statuses = list(statuses)
        self.violations = [s for s in self.statuses if s.exceeded]
        self.passed = [s for s in self.statuses if not s.exceeded]
        self.retry_after_seconds = retry_after_seconds
        self.refused_by = refused_by
        self.refused_resource = refused_resource
        waits = [s for s in self.violations if s.retry_after_seconds is not None]
        self.primary_violation = (
            max(waits, key=lambda s: s.retry_after_seconds or 0.0)
            if waits and len(waits) == len(self.violations)
            else (self.violations[0] if self.violations else None)
        )
        super().__init__(self._describe())

    def _describe(self) -> str:
        names = ", ".join(s.limit_name for s in self.violations) or "?"
        first = self.statuses[0] if self.statuses else None
        where = f"{first.entity_id}/{first.resource}" if first else "?"
        by = f" (refused by cascade parent {self.refused_by})" if self.refused_by else ""
        if self.retry_after_seconds is None:
            wait = "the request is larger than a limit's capacity and can never fit"
        else:
            wait = f"retry after {self.retry_after_seconds:.3f}s"
        return f"rate limit exceeded for {where}{by}: [{names}]; {wait}"

    @property
    def never_fits(self) -> bool:
        """Whether the request asks more than a limit's capacity: no wait makes it fit."""
        return self.retry_after_seconds is None

    @property
    def retry_after_header(self) -> str:
        """The HTTP ``Retry-After`` value, always whole seconds: one more than the whole seconds
        of the wait (as the Python zae-limiter does). For a request that can never fit
        (``never_fits``), the library's wait for its deficit: a retry then is refused again."""
        seconds = self.retry_after_seconds
        if seconds is None:
            waits = [s.deficit_seconds() for s in self.violations]
            seconds = max((w for w in waits if w is not None), default=0.0)
        return str(int(seconds) + 1)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready body for a 429 answer."""
        return {
            "error": "rate_limit_exceeded",
            "message": str(self),
            "retry_after_seconds": self.retry_after_seconds,
            "retry_after_ms": (
                None if self.retry_after_seconds is None else round(self.retry_after_seconds * 1000)
            ),
            "never_fits": self.never_fits,
            "contended": self.contended,
            "refused_by": self.refused_by,
            "refused_resource": self.refused_resource,
            "limits": [s.as_dict() for s in self.statuses],
        }


class RateLimiterUnavailable(InfrastructureError):
    """The daemon could not decide now: it is not running or not reachable, its store did not
    answer in time, it shed load, or the call's deadline passed. Retrying later can help."""


class ValidationError(ZAELimiterError, ValueError):
    """Bad input (the daemon's ``INVALID_ARGUMENT`` or ``OUT_OF_RANGE``, or a value that cannot be
    sent). ``field`` names the offending field: the daemon sends it as a ``google.rpc.BadRequest``
    detail, and the client names it for what it refuses before sending. ``reason`` is the
    message (the library's attribute)."""

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field
        self.reason = message


class InvalidIdentifierError(ValidationError):
    """A bad entity or parent id (the field is ``entity_id``, ``parent_id``, ``entity.id``...)."""


class InvalidNameError(ValidationError):
    """A bad resource or limit name (the field is ``resource``, ``limits[0].name``...)."""


class PermissionDenied(RateLimiterUnavailable):
    """The daemon's access rules do not let this process do that (its uid may not use the
    namespace, or call that method). Permanent: retrying does not help. Under
    ``RateLimiterUnavailable`` as the library's (DynamoDB refusing its IAM role), so a handler
    written for the library's ``OnUnavailable.BLOCK`` catches it; neither is ever let through by
    the ``allow`` policy."""


class NotFound(ZAELimiterError):
    """What the call names does not exist."""


class LeaseNotFound(NotFound, RateLimitError):
    """The lease is unknown to the daemon (expired, already closed, or never this caller's), or it
    was already closed here."""


#: The Python zae-limiter's name for using a lease after its block ended.
LeaseExpiredError = LeaseNotFound


class EntityNotFoundError(NotFound, EntityError):
    """The entity does not exist."""


class EntityExistsError(EntityError):
    """An entity with that id exists already."""


class FailedPrecondition(ZAELimiterError):
    """The daemon refused a call that cannot succeed as things stand (a lease closed the other
    way, a parent cycle, a store the daemon cannot use); retrying the same call will not help."""


class ResourceDisabled(FailedPrecondition):
    """The resource is disabled for the entity (``level``: the scope that decided, e.g.
    ``"resource gpt-4"``). A configuration state, not throttling: map it to 403, not 429; the
    ``on_unavailable`` policy never lets it through."""

    def __init__(
        self, message: str, *, entity_id: str, resource: str, level: str, code: str | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.entity_id = entity_id
        self.resource = resource
        self.level = level


def _detail(status_details: bytes | None, kind: Any) -> Any:
    """The first detail of type ``kind`` (a ``google.rpc`` message class) in a serialized
    ``google.rpc.Status`` (the ``grpc-status-details-bin`` trailer), if there is one."""
    if not status_details:
        return None
    status = status_pb2.Status()
    try:
        status.ParseFromString(status_details)
        for detail in status.details:
            if detail.Is(kind.DESCRIPTOR):
                found = kind()
                detail.Unpack(found)
                return found
    except DecodeError:
        return None
    return None


_IDENTIFIER = re.compile(r"(^|\.)(entity_id|parent_id|id)$")
_NAME = re.compile(r"(^|\.)(resource|name)$")


def _validation_kind(field: str | None) -> type[ValidationError]:
    """The library's finer kind for a bad identifier or name, by the field the daemon named."""
    if field and _IDENTIFIER.search(field):
        return InvalidIdentifierError
    if field and _NAME.search(field):
        return InvalidNameError
    return ValidationError


def bad_field(status_details: bytes | None) -> str | None:
    """The field of the first ``google.rpc.BadRequest`` violation, if there is one."""
    bad = _detail(status_details, error_details_pb2.BadRequest)
    return next((v.field for v in bad.field_violations), None) if bad is not None else None


def from_rpc(err: grpc.RpcError, *, socket: str, not_found: type = NotFound) -> ZAELimiterError:
    """The package's exception for a failed grpcio call."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    status_details = next(
        (v for k, v in trailers or () if k == "grpc-status-details-bin" and isinstance(v, bytes)),
        None,
    )
    return from_status(
        code.name if code is not None else None,
        details,
        socket=socket,
        not_found=not_found,
        status_details=status_details,
    )


def from_status(
    code: str | None,
    details: str,
    *,
    socket: str,
    not_found: type = NotFound,
    status_details: bytes | None = None,
) -> ZAELimiterError:
    """The package's exception for a call that ended with gRPC status ``code`` (its name);
    ``status_details`` is the ``grpc-status-details-bin`` trailer, when the daemon sent one."""
    if code in ("INVALID_ARGUMENT", "OUT_OF_RANGE"):
        field = bad_field(status_details)
        return _validation_kind(field)(details, code=code, field=field)
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return PermissionDenied(details, code=code)
    if code == "NOT_FOUND":
        return not_found(details, code=code)
    if code == "ALREADY_EXISTS":
        return EntityExistsError(details, code=code)
    if code == "FAILED_PRECONDITION":
        info = _detail(status_details, error_details_pb2.ErrorInfo)
        if info is not None and info.reason == "RESOURCE_DISABLED":
            return ResourceDisabled(
                details,
                entity_id=info.metadata.get("entity_id", ""),
                resource=info.metadata.get("resource", ""),
                level=info.metadata.get("level", ""),
                code=code,
            )
        return FailedPrecondition(details, code=code)
    if code == "DEADLINE_EXCEEDED":
        return RateLimiterUnavailable(
            f"the zae-limiter daemon at {socket} did not answer in time: {details}",
            code=code,
        )
    if code == "UNAVAILABLE" and "connect" in details:
        return RateLimiterUnavailable(
            f"cannot reach the zae-limiter daemon at {socket}: {details}", code=code
        )
    return RateLimiterUnavailable(details, code=code)
