"""RateLimiter (asyncio) and SyncRateLimiter: the daemon's API with the Python zae-limiter's shape.

Both share every method through ``_Api``: a method builds its request (checking what cannot be
sent), then hands it to ``_call`` with a function that turns the answer into the result.
``RateLimiter._call`` is a coroutine and ``SyncRateLimiter._call`` returns at once, so the same
method is awaited on one and called on the other. ``_client.pyi`` types each limiter's methods
(and ``Lease`` / ``SyncLease``) as they behave.

One connection per limiter, shared by every task or thread that uses it, made on first use:
``RateLimiter`` speaks HTTP/2 itself on the event loop (``_h2``), ``SyncRateLimiter`` uses a
``grpcio`` channel. Neither survives ``fork()``: a limiter notices that it runs in a new process
(or, for ``RateLimiter``, on another event loop) and connects again, but the clean way under
pre-fork servers (gunicorn, uvicorn workers) is to create the limiter in each worker after the fork.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import inspect
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from . import _h2
from ._errors import (
    EntityNotFoundError,
    LeaseNotFound,
    NotFound,
    RateLimitExceeded,
    ValidationError,
    ZAELimiterError,
    from_rpc,
    from_status,
)
from ._models import (
    AuditEvent,
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
    _on_unavailable,
    _on_unavailable_from_pb,
    _whole,
    amounts,
    limits_to_pb,
    message,
    serialized_limits,
)
from ._models import amounts as _checked_amounts
from ._proto import ratelimit_pb2 as pb

#: The daemon's default socket (``zae-limiter serve`` without ``--socket``).
DEFAULT_SOCKET = "/tmp/zae-limiter.sock"
#: Seconds a call may take before it fails with ``RateLimiterUnavailable``.
DEFAULT_TIMEOUT = 5.0

# The socket's authority means nothing; `localhost` is what the daemon's HTTP/2 server expects
# (it also accepts gRPC's default, the socket path, at a little more cost per request).
_CHANNEL_OPTIONS = [("grpc.default_authority", "localhost")]

_RAISE = object()
# grpc.health.v1: HealthCheckRequest{} is empty; HealthCheckResponse{status: SERVING} is field 1 = 1.
_HEALTH = "/grpc.health.v1.Health/Check"
_SERVING = b"\x08\x01"
_DateOrMs = datetime.datetime | int | None


class _Method:
    """One RPC: its path and its answer's message type."""

    __slots__ = ("path", "response")

    def __init__(self, service: str, name: str) -> None:
        self.path = f"/zae_limiter.v1.{service}/{name}"
        method = pb.DESCRIPTOR.services_by_name[service].methods_by_name[name]
        self.response = getattr(pb, method.output_type.name)


_METHODS: dict[str, _Method] = {}


def _rate_limiter_method(name: str) -> _Method:
    method = _METHODS.get(name)
    if method is None:
        method = _METHODS[name] = _Method("RateLimiter", name)
    return method


def _principal_metadata(principal: str | None) -> tuple[tuple[str, str], ...]:
    """The header that names the caller for audit records (1-128 printable ASCII
    characters)."""
    if principal is None:
        return ()
    if (
        not isinstance(principal, str)
        or not 0 < len(principal) <= 128
        or not all(" " <= c <= "~" for c in principal)
    ):
        raise ValidationError(
            f"principal: 1-128 printable ASCII characters, got {principal!r}", field="principal"
        )
    return (("zae-principal", principal),)


def _admin_method(name: str) -> _Method:
    key = "Admin/" + name
    method = _METHODS.get(key)
    if method is None:
        method = _METHODS[key] = _Method("Admin", name)
    return method


def _ms(value: _DateOrMs, field: str) -> int:
    if value is None:
        return 0
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValidationError(
        f"{field}: expected a datetime or milliseconds since the epoch, got {value!r}",
        field=field,
    )


def _socket_path(socket: str | None) -> str:
    if socket is not None:
        return os.fspath(socket)
    return os.environ.get("ZAE_LIMITER_SOCKET") or DEFAULT_SOCKET


def _refused(
    response: pb.AcquireResponse,
    entity_id: str,
    resource: str,
    limits: Mapping[str, Limit],
) -> RateLimitExceeded:
    who = response.refused_by or entity_id

    def status(s: pb.LimitStatus) -> LimitStatus:
        # With `also`, every status names its resource; the cascade parent refused only the
        # refused resource.
        if not s.resource:
            return LimitStatus._from_pb(s, who, resource, limits)
        owner = who if s.resource == response.refused_resource else entity_id
        return LimitStatus._from_pb(s, owner, s.resource, limits)

    statuses = [status(s) for s in response.statuses]
    retry = response.retry_after_ms / 1000 if response.HasField("retry_after_ms") else None
    return RateLimitExceeded(
        statuses,
        retry_after_seconds=retry,
        refused_by=response.refused_by or None,
        refused_resource=response.refused_resource or None,
    )


def _also(also: Mapping[str, Mapping[str, int]] | None) -> list[pb.AlsoAcquire]:
    """The further resources of an acquire, checked before they are sent."""
    if also is None:
        return []
    if not isinstance(also, Mapping):
        raise ValidationError(
            f"also: must be a mapping of resource to {{limit name: tokens}}, got {also!r}",
            field="also",
        )
    return [
        pb.AlsoAcquire(
            resource=resource,
            consume=amounts(f"also[{resource}]", consume, allow_negative=False),
        )
        for resource, consume in also.items()
    ]


def _by_name(limits: Sequence[Limit] | None) -> dict[str, Limit]:
    return {limit.name: limit for limit in limits or [] if isinstance(limit, Limit)}


