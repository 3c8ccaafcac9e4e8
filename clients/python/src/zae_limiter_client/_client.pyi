# The typed interface of _client.py. One implementation serves RateLimiter (asyncio) and
# SyncRateLimiter: each method builds its request once and hands it to the limiter's transport,
# which awaits it or not. This stub gives each limiter (and each kind of lease) its own
# signatures: the same methods, awaitable on one and plain on the other.
# tests/test_typing.py checks that it names every public method with the implementation's
# parameters, and type-checks a program written against it.

import datetime
import types
from collections.abc import Mapping, Sequence

from ._models import (
    AuditPage,
    Availability,
    BucketOperationResult,
    Entity,
    Limit,
    LimitStatus,
    OnUnavailable,
    ResourceCapacity,
    UsageSnapshot,
    UsageSummary,
)

DEFAULT_SOCKET: str
DEFAULT_TIMEOUT: float

_DateOrMs = datetime.datetime | int | None

class _LeaseState:
    lease_id: str
    entity_id: str
    ttl_seconds: float
    bypassed: bool
    @property
    def consumed(self) -> dict[str, int]: ...
    @property
    def resources(self) -> tuple[str, ...]: ...
    @property
    def statuses(self) -> list[LimitStatus]: ...
    @property
    def overdrawn(self) -> list[str]: ...
    @property
    def closed(self) -> bool: ...

class Lease(_LeaseState):
    """A lease of a RateLimiter: its calls are awaited."""

    def resource(self, name: str) -> Lease: ...
    async def adjust(
        self, amounts_by_name: Mapping[str, int] | None = None, **amounts_kw: int
    ) -> None: ...
    async def release(
        self, amounts_by_name: Mapping[str, int] | None = None, **amounts_kw: int
    ) -> None: ...
    async def consume(
        self, amounts_by_name: Mapping[str, int] | None = None, **amounts_kw: int
    ) -> None: ...
    async def flush(self) -> None: ...
    async def renew(self) -> None: ...
    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...

class SyncLease(_LeaseState):
    """A lease of a SyncRateLimiter: its calls return when done."""

    def resource(self, name: str) -> SyncLease: ...
    def adjust(
        self, amounts_by_name: Mapping[str, int] | None = None, **amounts_kw: int
    ) -> None: ...
    def release(
        self, amounts_by_name: Mapping[str, int] | None = None, **amounts_kw: int
    ) -> None: ...
    def consume(
        self, amounts_by_name: Mapping[str, int] | None = None, **amounts_kw: int
    ) -> None: ...
    def flush(self) -> None: ...
    def renew(self) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...

class _AcquireAsync:
    async def __aenter__(self) -> Lease: ...
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool: ...

class _AcquireSync:
    def __enter__(self) -> SyncLease: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool: ...