class _Api:
    """The methods both limiters share (see the module documentation)."""

    def __init__(self, socket: str | None, namespace: str | None, timeout: float) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValidationError(
                f"timeout: must be a positive number of seconds, got {timeout!r}", field="timeout"
            )
        self.socket = _socket_path(socket)
        self.namespace = namespace or ""
        self.timeout = float(timeout)
        self._held = _Held()

    def _renew_while_held(self, lease_id: str, ttl_ms: int) -> None:
        raise NotImplementedError

    def _in_order(self, *calls: Callable[[], Any]) -> Any:
        """Makes the calls one after another (awaited in turn by the async limiter); the
        answer is the last one's."""
        raise NotImplementedError

    def _each(self, *calls: Callable[[], Any]) -> Any:
        """Makes the calls one after another, as ``_in_order``; the answer is every one's, in a
        tuple."""
        raise NotImplementedError

    def _call(
        self,
        method: _Method,
        request: Any,
        convert: Callable[[Any], Any],
        *,
        missing: Any = _RAISE,
        not_found: type = NotFound,
        principal: str | None = None,
    ) -> Any:
        """One call; ``principal`` (the library's caller identity for audit logging) goes in
        the ``zae-principal`` header, which the daemon records beside the caller's uid."""
        raise NotImplementedError

    def _recover(
        self, call: Callable[[], Any], kind: type[BaseException], then: Callable[[], Any]
    ) -> Any:
        """Makes the call; when it raises ``kind``, runs ``then`` (a call, or local work) and
        raises again."""
        raise NotImplementedError

    def _settle(self, lease_id: str, method: str, delta: dict[str, int]) -> Any:
        """Closes one lease (``Commit`` or ``Rollback``); a commit writes ``delta`` with it. The
        daemon refusing the delta leaves the lease open: it is then committed without it, and
        the refusal raised."""

        def close(with_delta: dict[str, int]) -> Any:
            request = message(pb.LeaseRequest, lease_id=lease_id, delta=with_delta)
            return self._call(
                _rate_limiter_method(method), request, lambda r: None, not_found=LeaseNotFound
            )

        if not delta:
            return close({})
        return self._recover(lambda: close(delta), ValidationError, lambda: close({}))

    # --- rate limiting ---------------------------------------------------------------------------

    def _acquire_request(
        self,
        entity_id: str,
        resource: str,
        consume: Mapping[str, int],
        limits: Sequence[Limit] | None,
        commit: bool,
        on_unavailable: OnUnavailable | str | None = None,
        also: Mapping[str, Mapping[str, int]] | None = None,
    ) -> tuple[bytes, dict[str, Limit]]:
        """The serialized request (the hot path: the limits' part is serialized once per set of
        limits and appended, as protobuf allows) and the limits by name."""
        limits_part, by_name = serialized_limits(pb.AcquireRequest, "limits", limits)
        head = message(
            pb.AcquireRequest,
            namespace=self.namespace,
            entity_id=entity_id,
            resource=resource,
            consume=amounts("consume", consume, allow_negative=False),
            commit=commit,
            on_unavailable=_on_unavailable(on_unavailable),
            also=_also(also),
        )
        return head.SerializeToString() + limits_part, by_name

    def acquire(
        self,
        entity_id: str,
        resource: str,
        consume: Mapping[str, int],
        limits: Sequence[Limit] | None = None,
        on_unavailable: OnUnavailable | str | None = None,
        *,
        also: Mapping[str, Mapping[str, int]] | None = None,
    ) -> _Acquire:
        """Consumes ``consume`` (tokens by limit name) on enter and yields a ``Lease``; a clean
        exit commits, an exception rolls everything back and is re-raised. Refused:
        ``RateLimitExceeded`` on enter, nothing consumed. ``limits=None`` resolves the stored
        limits (entity + resource > entity > resource > system). ``on_unavailable`` (``"allow"``
        or ``"block"``) is this call's failure policy: default the namespace's, else the
        daemon's. ``also`` (``{resource: {limit: tokens}}``, at most 15) charges further
        resources of the entity, all or none, each under its own stored limits (not with
        ``limits``); ``lease.resource(name)`` reaches each."""
        request, by_name = self._acquire_request(
            entity_id,
            resource,
            consume,
            limits,
            commit=False,
            on_unavailable=on_unavailable,
            also=also,
        )
        also_consumed = {r: dict(c) for r, c in (also or {}).items()}
        return _Acquire(
            self,
            request,
            entity_id,
            resource,
            dict(consume),
            by_name,
            also_consumed,
            more=lambda r, amounts: self._acquire_request(
                entity_id,
                r,
                amounts,
                limits if r == resource else None,
                commit=False,
                on_unavailable=on_unavailable,
            )[0],
        )

    def consume(
        self,
        entity_id: str,
        resource: str,
        consume: Mapping[str, int],
        limits: Sequence[Limit] | None = None,
        on_unavailable: OnUnavailable | str | None = None,
        *,
        also: Mapping[str, Mapping[str, int]] | None = None,
    ) -> Any:
        """Consumption known upfront, in one call: acquire and commit. Returns the statuses
        (with ``also``, every resource's, each naming its resource); refused:
        ``RateLimitExceeded``, nothing consumed."""
        request, by_name = self._acquire_request(
            entity_id,
            resource,
            consume,
            limits,
            commit=True,
            on_unavailable=on_unavailable,
            also=also,
        )

        def convert(response: pb.AcquireResponse) -> list[LimitStatus]:
            if not response.allowed:
                raise _refused(response, entity_id, resource, by_name)
            return [
                LimitStatus._from_pb(s, entity_id, s.resource or resource, by_name)
                for s in response.statuses
            ]

        return self._call(_rate_limiter_method("Acquire"), request, convert)

    def available(
        self, entity_id: str, resource: str, limits: Sequence[Limit] | None = None
    ) -> Any:
        """Tokens available now per limit name (negative in debt); nothing is consumed."""
        request = message(
            pb.AvailableRequest,
            namespace=self.namespace,
            entity_id=entity_id,
            resource=resource,
            limits=limits_to_pb(limits),
        )
        return self._call(
            _rate_limiter_method("Available"),
            request,
            lambda r: {s.name: s.available_milli // 1000 for s in r.statuses},
        )

    def time_until_available(
        self,
        entity_id: str,
        resource: str,
        needed: Mapping[str, int],
        limits: Sequence[Limit] | None = None,
    ) -> Any:
        """Seconds until ``needed`` would be admitted (0 now); ``math.inf`` when it never can."""
        request = message(
            pb.TimeUntilAvailableRequest,
            namespace=self.namespace,
            entity_id=entity_id,
            resource=resource,
            consume=amounts("needed", needed, allow_negative=False),
            limits=limits_to_pb(limits),
        )
        return self._call(
            _rate_limiter_method("TimeUntilAvailable"),
            request,
            lambda r: r.retry_after_ms / 1000 if r.HasField("retry_after_ms") else math.inf,
        )

    def check_availability(
        self,
        entity_id: str,
        resource: str,
        needed: Mapping[str, int] | None = None,
        limits: Sequence[Limit] | None = None,
    ) -> Any:
        """Every limit of the bucket, from one snapshot of the daemon's: available tokens,
        whether ``needed`` fits now, by how much it is short, and how long until it fits.
        Consumes nothing; a read, not a reservation (``acquire`` decides)."""
        request = message(
            pb.TimeUntilAvailableRequest,
            namespace=self.namespace,
            entity_id=entity_id,
            resource=resource,
            consume=amounts("needed", needed or {}, allow_negative=False),
            limits=limits_to_pb(limits),
        )
        by_name = {limit.name: limit for limit in limits or ()}

        def convert(r: pb.TimeUntilAvailableResponse) -> Availability:
            return Availability(
                entity_id=entity_id,
                resource=resource,
                checked_at_ms=int(time.time() * 1000),
                statuses=[
                    LimitStatus._from_pb(s, entity_id, resource, by_name) for s in r.statuses
                ],
                bypassed=r.bypassed,
            )

        return self._call(_rate_limiter_method("TimeUntilAvailable"), request, convert)

    # --- entities --------------------------------------------------------------------------------

    def create_entity(
        self,
        entity_id: str,
        name: str | None = None,
        parent_id: str | None = None,
        cascade: bool = False,
        metadata: Mapping[str, str] | None = None,
        principal: str | None = None,
    ) -> Any:
        optional = {} if parent_id is None else {"parent_id": parent_id}
        entity = message(
            pb.Entity,
            id=entity_id,
            name=name or "",
            cascade=cascade,
            metadata=dict(metadata or {}),
            **optional,
        )
        request = message(pb.CreateEntityRequest, namespace=self.namespace, entity=entity)
        return self._call(
            _admin_method("CreateEntity"),
            request,
            lambda r: Entity._from_pb(r.entity),
            principal=principal,
        )

    def get_entity(self, entity_id: str) -> Any:
        """The entity, or ``None`` when it does not exist."""
        request = message(pb.EntityRequest, namespace=self.namespace, entity_id=entity_id)
        return self._call(
            _admin_method("GetEntity"),
            request,
            lambda r: Entity._from_pb(r.entity),
            missing=None,
        )

    def delete_entity(
        self, entity_id: str, principal: str | None = None, force: bool = False
    ) -> Any:
        """Deletes the entity, its buckets and its limits; refused while it has children unless
        ``force``."""
        request = message(
            pb.EntityRequest, namespace=self.namespace, entity_id=entity_id, force=force
        )
        return self._call(
            _admin_method("DeleteEntity"),
            request,
            lambda r: None,
            not_found=EntityNotFoundError,
            principal=principal,
        )

    def get_children(self, parent_id: str) -> Any:
        request = message(pb.EntityRequest, namespace=self.namespace, entity_id=parent_id)
        return self._call(
            _admin_method("ListChildren"),
            request,
            lambda r: [Entity._from_pb(e) for e in r.children],
            not_found=EntityNotFoundError,
        )

    def set_parent(
        self, entity_id: str, parent_id: str | None, principal: str | None = None
    ) -> Any:
        """Moves the entity under ``parent_id`` (``None``: no parent); returns it."""
        optional = {} if parent_id is None else {"parent_id": parent_id}
        request = message(
            pb.MoveEntityRequest,
            namespace=self.namespace,
            entity_id=entity_id,
            **optional,
        )
        return self._call(
            _admin_method("MoveEntity"),
            request,
            lambda r: Entity._from_pb(r.entity),
            not_found=EntityNotFoundError,
            principal=principal,
        )

    move_entity = set_parent

    # --- stored limits ---------------------------------------------------------------------------

    def _scope(self, entity_id: str | None, resource: str | None) -> pb.LimitScope:
        present = {"entity_id": entity_id, "resource": resource}
        return message(pb.LimitScope, **{k: v for k, v in present.items() if v is not None})

    def _set(
        self,
        entity_id: str | None,
        resource: str | None,
        limits: Sequence[Limit],
        principal: str | None = None,
    ) -> Any:
        request = message(
            pb.SetLimitsRequest,
            namespace=self.namespace,
            scope=self._scope(entity_id, resource),
            limits=limits_to_pb(limits),
        )
        return self._call(_admin_method("SetLimits"), request, lambda r: None, principal=principal)

    def _get(self, entity_id: str | None, resource: str | None) -> Any:
        request = message(
            pb.LimitsRequest,
            namespace=self.namespace,
            scope=self._scope(entity_id, resource),
        )
        return self._call(
            _admin_method("GetLimits"),
            request,
            lambda r: [Limit._from_pb(limit) for limit in r.limits],
            missing=[],
        )

    def _delete(
        self, entity_id: str | None, resource: str | None, principal: str | None = None
    ) -> Any:
        request = message(
            pb.LimitsRequest,
            namespace=self.namespace,
            scope=self._scope(entity_id, resource),
        )
        return self._call(
            _admin_method("DeleteLimits"), request, lambda r: None, principal=principal
        )

    def set_limits(
        self,
        entity_id: str,
        limits: Sequence[Limit],
        resource: str | None = None,
        principal: str | None = None,
    ) -> Any:
        """Stores the entity's limits: for ``resource``, or its default for every resource."""
        return self._set(entity_id, resource, limits, principal)

    def get_limits(self, entity_id: str, resource: str | None = None) -> Any:
        """The entity's stored limits (for ``resource``, or its default); ``[]`` when none."""
        return self._get(entity_id, resource)

    def delete_limits(
        self, entity_id: str, resource: str | None = None, principal: str | None = None
    ) -> Any:
        return self._delete(entity_id, resource, principal)

    def list_entities_with_custom_limits(
        self, resource: str, limit: int | None = None, cursor: str | None = None
    ) -> Any:
        """The entities with limits of their own for ``resource``, in id order, and the cursor
        for the next page (``None`` when there are no more): ``limit`` at a time (at most 1000,
        also when ``None``; the library's ``None`` means all)."""
        size = 1000 if limit is None else _whole("limit", limit, low=1, high=1000)
        request = message(
            pb.ListEntitiesWithLimitsRequest,
            namespace=self.namespace,
            resource=resource,
            page_size=size,
            page=cursor or "",
        )
        return self._call(
            _admin_method("ListEntitiesWithLimits"),
            request,
            lambda r: (list(r.entity_ids), r.next_page or None),
        )

    def get_resource_capacity(
        self, resource: str, limit_name: str, parents_only: bool = False
    ) -> Any:
        """``limit_name``'s capacity and what is available of it now, summed over the entities
        with a bucket on ``resource`` (``parents_only``: those with children), with each
        entity's. On DynamoDB the daemon scans the table: for reports, not for a request's
        path."""
        if not isinstance(parents_only, bool):
            raise ValidationError(
                f"parents_only: must be True or False, got {parents_only!r}", field="parents_only"
            )
        request = message(
            pb.ResourceCapacityRequest,
            namespace=self.namespace,
            resource=resource,
            limit_name=limit_name,
            parents_only=parents_only,
        )
        return self._call(
            _admin_method("GetResourceCapacity"),
            request,
            lambda r: ResourceCapacity._from_pb(resource, limit_name, r),
        )

    def list_resources_with_defaults(self) -> Any:
        """The resources with default limits stored, in order."""
        request = message(pb.NamespaceRequest, namespace=self.namespace)
        return self._call(
            _admin_method("ListResourcesWithDefaults"), request, lambda r: list(r.resources)
        )

    def set_resource_defaults(
        self, resource: str, limits: Sequence[Limit], principal: str | None = None
    ) -> Any:
        return self._set(None, resource, limits, principal)

    def get_resource_defaults(self, resource: str) -> Any:
        return self._get(None, resource)

    def delete_resource_defaults(self, resource: str, principal: str | None = None) -> Any:
        return self._delete(None, resource, principal)

    def set_system_defaults(
        self,
        limits: Sequence[Limit],
        on_unavailable: OnUnavailable | str | None = None,
        principal: str | None = None,
    ) -> Any:
        """The system's limits; with ``on_unavailable``, also the namespace's failure policy
        (``set_failure_policy``), as the library stores both."""
        _principal_metadata(principal)  # refused before anything is written
        if on_unavailable is None:
            return self._set(None, None, limits, principal)
        _on_unavailable(on_unavailable)
        return self._in_order(
            lambda: self._set(None, None, limits, principal),
            lambda: self.set_failure_policy(on_unavailable, principal),
        )

    # --- gates: disabled and enabled resources --------------------------------------------------

    def _gate(
        self,
        entity_id: str | None,
        resource: str | None,
        gate: int | None,
        until: datetime.datetime | datetime.timedelta | None = None,
        principal: str | None = None,
    ) -> Any:
        """Sets (``gate``) or clears (``None``) the gate at a scope; a bypass may end ``until``."""
        scope = self._scope(entity_id, resource)
        if gate is None:
            request = message(pb.LimitsRequest, namespace=self.namespace, scope=scope)
            return self._call(
                _admin_method("ClearGate"), request, lambda r: None, principal=principal
            )
        ends = {} if until is None else {"bypass_until_ms": _epoch_ms("until", until)}
        request = message(
            pb.GateRequest, namespace=self.namespace, scope=scope, gate=gate, **ends
        )
        return self._call(_admin_method("SetGate"), request, lambda r: None, principal=principal)

    def disable_resource(self, resource: str, principal: str | None = None) -> Any:
        """Refuses every acquire on ``resource`` (``ResourceDisabled``), for every entity that
        has no gate of its own. This daemon applies it at once, others within
        ``limits_cache_ms``."""
        return self._gate(None, resource, pb.GATE_DISABLED, principal=principal)

    def enable_resource(self, resource: str, principal: str | None = None) -> Any:
        return self._gate(None, resource, pb.GATE_ENABLED, principal=principal)

    def clear_resource_disabled(self, resource: str, principal: str | None = None) -> Any:
        return self._gate(None, resource, None, principal=principal)

    def disable_entity(
        self, entity_id: str, resource: str | None = None, principal: str | None = None
    ) -> Any:
        """Refuses the entity's acquires on ``resource`` (``None``: on every resource without an
        entity + resource gate)."""
        return self._gate(entity_id, resource, pb.GATE_DISABLED, principal=principal)

    def enable_entity(
        self, entity_id: str, resource: str | None = None, principal: str | None = None
    ) -> Any:
        """Serves the entity even where its resource is disabled for everyone else."""
        return self._gate(entity_id, resource, pb.GATE_ENABLED, principal=principal)

    def clear_entity_disabled(
        self, entity_id: str, resource: str | None = None, principal: str | None = None
    ) -> Any:
        return self._gate(entity_id, resource, None, principal=principal)

    def bypass_resource(
        self,
        resource: str,
        principal: str | None = None,
        until: datetime.datetime | datetime.timedelta | None = None,
    ) -> Any:
        """Admits every acquire on ``resource`` without debiting the entity's balances (its
        consumption is still counted; a cascade parent is charged as usual), for every entity
        that has no gate of its own; until ``until`` (a time, or a time from now) when given,
        else until ``clear_resource_disabled``."""
        return self._gate(None, resource, pb.GATE_BYPASS, until, principal)

    def bypass_entity(
        self,
        entity_id: str,
        resource: str | None = None,
        principal: str | None = None,
        until: datetime.datetime | datetime.timedelta | None = None,
    ) -> Any:
        """As ``bypass_resource``, for the entity on ``resource`` (``None``: on every resource
        without an entity + resource gate)."""
        return self._gate(entity_id, resource, pb.GATE_BYPASS, until, principal)

    # --- reset and top-up of one bucket ------------------------------------------------------

    def _operate(
        self,
        method: str,
        entity_id: str,
        resource: str,
        idempotency_key: str | None,
        principal: str | None,
        **fields: Any,
    ) -> Any:
        if idempotency_key is not None and not isinstance(idempotency_key, str):
            raise ValidationError(
                f"idempotency_key: must be a string, got {idempotency_key!r}",
                field="idempotency_key",
            )
        request = message(
            pb.BucketRequest,
            namespace=self.namespace,
            entity_id=entity_id,
            resource=resource,
            idempotency_key=idempotency_key or "",
            **fields,
        )
        return self._call(
            _admin_method(method),
            request,
            lambda r: BucketOperationResult._from_pb(entity_id, resource, r),
            principal=principal,
        )

    def reset_bucket(
        self,
        entity_id: str,
        resource: str,
        limits: Sequence[str] | None = None,
        principal: str | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Fills the entity's limits on ``resource`` (``limits``: only these names) to capacity,
        debt forgiven, as a conditional write against the stored balances (exact while other
        daemons keep deciding). A bucket never used is full: nothing is written. With
        ``idempotency_key`` (1-64 of letters, digits, ``.``, ``_``, ``:``, ``-``), a retry within
        3 days does nothing more and returns the first call's result."""
        if isinstance(limits, str):
            raise ValidationError("limits: must be a list of names, not a string", field="limits")
        names = list(limits) if limits is not None else []
        return self._operate(
            "ResetBucket", entity_id, resource, idempotency_key, principal, limits=names
        )

    def top_up(
        self,
        entity_id: str,
        resource: str,
        amounts: Mapping[str, int],
        principal: str | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Gives each named limit its whole tokens (each 1..10**15): a quota exactly that
        for its period or window (a purchase), any other limit at most its room below
        capacity (a refund); the result says what each gained. Idempotent by key as
        ``reset_bucket``."""
        # ``amounts`` is the library's name for the argument; the module's checker is aliased.
        wire = _checked_amounts("amounts", amounts, allow_negative=False)
        return self._operate(
            "TopUp", entity_id, resource, idempotency_key, principal, amounts=wire
        )

    def _cascade(
        self,
        entity_id: str | None,
        resource: str | None,
        cascade: Any,
        principal: str | None = None,
    ) -> Any:
        """Sets (``True``/``False``) or clears (``None``) the cascade policy at a scope."""
        scope = self._scope(entity_id, resource)
        if cascade is None:
            request = message(pb.LimitsRequest, namespace=self.namespace, scope=scope)
            return self._call(
                _admin_method("ClearCascade"), request, lambda r: None, principal=principal
            )
        if not isinstance(cascade, bool):
            raise ValidationError(
                f"cascade: must be True or False, got {cascade!r}", field="cascade"
            )
        request = message(
            pb.CascadeRequest, namespace=self.namespace, scope=scope, cascade=cascade
        )
        return self._call(
            _admin_method("SetCascade"), request, lambda r: None, principal=principal
        )

    def _get_cascade(self, entity_id: str | None, resource: str | None) -> Any:
        request = message(
            pb.LimitsRequest, namespace=self.namespace, scope=self._scope(entity_id, resource)
        )

        def convert(r: pb.CascadeResponse) -> bool | None:
            return r.cascade if r.HasField("cascade") else None

        return self._call(_admin_method("GetCascade"), request, convert)

    def set_resource_cascade(
        self, resource: str, cascade: bool, principal: str | None = None
    ) -> Any:
        """Whether an acquire of a child entity on ``resource`` also charges its parent, for
        every entity without a policy of its own (an entity's, for the resource or for all its
        resources, comes first; with none anywhere, the entity's ``cascade`` flag decides)."""
        return self._cascade(None, resource, cascade, principal)

    def clear_resource_cascade(self, resource: str, principal: str | None = None) -> Any:
        return self._cascade(None, resource, None, principal)

    def get_resource_cascade(self, resource: str) -> Any:
        """The resource's cascade policy: ``True``, ``False`` or ``None`` (not set)."""
        return self._get_cascade(None, resource)

    def set_entity_cascade(
        self,
        entity_id: str,
        cascade: bool,
        resource: str | None = None,
        principal: str | None = None,
    ) -> Any:
        """Whether the entity's acquires on ``resource`` (``None``: on every resource without an
        entity + resource policy) also charge its parent."""
        return self._cascade(entity_id, resource, cascade, principal)

    def clear_entity_cascade(
        self, entity_id: str, resource: str | None = None, principal: str | None = None
    ) -> Any:
        return self._cascade(entity_id, resource, None, principal)

    def get_entity_cascade(self, entity_id: str, resource: str | None = None) -> Any:
        return self._get_cascade(entity_id, resource)

    def set_failure_policy(
        self, on_unavailable: OnUnavailable | str, principal: str | None = None
    ) -> Any:
        """What an acquire that gives no ``on_unavailable`` does when the store cannot answer
        in time, for the whole namespace (audited). This daemon applies it at once, others
        within their ``limits_cache_ms``."""
        wire = _on_unavailable(on_unavailable)
        if wire == pb.ON_UNAVAILABLE_UNSPECIFIED:
            raise ValidationError("on_unavailable: is required", field="on_unavailable")
        request = message(
            pb.FailurePolicyRequest, namespace=self.namespace, on_unavailable=wire
        )
        return self._call(
            _admin_method("SetFailurePolicy"), request, lambda r: None, principal=principal
        )

    def get_failure_policy(self) -> Any:
        """The namespace's stored failure policy, or ``None`` (the daemon's applies)."""
        request = message(pb.NamespaceRequest, namespace=self.namespace)
        return self._call(
            _admin_method("GetFailurePolicy"),
            request,
            lambda r: _on_unavailable_from_pb(r.on_unavailable),
        )

    def delete_failure_policy(self, principal: str | None = None) -> Any:
        request = message(pb.NamespaceRequest, namespace=self.namespace)
        return self._call(
            _admin_method("DeleteFailurePolicy"), request, lambda r: None, principal=principal
        )

    def get_system_defaults(self) -> Any:
        """``(limits, on_unavailable)``, as the library returns them: the system's limits
        (``[]`` when none) and the namespace's failure policy (``None`` when none is stored)."""
        return self._each(lambda: self._get(None, None), self.get_failure_policy)

    def delete_system_defaults(self, principal: str | None = None) -> Any:
        return self._delete(None, None, principal)

    # --- audit, usage, namespaces ----------------------------------------------------------------

    def get_audit_events(self, entity_id: str, limit: int = 100, page: str | None = None) -> Any:
        """Audit events of an entity (or ``#resource:NAME``, ``#system``), newest first, ``limit``
        at a time; pass the result's ``next_page`` as ``page`` for older ones."""
        subject = entity_id
        request = message(
            pb.ListAuditRequest,
            namespace=self.namespace,
            subject=subject,
            page_size=limit,
            page=page or "",
        )
        return self._call(
            _admin_method("ListAudit"),
            request,
            lambda r: AuditPage(
                [AuditEvent._from_pb(record) for record in r.records],
                r.next_page or None,
            ),
        )

    def _usage_request(
        self,
        entity_id: str | None,
        resource: str | None,
        window_type: str | None,
        start_time: _DateOrMs,
        end_time: _DateOrMs,
        limit: int,
        next_key: str | None,
    ) -> Any:
        if entity_id is None and resource is None:
            raise ValidationError(
                "entity_id: give an entity, a resource (across entities), or both",
                field="entity_id",
            )
        optional = {} if resource is None else {"resource": resource}
        # No start: from the first snapshot; the end is inclusive, as the library's.
        start = _ms(start_time, "start_time") if start_time is not None else 1
        end = _ms(end_time, "end_time") + 1 if end_time is not None else 0
        return message(
            pb.UsageRequest,
            namespace=self.namespace,
            entity_id=entity_id or "",
            period=window_type or "all",
            from_ms=start,
            to_ms=end,
            page_size=limit,
            page=next_key or "",
            **optional,
        )

    def get_usage_snapshots(
        self,
        entity_id: str | None = None,
        resource: str | None = None,
        window_type: str | None = None,
        start_time: _DateOrMs = None,
        end_time: _DateOrMs = None,
        limit: int = 100,
        next_key: str | None = None,
    ) -> Any:
        """A page of usage snapshots, as the library's ``(snapshots, next_key)``: of an entity
        (one resource, or all), or of one resource across entities (``entity_id=None``; on
        DynamoDB a scan of the table, for reports). ``window_type``: ``"hourly"`` or ``"daily"``
        (``"hour"``, ``"day"``), ``None`` both; ``start_time`` and ``end_time`` bound the
        windows' starts (inclusive). ``limit`` is the snapshots read per page (a page may hold
        fewer); pass ``next_key`` back while it is not ``None``."""
        request = self._usage_request(
            entity_id, resource, window_type, start_time, end_time, limit, next_key
        )
        return self._call(
            _admin_method("GetUsage"),
            request,
            lambda r: (
                [UsageSnapshot._from_pb(s) for s in r.snapshots],
                r.next_page or None,
            ),
        )

    def create_namespace(self, namespace: str) -> Any:
        request = message(pb.NamespaceRequest, namespace=namespace)
        return self._call(_admin_method("CreateNamespace"), request, lambda r: None)

    def list_namespaces(self) -> Any:
        return self._call(_admin_method("ListNamespaces"), pb.Empty(), lambda r: list(r.namespaces))

    def delete_namespace(self, namespace: str) -> Any:
        request = message(pb.NamespaceRequest, namespace=namespace)
        return self._call(_admin_method("DeleteNamespace"), request, lambda r: None)


class _Held:
    """The leases a limiter holds open, renewed every third of the daemon's lease TTL while held,
    so a lease lives as long as its holder (an LLM stream longer than the TTL keeps it); a lease
    whose process died expires a TTL after its last call and stays consumed. Every call on a
    lease renews it too (``touch``)."""

    def __init__(self) -> None:
        # lease id -> [when it was last renewed (monotonic seconds), renewal interval (seconds)]
        self._leases: dict[str, list[float]] = {}
        # The sync limiter's renewal thread reads it while callers' threads close leases.
        self._lock = threading.Lock()

    def hold(self, lease_id: str, ttl_ms: int) -> bool:
        """Starts renewing ``lease_id``; whether there is anything to renew."""
        if ttl_ms <= 0 or not lease_id:
            return False
        with self._lock:
            self._leases[lease_id] = [time.monotonic(), ttl_ms / 3000]
        return True

    def touch(self, lease_id: str) -> None:
        with self._lock:
            entry = self._leases.get(lease_id)
            if entry is not None:
                entry[0] = time.monotonic()

    def release(self, lease_id: str) -> None:
        with self._lock:
            self._leases.pop(lease_id, None)

    def clear(self) -> None:
        with self._lock:
            self._leases.clear()

    def __bool__(self) -> bool:
        return bool(self._leases)

    def due(self) -> tuple[list[str], float]:
        """The leases to renew now, and how long to sleep before looking again."""
        now = time.monotonic()
        with self._lock:
            due = [i for i, (last, every) in self._leases.items() if now - last >= every]
            pause = min((every for _, every in self._leases.values()), default=1.0) / 2
        return due, pause


def _renew_request(lease_id: str) -> pb.LeaseRequest:
    return pb.LeaseRequest(lease_id=lease_id)


def _epoch_ms(field: str, when: datetime.datetime | datetime.timedelta) -> int:
    """A time (or a time from now) in ms since the Unix epoch."""
    if isinstance(when, datetime.timedelta):
        return int((time.time() + when.total_seconds()) * 1000)
    if isinstance(when, datetime.datetime):
        return int(when.timestamp() * 1000)
    raise ValidationError(
        f"{field}: must be a datetime or a timedelta, got {when!r}", field=field
    )


class Lease:
    """Capacity taken by ``acquire``. ``adjust`` records the real usage (negative gives back; a
    balance may go into debt): the adjustments are kept here and written with the commit at the
    end of the ``acquire`` block, one call (``flush`` writes them sooner). ``consume`` takes more
    now, checked against the limits. ``consumed`` is what the lease holds, in tokens by limit
    name."""

    def __init__(
        self,
        limiter: _Api,
        lease_id: str,
        entity_id: str,
        resource: str,
        consumed: dict[str, int],
        statuses: Callable[[], list[LimitStatus]],
        ttl_ms: int,
        more: Callable[[dict[str, int], Callable[[Lease], None]], Any],
    ) -> None:
        self._limiter = limiter
        self.lease_id = lease_id
        #: How long the daemon keeps the lease after the last call on it (renewed while held).
        self.ttl_seconds = ttl_ms / 1000
        self.entity_id = entity_id
        self._resource = resource
        self._statuses = statuses
        self._converted: list[LimitStatus] | None = None
        # What the acquire took; the adjustments not yet written; the further leases `consume`
        # took (closed with this one).
        self._acquired = dict(consumed)
        self._pending: dict[str, int] = {}
        self._taken: list[Lease] = []
        # Acquires more of the same limits (`consume`): the call, whose answer (a further lease)
        # it hands to the callback.
        self._more = more
        self._closed = False
        #: Admitted under a bypass gate on this lease's resource (``lease.resource(name)`` for
        #: the others of an ``acquire(also=...)``): the entity's balances were not debited, its
        #: consumption is still counted.
        self.bypassed = False
        # The leases of the further resources of an acquire with `also`, by resource.
        self._others: dict[str, Lease] = {}

    @property
    def resources(self) -> tuple[str, ...]:
        """The resources this lease covers, its own first (more with ``acquire(also=...)``)."""
        return (self._resource, *self._others)

    def resource(self, name: str) -> Lease:
        """The lease of one resource of an ``acquire(also=...)``: adjusted on its own
        (``lease.resource("budget").adjust(weekly=5)``), committed or rolled back with this one.
        Its own resource's name gives this lease."""
        if name == self._resource:
            return self
        other = self._others.get(name)
        if other is None:
            raise ValidationError(
                f"resource: {name!r} is not a resource of this lease "
                f"(resources: {list(self.resources)})",
                field="resource",
            )
        return other

    @property
    def consumed(self) -> dict[str, int]:
        """What the lease holds, by limit name: acquired, taken by ``consume``, adjusted (written
        or not yet)."""
        total = dict(self._acquired)
        for part in (*(t._acquired for t in self._taken), self._pending):
            for name, value in part.items():
                total[name] = total.get(name, 0) + value
        return total

    @property
    def statuses(self) -> list[LimitStatus]:
        """The limits as the daemon saw them at its last decision on this lease (the acquire,
        or the latest ``consume``), converted when first read."""
        if self._converted is None:
            self._converted = self._statuses()
        return self._converted

    @property
    def overdrawn(self) -> list[str]:
        """The soft limits this acquire (or its latest ``consume``) took into debt, by name."""
        return [s.limit_name for s in self.statuses if s.overdrawn]

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise LeaseNotFound(f"lease {self.lease_id} is closed")

    def adjust(self, amounts_by_name: Mapping[str, int] | None = None, **amounts_kw: int) -> Any:
        """Adds consumption to the lease (``lease.adjust(tpm=1234)``); negative amounts give back,
        never more than the lease holds. Kept here and written with the commit (or ``flush``):
        no call now. A limit the lease does not have is refused when they are written."""
        self._check_open()
        delta = amounts("delta", {**(amounts_by_name or {}), **amounts_kw}, allow_negative=True)
        held = self.consumed
        for name, value in delta.items():
            if held.get(name, 0) + value < 0:
                raise ValidationError(
                    f"delta[{name}]: gives back {-value} tokens, more than the lease holds "
                    f"({held.get(name, 0)})",
                    field=f"delta[{name}]",
                    code="OUT_OF_RANGE",
                )
        for name, value in delta.items():
            self._pending[name] = self._pending.get(name, 0) + value
        return self._limiter._in_order()

    def release(self, amounts_by_name: Mapping[str, int] | None = None, **amounts_kw: int) -> Any:
        """Gives back capacity the lease holds (``adjust`` with the amounts negated)."""
        given = amounts("release", {**(amounts_by_name or {}), **amounts_kw}, allow_negative=False)
        return self.adjust({name: -value for name, value in given.items()})

    def consume(self, amounts_by_name: Mapping[str, int] | None = None, **amounts_kw: int) -> Any:
        """Takes more now, checked against the limits as an acquire is (``RateLimitExceeded``
        when it does not fit: nothing more is taken, the lease is unchanged). Committed or rolled
        back with the lease."""
        self._check_open()
        wanted = amounts("consume", {**(amounts_by_name or {}), **amounts_kw}, allow_negative=False)

        def taken(more: Lease) -> None:
            if self._closed:
                # Closed while the call was on its way: nobody will close this one. It is no
                # longer renewed, so it expires a lease TTL from now and stays consumed.
                more._closed = True
                self._limiter._held.release(more.lease_id)
                return
            self._taken.append(more)
            self._statuses, self._converted = more._statuses, None

        return self._more(wanted, taken)

    def flush(self) -> Any:
        """Writes the adjustments made so far (a long stream's running usage), and renews the
        lease. Refused (a limit the lease does not have): nothing of them is written and they
        are dropped; the lease stays open. Unanswered (``RateLimiterUnavailable``): they are kept
        for the next ``flush`` or the commit."""
        self._check_open()
        self._limiter._held.touch(self.lease_id)
        if not self._pending:
            return self.renew()
        delta = dict(self._pending)

        def settled(written: bool) -> None:
            """No longer pending: written (the lease now holds it), or refused (dropped)."""
            for name, value in delta.items():
                self._pending[name] = self._pending.get(name, 0) - value
            self._pending = {k: v for k, v in self._pending.items() if v}
            if written:
                self._acquired = _added(self._acquired, delta)

        request = message(pb.AdjustRequest, lease_id=self.lease_id, delta=delta)
        write = functools.partial(
            self._limiter._call,
            _rate_limiter_method("Adjust"),
            request,
            lambda _: settled(True),
            not_found=LeaseNotFound,
        )
        # Refused for good: dropped (it would be refused again at the end). Not heard of (the
        # daemon unreachable): kept, for the next flush or the commit.
        return self._limiter._recover(write, ValidationError, lambda: settled(False))

    def renew(self) -> Any:
        """Keeps the lease alive now (the limiter renews the leases it holds on its own)."""
        self._check_open()
        self._limiter._held.touch(self.lease_id)
        return self._limiter._call(
            _rate_limiter_method("Renew"),
            _renew_request(self.lease_id),
            lambda r: None,
            not_found=LeaseNotFound,
        )

    def _deltas(self) -> list[tuple[Lease, dict[str, int]]]:
        """Each lease to close (this one, those `consume` took) with the adjustments to write
        with its commit: a give-back beyond what this one acquired comes out of the others."""
        parts = [self, *self._taken]
        deltas: list[dict[str, int]] = [{} for _ in parts]
        for name, value in self._pending.items():
            if value >= 0:
                deltas[0][name] = value
                continue
            owed = -value
            for i, part in enumerate(parts):
                back = min(owed, part._acquired.get(name, 0))
                if back:
                    deltas[i][name] = -back
                    owed -= back
        return list(zip(parts, deltas))

    def _close(self, method: str) -> Any:
        self._check_open()
        closing = [self, *(o for o in self._others.values() if not o._closed)]
        calls = []
        for lease in closing:
            for part, delta in lease._deltas():
                part._closed = True
                self._limiter._held.release(part.lease_id)
                commit = method == "Commit"
                calls.append(
                    functools.partial(
                        self._limiter._settle, part.lease_id, method, delta if commit else {}
                    )
                )
            lease._closed = True
            lease._pending = {}
        return self._limiter._in_order(*calls)

    def commit(self) -> Any:
        """Makes the consumption final now, with the adjustments not yet written (the
        ``acquire`` block then has nothing left to do); the leases of the further resources
        too. Adjustments the daemon refuses (a limit the lease does not have) raise, and the
        lease is committed without them."""
        return self._close("Commit")

    def rollback(self) -> Any:
        """Gives everything back now."""
        return self._close("Rollback")


def _added(into: dict[str, int], delta: Mapping[str, int]) -> dict[str, int]:
    total = dict(into)
    for name, value in delta.items():
        total[name] = total.get(name, 0) + value
    return total


class SyncLease(Lease):
    """A lease of a ``SyncRateLimiter``: the same calls, returning when done (``Lease``'s are
    awaited)."""


class _Acquire:
    """The context manager ``acquire`` returns: ``async with`` on a ``RateLimiter``, ``with`` on a
    ``SyncRateLimiter``."""

    def __init__(
        self,
        limiter: _Api,
        request: bytes,
        entity_id: str,
        resource: str,
        consume: dict[str, int],
        limits: dict[str, Limit],
        also: dict[str, dict[str, int]],
        more: Callable[[str, dict[str, int]], bytes],
    ) -> None:
        self._limiter = limiter
        self._request = request
        # The request that takes more of a resource (`lease.consume`).
        self._more_request = more
        self._entity_id = entity_id
        self._resource = resource
        self._consume = consume
        self._limits = limits
        self._also = also
        self._lease: Lease | None = None

    def _lease_from(
        self,
        response: pb.AcquireResponse,
        more_of: str | None = None,
        wanted: dict[str, int] | None = None,
    ) -> Lease:
        """The lease an acquire gave (of resource ``more_of``, holding ``wanted``, for one
        ``lease.consume``)."""
        if not response.allowed:
            raise _refused(response, self._entity_id, more_of or self._resource, self._limits)
        kind = SyncLease if isinstance(self._limiter, SyncRateLimiter) else Lease
        limiter = self._limiter

        def taking(resource: str) -> Callable[[dict[str, int], Callable[[Lease], None]], Any]:
            def more(wanted: dict[str, int], taken: Callable[[Lease], None]) -> Any:
                request = self._more_request(resource, wanted)

                def convert(r: pb.AcquireResponse) -> None:
                    taken(self._lease_from(r, resource, wanted))

                return limiter._call(_rate_limiter_method("Acquire"), request, convert)

            return more

        def lease(lease_id: str, resource: str, consumed: dict[str, int]) -> Lease:
            raw = [s for s in response.statuses if s.resource in ("", resource)]

            def statuses() -> list[LimitStatus]:
                return [
                    LimitStatus._from_pb(s, self._entity_id, resource, self._limits) for s in raw
                ]

            held = kind(
                self._limiter,
                lease_id,
                self._entity_id,
                resource,
                consumed,
                statuses,
                response.lease_ttl_ms,
                taking(resource),
            )
            self._limiter._renew_while_held(lease_id, response.lease_ttl_ms)
            # With `also`, each resource says for itself.
            held.bypassed = (
                resource in response.bypassed_resources
                if self._also and more_of is None
                else response.bypassed
            )
            return held

        if more_of is not None:
            # One `lease.consume`: a lease of its own, closed with the one it adds to.
            return lease(response.lease_id, more_of, dict(wanted or {}))
        self._lease = lease(response.lease_id, self._resource, self._consume)
        for other in response.also:
            consumed = self._also.get(other.resource, {})
            self._lease._others[other.resource] = lease(other.lease_id, other.resource, consumed)
        return self._lease

    async def __aenter__(self) -> Lease:
        if not isinstance(self._limiter, RateLimiter):
            raise TypeError("use `with limiter.acquire(...)` with a SyncRateLimiter")
        return await self._limiter._call(
            _rate_limiter_method("Acquire"), self._request, self._lease_from
        )

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> bool:
        lease = self._lease
        if lease is None or lease.closed:
            return False
        if exc_type is None:
            await lease.commit()
            return False
        try:
            await lease.rollback()
        except ZAELimiterError:
            # The caller's exception matters more. A rollback the daemon never heard of leaves
            # the lease to expire, and what it took stays consumed.
            pass
        return False

    def __enter__(self) -> Lease:
        if not isinstance(self._limiter, SyncRateLimiter):
            raise TypeError("use `async with limiter.acquire(...)` with a RateLimiter")
        return self._limiter._call(_rate_limiter_method("Acquire"), self._request, self._lease_from)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        lease = self._lease
        if lease is None or lease.closed:
            return False
        if exc_type is None:
            lease.commit()
            return False
        try:
            lease.rollback()
        except ZAELimiterError:
            pass
        return False


class RateLimiter(_Api):
    """The daemon's API for asyncio code.

    ``socket``: the daemon's Unix socket (default: ``$ZAE_LIMITER_SOCKET``, then
    ``/tmp/zae-limiter.sock``). ``namespace``: the namespace of every call (default: the daemon's
    first). ``timeout``: seconds per call; past it a call raises ``RateLimiterUnavailable`` and
    the daemon does not charge it.

    Calls go over one HTTP/2 connection per limiter (``_h2``: a small gRPC transport made for
    this, several times cheaper per call than ``grpc.aio``), opened on first use and again after
    it closes.
    """

    def __init__(
        self,
        socket: str | None = None,
        namespace: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(socket, namespace, timeout)
        self._channel: _h2.Channel | None = None
        self._owner: Any = None
        self._renewer: asyncio.Task[None] | None = None

    def _renew_while_held(self, lease_id: str, ttl_ms: int) -> None:
        if not self._held.hold(lease_id, ttl_ms):
            return
        loop = asyncio.get_running_loop()
        renewer = self._renewer
        if renewer is None or renewer.done() or renewer.get_loop() is not loop:
            self._renewer = loop.create_task(self._renew())

    async def _renew(self) -> None:
        """Renews the held leases until none is left (started again by the next one)."""
        while self._held:
            due, pause = self._held.due()
            if due:
                results = await asyncio.gather(
                    *(
                        self._call(
                            _rate_limiter_method("Renew"),
                            _renew_request(lease_id),
                            lambda r: None,
                            not_found=LeaseNotFound,
                        )
                        for lease_id in due
                    ),
                    return_exceptions=True,
                )
                for lease_id, result in zip(due, results):
                    if isinstance(result, LeaseNotFound):
                        self._held.release(lease_id)
                    elif not isinstance(result, BaseException):
                        self._held.touch(lease_id)
            await asyncio.sleep(pause)

    def _current_channel(self) -> _h2.Channel:
        owner = (os.getpid(), asyncio.get_running_loop())
        if self._channel is None or self._owner != owner:
            # A new process or event loop: a connection belongs to the one that made it.
            self._channel = _h2.Channel(self.socket)
            self._owner = owner
        return self._channel

    async def _call(  # type: ignore[override]
        self,
        method: _Method,
        request: Any,
        convert: Callable[[Any], Any],
        *,
        missing: Any = _RAISE,
        not_found: type = NotFound,
        principal: str | None = None,
    ) -> Any:
        metadata = _principal_metadata(principal)
        channel = self._current_channel()
        try:
            payload = request if type(request) is bytes else request.SerializeToString()
            answer = await channel.unary(method.path, payload, self.timeout, metadata)
            response = method.response.FromString(answer)
        except _h2.CallError as err:
            if missing is not _RAISE and err.code == "NOT_FOUND":
                return missing
            raise from_status(
                err.code,
                err.details,
                socket=self.socket,
                not_found=not_found,
                status_details=err.status_details,
            ) from None
        except DecodeError as err:
            raise from_status("INTERNAL", f"unreadable answer: {err}", socket=self.socket) from None
        return convert(response)

    async def _in_order(self, *calls: Callable[[], Any]) -> Any:  # type: ignore[override]
        answer = None
        for call in calls:
            answer = await call()
        return answer

    async def _each(self, *calls: Callable[[], Any]) -> Any:  # type: ignore[override]
        return tuple([await call() for call in calls])

    async def _recover(  # type: ignore[override]
        self, call: Callable[[], Any], kind: type[BaseException], then: Callable[[], Any]
    ) -> Any:
        try:
            return await call()
        except kind:
            after = then()
            if inspect.isawaitable(after):
                try:
                    await after
                except ZAELimiterError:
                    pass
            raise

    async def get_usage_summary(
        self,
        entity_id: str | None = None,
        resource: str | None = None,
        window_type: str | None = None,
        start_time: _DateOrMs = None,
        end_time: _DateOrMs = None,
    ) -> UsageSummary:
        """The snapshots ``get_usage_snapshots`` would list, every page, added up."""
        snapshots: list[UsageSnapshot] = []
        next_key = None
        while True:
            page, next_key = await self.get_usage_snapshots(
                entity_id, resource, window_type, start_time, end_time, 1000, next_key
            )
            snapshots.extend(page)
            if next_key is None:
                return UsageSummary._of(snapshots)

    async def is_available(self, timeout: float = 1.0) -> bool:
        """Whether the daemon answers its health check with SERVING within ``timeout`` seconds
        (never raises)."""
        try:
            answer = await self._current_channel().unary(_HEALTH, b"", timeout)
        except _h2.CallError:
            return False
        return answer == _SERVING

    async def close(self) -> None:
        """Closes the connection (a later call opens a new one) and stops renewing leases."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None and not renewer.done():
            renewer.cancel()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    async def __aenter__(self) -> RateLimiter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SyncRateLimiter(_Api):
    """The same API for code without an event loop, over a ``grpcio`` channel; thread-safe (one
    channel shared by every thread)."""

    def __init__(
        self,
        socket: str | None = None,
        namespace: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(socket, namespace, timeout)
        self._channel: grpc.Channel | None = None
        self._calls: dict[str, Any] = {}
        self._pid: int | None = None
        self._lock = threading.Lock()
        # Held leases are renewed by one thread per limiter, started when needed.
        self._renewer_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._renewer_pid: int | None = None

    def _renew_while_held(self, lease_id: str, ttl_ms: int) -> None:
        with self._renewer_lock:
            if self._renewer_pid != os.getpid():
                # A new process: the parent's thread and leases are not this one's.
                self._held.clear()
                self._renewer, self._renewer_pid = None, os.getpid()
            if not self._held.hold(lease_id, ttl_ms):
                return
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=self._renew, name="zae-limiter-renew", daemon=True
                )
                self._renewer.start()

    def _renew(self) -> None:
        """Renews the held leases until none is left (started again by the next one)."""
        while True:
            with self._renewer_lock:
                if not self._held:
                    self._renewer = None
                    return
            due, pause = self._held.due()
            for lease_id in due:
                try:
                    self._call(
                        _rate_limiter_method("Renew"),
                        _renew_request(lease_id),
                        lambda r: None,
                        not_found=LeaseNotFound,
                    )
                except LeaseNotFound:
                    self._held.release(lease_id)
                except ZAELimiterError:
                    continue
                else:
                    self._held.touch(lease_id)
            time.sleep(pause)

    def _callable(self, path: str) -> Any:
        with self._lock:
            if self._channel is None or self._pid != os.getpid():
                # A new process: a channel does not survive fork().
                self._channel = grpc.insecure_channel(
                    f"unix:{self.socket}", options=_CHANNEL_OPTIONS
                )
                self._calls = {}
                self._pid = os.getpid()
            call = self._calls.get(path)
            if call is None:
                # Bytes in and out: requests are serialized, answers parsed, by the caller.
                call = self._calls[path] = self._channel.unary_unary(path)
            return call

    def _call(
        self,
        method: _Method,
        request: Any,
        convert: Callable[[Any], Any],
        *,
        missing: Any = _RAISE,
        not_found: type = NotFound,
        principal: str | None = None,
    ) -> Any:
        metadata = _principal_metadata(principal)
        payload = request if type(request) is bytes else request.SerializeToString()
        try:
            answer = self._callable(method.path)(
                payload, timeout=self.timeout, metadata=metadata or None
            )
            response = method.response.FromString(answer)
        except grpc.RpcError as err:
            return self._error(err, missing, not_found)
        except DecodeError as err:
            raise from_status("INTERNAL", f"unreadable answer: {err}", socket=self.socket) from None
        return convert(response)

    def _in_order(self, *calls: Callable[[], Any]) -> Any:
        answer = None
        for call in calls:
            answer = call()
        return answer

    def _each(self, *calls: Callable[[], Any]) -> Any:
        return tuple(call() for call in calls)

    def _recover(
        self, call: Callable[[], Any], kind: type[BaseException], then: Callable[[], Any]
    ) -> Any:
        try:
            return call()
        except kind:
            try:
                then()
            except ZAELimiterError:
                pass
            raise

    def get_usage_summary(
        self,
        entity_id: str | None = None,
        resource: str | None = None,
        window_type: str | None = None,
        start_time: _DateOrMs = None,
        end_time: _DateOrMs = None,
    ) -> UsageSummary:
        """The snapshots ``get_usage_snapshots`` would list, every page, added up."""
        snapshots: list[UsageSnapshot] = []
        next_key = None
        while True:
            page, next_key = self.get_usage_snapshots(
                entity_id, resource, window_type, start_time, end_time, 1000, next_key
            )
            snapshots.extend(page)
            if next_key is None:
                return UsageSummary._of(snapshots)

    def is_available(self, timeout: float = 1.0) -> bool:
        """Whether the daemon answers its health check with SERVING within ``timeout`` seconds
        (never raises)."""
        try:
            answer = self._callable(_HEALTH)(b"", timeout=timeout)
        except grpc.RpcError:
            return False
        return answer == _SERVING

    def _error(self, err: grpc.RpcError, missing: Any, not_found: type) -> Any:
        """The result for NOT_FOUND when the call has one, else the exception to raise."""
        if missing is not _RAISE and err.code() == grpc.StatusCode.NOT_FOUND:
            return missing
        raise from_rpc(err, socket=self.socket, not_found=not_found) from None

    def close(self) -> None:
        with self._lock:
            channel, self._channel, self._calls = self._channel, None, {}
        if channel is not None:
            channel.close()

    def __enter__(self) -> SyncRateLimiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