class RateLimiter:
    socket: str
    namespace: str
    timeout: float
    def __init__(
        self,
        socket: str | None = None,
        namespace: str | None = None,
        timeout: float = ...,
    ) -> None: ...
    def acquire(
        self,
        entity_id: str,
        resource: str,
        consume: Mapping[str, int],
        limits: Sequence[Limit] | None = None,
        on_unavailable: OnUnavailable | str | None = None,
        *,
        also: Mapping[str, Mapping[str, int]] | None = None,
    ) -> _AcquireAsync: ...
    async def consume(
        self,
        entity_id: str,
        resource: str,
        consume: Mapping[str, int],
        limits: Sequence[Limit] | None = None,
        on_unavailable: OnUnavailable | str | None = None,
        *,
        also: Mapping[str, Mapping[str, int]] | None = None,
    ) -> list[LimitStatus]: ...
    async def available(
        self, entity_id: str, resource: str, limits: Sequence[Limit] | None = None
    ) -> dict[str, int]: ...
    async def time_until_available(
        self,
        entity_id: str,
        resource: str,
        needed: Mapping[str, int],
        limits: Sequence[Limit] | None = None,
    ) -> float: ...
    async def check_availability(
        self,
        entity_id: str,
        resource: str,
        needed: Mapping[str, int] | None = None,
        limits: Sequence[Limit] | None = None,
    ) -> Availability: ...
    async def create_entity(
        self,
        entity_id: str,
        name: str | None = None,
        parent_id: str | None = None,
        cascade: bool = False,
        metadata: Mapping[str, str] | None = None,
        principal: str | None = None,
    ) -> Entity: ...
    async def get_entity(self, entity_id: str) -> Entity | None: ...
    async def delete_entity(
        self,
        entity_id: str,
        principal: str | None = None,
        force: bool = False,
    ) -> None: ...
    async def get_children(self, parent_id: str) -> list[Entity]: ...
    async def set_parent(
        self,
        entity_id: str,
        parent_id: str | None,
        principal: str | None = None,
    ) -> Entity: ...
    async def move_entity(
        self,
        entity_id: str,
        parent_id: str | None,
        principal: str | None = None,
    ) -> Entity: ...
    async def set_limits(
        self,
        entity_id: str,
        limits: Sequence[Limit],
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    async def get_limits(self, entity_id: str, resource: str | None = None) -> list[Limit]: ...
    async def delete_limits(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    async def set_resource_defaults(
        self,
        resource: str,
        limits: Sequence[Limit],
        principal: str | None = None,
    ) -> None: ...
    async def get_resource_defaults(self, resource: str) -> list[Limit]: ...
    async def delete_resource_defaults(
        self,
        resource: str,
        principal: str | None = None,
    ) -> None: ...
    async def set_system_defaults(
        self,
        limits: Sequence[Limit],
        on_unavailable: OnUnavailable | str | None = None,
        principal: str | None = None,
    ) -> None: ...
    async def disable_resource(
        self,
        resource: str,
        principal: str | None = None,
    ) -> None: ...
    async def enable_resource(
        self,
        resource: str,
        principal: str | None = None,
    ) -> None: ...
    async def clear_resource_disabled(
        self,
        resource: str,
        principal: str | None = None,
    ) -> None: ...
    async def disable_entity(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    async def enable_entity(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    async def clear_entity_disabled(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    async def bypass_resource(
        self,
        resource: str,
        principal: str | None = None,
        until: datetime.datetime | datetime.timedelta | None = None,
    ) -> None: ...
    async def bypass_entity(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
        until: datetime.datetime | datetime.timedelta | None = None,
    ) -> None: ...
    async def list_entities_with_custom_limits(
        self, resource: str, limit: int | None = None, cursor: str | None = None
    ) -> tuple[list[str], str | None]: ...
    async def get_resource_capacity(
        self, resource: str, limit_name: str, parents_only: bool = False
    ) -> ResourceCapacity: ...
    async def list_resources_with_defaults(self) -> list[str]: ...
    async def reset_bucket(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[str] | None = None,
        principal: str | None = None,
        idempotency_key: str | None = None,
    ) -> BucketOperationResult: ...
    async def top_up(
        self,
        entity_id: str,
        resource: str,
        amounts: Mapping[str, int],
        principal: str | None = None,
        idempotency_key: str | None = None,
    ) -> BucketOperationResult: ...
    async def set_resource_cascade(
        self,
        resource: str,
        cascade: bool,
        principal: str | None = None,
    ) -> None: ...
    async def clear_resource_cascade(
        self,
        resource: str,
        principal: str | None = None,
    ) -> None: ...
    async def get_resource_cascade(self, resource: str) -> bool | None: ...
    async def set_entity_cascade(
        self,
        entity_id: str,
        cascade: bool,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    async def clear_entity_cascade(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    async def get_entity_cascade(self, entity_id: str, resource: str | None = None) -> bool | None: ...
    async def set_failure_policy(
        self,
        on_unavailable: OnUnavailable | str,
        principal: str | None = None,
    ) -> None: ...
    async def get_failure_policy(self) -> OnUnavailable | None: ...
    async def delete_failure_policy(
        self,
        principal: str | None = None,
    ) -> None: ...
    async def get_system_defaults(self) -> tuple[list[Limit], OnUnavailable | None]: ...
    async def delete_system_defaults(
        self,
        principal: str | None = None,
    ) -> None: ...
    async def get_audit_events(
        self, entity_id: str, limit: int = 100, page: str | None = None
    ) -> AuditPage: ...
    async def get_usage_snapshots(
        self,
        entity_id: str | None = None,
        resource: str | None = None,
        window_type: str | None = None,
        start_time: _DateOrMs = None,
        end_time: _DateOrMs = None,
        limit: int = 100,
        next_key: str | None = None,
    ) -> tuple[list[UsageSnapshot], str | None]: ...
    async def get_usage_summary(
        self,
        entity_id: str | None = None,
        resource: str | None = None,
        window_type: str | None = None,
        start_time: _DateOrMs = None,
        end_time: _DateOrMs = None,
    ) -> UsageSummary: ...
    async def create_namespace(self, namespace: str) -> None: ...
    async def list_namespaces(self) -> list[str]: ...
    async def delete_namespace(self, namespace: str) -> None: ...
    async def is_available(self, timeout: float = 1.0) -> bool: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> RateLimiter: ...
    async def __aexit__(self, *exc: object) -> None: ...

class SyncRateLimiter:
    socket: str
    namespace: str
    timeout: float
    def __init__(
        self,
        socket: str | None = None,
        namespace: str | None = None,
        timeout: float = ...,
    ) -> None: ...
    def acquire(
        self,
        entity_id: str,
        resource: str,
        consume: Mapping[str, int],
        limits: Sequence[Limit] | None = None,
        on_unavailable: OnUnavailable | str | None = None,
        *,
        also: Mapping[str, Mapping[str, int]] | None = None,
    ) -> _AcquireSync: ...
    def consume(
        self,
        entity_id: str,
        resource: str,
        consume: Mapping[str, int],
        limits: Sequence[Limit] | None = None,
        on_unavailable: OnUnavailable | str | None = None,
        *,
        also: Mapping[str, Mapping[str, int]] | None = None,
    ) -> list[LimitStatus]: ...
    def available(
        self, entity_id: str, resource: str, limits: Sequence[Limit] | None = None
    ) -> dict[str, int]: ...
    def time_until_available(
        self,
        entity_id: str,
        resource: str,
        needed: Mapping[str, int],
        limits: Sequence[Limit] | None = None,
    ) -> float: ...
    def check_availability(
        self,
        entity_id: str,
        resource: str,
        needed: Mapping[str, int] | None = None,
        limits: Sequence[Limit] | None = None,
    ) -> Availability: ...
    def create_entity(
        self,
        entity_id: str,
        name: str | None = None,
        parent_id: str | None = None,
        cascade: bool = False,
        metadata: Mapping[str, str] | None = None,
        principal: str | None = None,
    ) -> Entity: ...
    def get_entity(self, entity_id: str) -> Entity | None: ...
    def delete_entity(
        self,
        entity_id: str,
        principal: str | None = None,
        force: bool = False,
    ) -> None: ...
    def get_children(self, parent_id: str) -> list[Entity]: ...
    def set_parent(
        self,
        entity_id: str,
        parent_id: str | None,
        principal: str | None = None,
    ) -> Entity: ...
    def move_entity(
        self,
        entity_id: str,
        parent_id: str | None,
        principal: str | None = None,
    ) -> Entity: ...
    def set_limits(
        self,
        entity_id: str,
        limits: Sequence[Limit],
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    def get_limits(self, entity_id: str, resource: str | None = None) -> list[Limit]: ...
    def delete_limits(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    def set_resource_defaults(
        self,
        resource: str,
        limits: Sequence[Limit],
        principal: str | None = None,
    ) -> None: ...
    def get_resource_defaults(self, resource: str) -> list[Limit]: ...
    def delete_resource_defaults(
        self,
        resource: str,
        principal: str | None = None,
    ) -> None: ...
    def set_system_defaults(
        self,
        limits: Sequence[Limit],
        on_unavailable: OnUnavailable | str | None = None,
        principal: str | None = None,
    ) -> None: ...
    def disable_resource(
        self,
        resource: str,
        principal: str | None = None,
    ) -> None: ...
    def enable_resource(
        self,
        resource: str,
        principal: str | None = None,
    ) -> None: ...
    def clear_resource_disabled(
        self,
        resource: str,
        principal: str | None = None,
    ) -> None: ...
    def disable_entity(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    def enable_entity(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    def clear_entity_disabled(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    def bypass_resource(
        self,
        resource: str,
        principal: str | None = None,
        until: datetime.datetime | datetime.timedelta | None = None,
    ) -> None: ...
    def bypass_entity(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
        until: datetime.datetime | datetime.timedelta | None = None,
    ) -> None: ...
    def list_entities_with_custom_limits(
        self, resource: str, limit: int | None = None, cursor: str | None = None
    ) -> tuple[list[str], str | None]: ...
    def get_resource_capacity(
        self, resource: str, limit_name: str, parents_only: bool = False
    ) -> ResourceCapacity: ...
    def list_resources_with_defaults(self) -> list[str]: ...
    def reset_bucket(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[str] | None = None,
        principal: str | None = None,
        idempotency_key: str | None = None,
    ) -> BucketOperationResult: ...
    def top_up(
        self,
        entity_id: str,
        resource: str,
        amounts: Mapping[str, int],
        principal: str | None = None,
        idempotency_key: str | None = None,
    ) -> BucketOperationResult: ...
    def set_resource_cascade(
        self,
        resource: str,
        cascade: bool,
        principal: str | None = None,
    ) -> None: ...
    def clear_resource_cascade(
        self,
        resource: str,
        principal: str | None = None,
    ) -> None: ...
    def get_resource_cascade(self, resource: str) -> bool | None: ...
    def set_entity_cascade(
        self,
        entity_id: str,
        cascade: bool,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    def clear_entity_cascade(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
    ) -> None: ...
    def get_entity_cascade(self, entity_id: str, resource: str | None = None) -> bool | None: ...
    def set_failure_policy(
        self,
        on_unavailable: OnUnavailable | str,
        principal: str | None = None,
    ) -> None: ...
    def get_failure_policy(self) -> OnUnavailable | None: ...
    def delete_failure_policy(
        self,
        principal: str | None = None,
    ) -> None: ...
    def get_system_defaults(self) -> tuple[list[Limit], OnUnavailable | None]: ...
    def delete_system_defaults(
        self,
        principal: str | None = None,
    ) -> None: ...
    def get_audit_events(
        self, entity_id: str, limit: int = 100, page: str | None = None
    ) -> AuditPage: ...
    def get_usage_snapshots(
        self,
        entity_id: str | None = None,
        resource: str | None = None,
        window_type: str | None = None,
        start_time: _DateOrMs = None,
        end_time: _DateOrMs = None,
        limit: int = 100,
        next_key: str | None = None,
    ) -> tuple[list[UsageSnapshot], str | None]: ...
    def get_usage_summary(
        self,
        entity_id: str | None = None,
        resource: str | None = None,
        window_type: str | None = None,
        start_time: _DateOrMs = None,
        end_time: _DateOrMs = None,
    ) -> UsageSummary: ...
    def create_namespace(self, namespace: str) -> None: ...
    def list_namespaces(self) -> list[str]: ...
    def delete_namespace(self, namespace: str) -> None: ...
    def is_available(self, timeout: float = 1.0) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> SyncRateLimiter: ...
    def __exit__(self, *exc: object) -> None: ...
