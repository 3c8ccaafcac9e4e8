"""Limits, statuses and admin records as plain Python values, and their protobuf forms."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ._errors import ValidationError, _validation_kind
from ._proto import ratelimit_pb2 as pb

_SECOND_MS = 1_000
_MINUTE_MS = 60 * _SECOND_MS
_HOUR_MS = 60 * _MINUTE_MS
_DAY_MS = 24 * _HOUR_MS
_U64_MAX = 2**64 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def _whole(field: str, value: Any, *, low: int, high: int) -> int:
    """An integer in [low, high], else a ValidationError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{field}: must be a whole number, got {value!r}", field=field)
    if not low <= value <= high:
        raise ValidationError(f"{field}: {value} is outside {low}..={high}", field=field)
    return value


class OnUnavailable(enum.Enum):
    """What an acquire does when the daemon's store cannot answer in time (the library's
    names). ``ALLOW`` admits without recording; ``BLOCK`` raises ``RateLimiterUnavailable``."""

    ALLOW = "allow"
    BLOCK = "block"


def _on_unavailable(value: OnUnavailable | str | None) -> int:
    """The wire value of a failure policy (``None``: unspecified)."""
    if value is None:
        return pb.ON_UNAVAILABLE_UNSPECIFIED
    try:
        policy = OnUnavailable(value)
    except ValueError:
        raise ValidationError(
            f"on_unavailable: must be 'allow', 'block' or an OnUnavailable, got {value!r}",
            field="on_unavailable",
        ) from None
    return pb.ON_UNAVAILABLE_ALLOW if policy is OnUnavailable.ALLOW else pb.ON_UNAVAILABLE_BLOCK


def _on_unavailable_from_pb(value: int) -> OnUnavailable | None:
    return {
        pb.ON_UNAVAILABLE_ALLOW: OnUnavailable.ALLOW,
        pb.ON_UNAVAILABLE_BLOCK: OnUnavailable.BLOCK,
    }.get(value)


class LimitName:
    """Common limit names, as the Python zae-limiter spells them (any name of letters, digits,
    ``_``, ``-`` and ``.`` is a limit name)."""

    RPM = "rpm"  # requests per minute
    RPH = "rph"  # requests per hour
    RPD = "rpd"  # requests per day
    TPM = "tpm"  # tokens per minute
    TPH = "tph"  # tokens per hour
    TPD = "tpd"  # tokens per day


_MAX_TOKENS = 10**15
_MAX_SCALE = 10**6


@dataclasses.dataclass(frozen=True)
class ScheduleEntry:
    """One entry of a limit's schedule, as in the Python zae-limiter: while the five-field
    ``cron`` pattern matches (minute by minute, in the IANA zone ``tz``: ``"* 9-17 * * MON-FRI"``
    is business hours), the first matching entry changes the limit: ``scale`` multiplies its
    capacity and refill amount (to a thousandth, rounded down), or ``capacity``,
    ``refill_amount`` and ``refill_period_seconds`` replace its own. Give one or the other.
    Every entry of a schedule has the same ``tz``. The daemon checks the pattern and zone."""

    cron: str
    tz: str = "UTC"
    scale: float | None = None
    capacity: int | None = None
    refill_amount: int | None = None
    refill_period_seconds: int | None = None

    def __post_init__(self) -> None:
        for field in ("cron", "tz"):
            if not isinstance(getattr(self, field), str):
                raise ValidationError(
                    f"schedule entry: {field} must be a string, got {getattr(self, field)!r}",
                    field=field,
                )
        absolutes = (self.capacity, self.refill_amount, self.refill_period_seconds)
        if (self.scale is None) == all(v is None for v in absolutes):
            raise ValidationError(
                "schedule entry: give scale= or the values it sets (capacity=, refill_amount=, "
                "refill_period_seconds=), one or the other",
                field="scale",
            )
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
                raise ValidationError(
                    f"schedule entry: scale must be a number, got {self.scale!r}", field="scale"
                )
            if not math.isfinite(self.scale) or not 0 < self.scale <= _MAX_SCALE:
                raise ValidationError(
                    f"schedule entry: scale must be above 0 and at most {_MAX_SCALE}, "
                    f"got {self.scale!r}",
                    field="scale",
                )
        for field, high in (
            ("capacity", _MAX_TOKENS),
            ("refill_amount", _MAX_TOKENS),
            ("refill_period_seconds", 10 * 366 * 86_400),
        ):
            value = getattr(self, field)
            if value is not None:
                _whole(f"schedule entry: {field}", value, low=1, high=high)

    @property
    def scale_permille(self) -> int:
        """The scale in thousandths, as the daemon takes it (0: the entry sets values)."""
        return 0 if self.scale is None else max(1, round(self.scale * 1000))

    def _to_pb(self) -> pb.ScheduleEntry:
        return pb.ScheduleEntry(
            cron=self.cron,
            scale_permille=self.scale_permille,
            capacity=self.capacity or 0,
            refill_amount=self.refill_amount or 0,
            refill_period_ms=(self.refill_period_seconds or 0) * 1000,
        )

    @classmethod
    def _from_pb(cls, entry: pb.ScheduleEntry, tz: str) -> ScheduleEntry:
        if entry.scale_permille:
            return cls(entry.cron, tz or "UTC", scale=entry.scale_permille / 1000)
        return cls(
            entry.cron,
            tz or "UTC",
            capacity=entry.capacity or None,
            refill_amount=entry.refill_amount or None,
            refill_period_seconds=(entry.refill_period_ms // 1000) or None,
        )


@dataclasses.dataclass(frozen=True, init=False)
class Limit:
    """A token bucket: ``capacity`` tokens (the burst), refilled by ``refill_amount`` tokens every
    ``refill_period_seconds`` seconds, as in the Python zae-limiter:
    ``Limit("rpm", 100, 100, 60)`` is 100 per minute. Build it with the class methods, or give the
    period in milliseconds with the keyword ``refill_period_ms`` instead of the fourth field.

    ``soft=True`` meters the limit without enforcing it: it is debited like any other, may go
    into debt, and never refuses (its status says ``overdrawn`` when the request took it into
    debt). Given in a call's ``limits``, it is soft for that call only.

    ``Limit.quota(name, amount, cron="0 0 1 * *", tz="UTC")`` is a calendar quota: no drip
    (``refill_amount`` and ``refill_period_ms`` are 0); the balance goes back to ``amount``, debt
    forgiven, at each instant the five-field cron pattern starts matching in the IANA zone
    ``tz``. ``Limit.quota(name, amount, reset_after=timedelta(hours=5))`` is a session quota:
    the entity's first admitted use opens a window of that length, and its amount comes back at
    the window's end; an idle entity's next use opens a new one.

    ``limit.with_schedule((ScheduleEntry("* 9-17 * * MON-FRI", scale=2.0), ...))`` is the same
    dripping limit under a schedule (see ``ScheduleEntry``); a quota has none."""

    name: str
    capacity: int
    refill_amount: int
    #: The period in milliseconds (the daemon's resolution).
    refill_period_ms: int
    soft: bool = False
    #: A calendar quota's cron pattern (``""``: a dripping limit) and its time zone.
    quota_cron: str = ""
    quota_tz: str = ""
    #: A session quota's window in milliseconds (0: not a session quota).
    quota_reset_after_ms: int = 0
    #: A dripping limit's schedule (see ``with_schedule``).
    schedule: tuple[ScheduleEntry, ...] = ()

    def __init__(
        self,
        name: str,
        capacity: int,
        refill_amount: int,
        refill_period_seconds: float | None = None,
        *,
        refill_period_ms: int | None = None,
        soft: bool = False,
        quota_cron: str = "",
        quota_tz: str = "",
        quota_reset_after_ms: int = 0,
        schedule: Sequence[ScheduleEntry] = (),
    ) -> None:
        schedule = tuple(schedule)
        for entry in schedule:
            if not isinstance(entry, ScheduleEntry):
                raise ValidationError(
                    f"limit {name}: a schedule is ScheduleEntry values, got {entry!r}",
                    field="schedule",
                )
        if len({entry.tz for entry in schedule}) > 1:
            raise ValidationError(
                f"limit {name}: every entry of a schedule has the same tz", field="schedule"
            )
        object.__setattr__(self, "schedule", schedule)
        for field, value in (("quota_cron", quota_cron), ("quota_tz", quota_tz)):
            if not isinstance(value, str):
                raise ValidationError(
                    f"limit {name}: {field} must be a string, got {value!r}", field=field
                )
        object.__setattr__(self, "quota_cron", quota_cron)
        object.__setattr__(self, "quota_tz", quota_tz)
        object.__setattr__(
            self,
            "quota_reset_after_ms",
            _whole(f"limit {name}: quota_reset_after_ms", quota_reset_after_ms, low=0, high=_U64_MAX),
        )
        if (refill_period_seconds is None) == (refill_period_ms is None):
            raise ValidationError(
                f"limit {name}: give the refill period once, in seconds (the fourth field) or "
                "in milliseconds (refill_period_ms=)",
                field="refill_period_seconds",
            )
        if refill_period_ms is None:
            if isinstance(refill_period_seconds, bool) or not isinstance(
                refill_period_seconds, (int, float)
            ):
                raise ValidationError(
                    f"limit {name}: refill_period_seconds must be a number, "
                    f"got {refill_period_seconds!r}",
                    field="refill_period_seconds",
                )
            if not math.isfinite(refill_period_seconds):
                raise ValidationError(
                    f"limit {name}: refill_period_seconds must be finite, "
                    f"got {refill_period_seconds!r}",
                    field="refill_period_seconds",
                )
            refill_period_ms = round(refill_period_seconds * 1000)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "capacity", capacity)
        object.__setattr__(self, "refill_amount", refill_amount)
        object.__setattr__(self, "refill_period_ms", refill_period_ms)
        if not isinstance(soft, bool):
            raise ValidationError(
                f"limit {name}: soft must be True or False, got {soft!r}", field="soft"
            )
        object.__setattr__(self, "soft", soft)
        self.__post_init__()

    def __post_init__(self) -> None:
        _whole(f"limit {self.name}: capacity", self.capacity, low=0, high=_U64_MAX)
        _whole(
            f"limit {self.name}: refill_amount",
            self.refill_amount,
            low=0,
            high=_U64_MAX,
        )
        _whole(
            f"limit {self.name}: refill_period_ms",
            self.refill_period_ms,
            low=0,
            high=_U64_MAX,
        )

    def with_schedule(self, schedule: Sequence[ScheduleEntry]) -> Limit:
        """This limit under ``schedule`` (``()``: none), as in the Python zae-limiter."""
        return dataclasses.replace(self, schedule=tuple(schedule))

    @property
    def is_quota(self) -> bool:
        """Whether the limit is a quota (no drip): a calendar or a session quota."""
        return bool(self.quota_cron) or self.quota_reset_after_ms > 0

    @property
    def reset_after(self) -> datetime.timedelta | None:
        """A session quota's window (``None`` for other limits)."""
        if not self.quota_reset_after_ms:
            return None
        return datetime.timedelta(milliseconds=self.quota_reset_after_ms)

    @classmethod
    def quota(
        cls,
        name: str,
        amount: int,
        *,
        cron: str | None = None,
        tz: str = "UTC",
        reset_after: Any = None,
        soft: bool = False,
    ) -> Limit:
        """``amount`` per calendar period: all of it back, in one lump and debt forgiven, at
        each instant the five-field ``cron`` pattern starts matching in the IANA zone ``tz``
        (``"0 0 1 * *"``: the first of each month), applied by the first request after it;
        ``retry_after`` is the time to that instant. The daemon checks the pattern and zone."""
        if reset_after is not None:
            if cron is not None:
                raise ValidationError(
                    f"limit {name}: give cron= or reset_after=, not both", field="reset_after"
                )
            if not isinstance(reset_after, datetime.timedelta):
                raise ValidationError(
                    f"limit {name}: reset_after must be a timedelta, got {reset_after!r}",
                    field="reset_after",
                )
            ms = round(reset_after.total_seconds() * 1000)
            if ms <= 0 or ms % 1000:
                raise ValidationError(
                    f"limit {name}: reset_after must be a positive whole number of seconds, "
                    f"got {reset_after!r}",
                    field="reset_after",
                )
            return cls(name, amount, 0, refill_period_ms=0, soft=soft, quota_reset_after_ms=ms)
        if not cron:
            raise ValidationError(
                f"limit {name}: a quota needs cron=... or reset_after=...", field="cron"
            )
        return cls(
            name, amount, 0, refill_period_ms=0, soft=soft, quota_cron=cron, quota_tz=tz
        )

    @property
    def burst(self) -> int:
        """The most tokens one burst can take: the capacity."""
        return self.capacity

    @property
    def refill_period_seconds(self) -> float:
        return self.refill_period_ms / 1000

    @classmethod
    def _per(
        cls, name: str, rate: int, burst: int | None, period_ms: int, soft: bool
    ) -> Limit:
        return cls(
            name, rate if burst is None else burst, rate, refill_period_ms=period_ms, soft=soft
        )

    @classmethod
    def per_second(
        cls, name: str, rate: int, burst: int | None = None, *, soft: bool = False
    ) -> Limit:
        """``rate`` tokens per second; capacity ``burst`` (default: ``rate``)."""
        return cls._per(name, rate, burst, _SECOND_MS, soft)

    @classmethod
    def per_minute(
        cls, name: str, rate: int, burst: int | None = None, *, soft: bool = False
    ) -> Limit:
        return cls._per(name, rate, burst, _MINUTE_MS, soft)

    @classmethod
    def per_hour(
        cls, name: str, rate: int, burst: int | None = None, *, soft: bool = False
    ) -> Limit:
        return cls._per(name, rate, burst, _HOUR_MS, soft)

    @classmethod
    def per_day(
        cls, name: str, rate: int, burst: int | None = None, *, soft: bool = False
    ) -> Limit:
        return cls._per(name, rate, burst, _DAY_MS, soft)

    @classmethod
    def custom(
        cls,
        name: str,
        capacity: int,
        refill_amount: int,
        refill_period_seconds: float,
        *,
        soft: bool = False,
    ) -> Limit:
        """``capacity`` tokens, refilled by ``refill_amount`` every ``refill_period_seconds``
        (millisecond resolution): the same as ``Limit(name, capacity, refill_amount,
        refill_period_seconds)``."""
        return cls(name, capacity, refill_amount, refill_period_seconds, soft=soft)

    def _to_pb(self) -> pb.Limit:
        return pb.Limit(
            name=self.name,
            capacity=self.capacity,
            refill_amount=self.refill_amount,
            refill_period_ms=self.refill_period_ms,
            soft=self.soft,
            quota_cron=self.quota_cron,
            quota_tz=self.quota_tz,
            quota_reset_after_ms=self.quota_reset_after_ms,
            schedule=[entry._to_pb() for entry in self.schedule],
            schedule_tz=self.schedule[0].tz if self.schedule else "",
        )

    @classmethod
    def _from_pb(cls, limit: pb.Limit) -> Limit:
        return cls(
            limit.name,
            limit.capacity,
            limit.refill_amount,
            refill_period_ms=limit.refill_period_ms,
            soft=limit.soft,
            quota_cron=limit.quota_cron,
            quota_tz=limit.quota_tz,
            quota_reset_after_ms=limit.quota_reset_after_ms,
            schedule=[ScheduleEntry._from_pb(e, limit.schedule_tz) for e in limit.schedule],
        )


@dataclasses.dataclass(slots=True)
class LimitStatus:
    """One limit as the daemon saw it when it decided. ``available`` is in whole tokens (rounded
    down, negative in debt); ``retry_after_seconds`` is 0 when the request fits and ``None`` when it
    never can (more than the capacity)."""

    entity_id: str
    resource: str
    limit_name: str
    available: int
    requested: int
    exceeded: bool
    retry_after_seconds: float | None
    available_milli: int
    requested_milli: int
    limit: Limit | None = None
    #: A soft limit: it allowed the request whatever its balance.
    soft: bool = False
    #: A soft limit the request took into debt (or deeper). The Python zae-limiter's status
    #: says ``available < 0``, before the request; this one counts the request too.
    overdrawn: bool = False
    #: Of a quota: when its amount comes back (a calendar's next edge, a session window's end),
    #: ms since the Unix epoch; ``None`` for a dripping limit or a session with no window open.
    resets_at_ms: int | None = None

    @classmethod
    def _from_pb(
        cls,
        status: pb.LimitStatus,
        entity_id: str,
        resource: str,
        limits: Mapping[str, Limit],
    ) -> LimitStatus:
        retry = status.retry_after_ms / 1000 if status.HasField("retry_after_ms") else None
        return cls(
            entity_id=entity_id,
            resource=resource,
            limit_name=status.name,
            available=status.available_milli // 1000,
            requested=-(-status.requested_milli // 1000),
            exceeded=not status.allowed,
            retry_after_seconds=retry,
            available_milli=status.available_milli,
            requested_milli=status.requested_milli,
            # Of a scheduled limit, the one in force (as the Python zae-limiter reports it).
            limit=Limit._from_pb(status.in_force)
            if status.HasField("in_force")
            else limits.get(status.name)
            or (Limit._from_pb(status.limit) if status.HasField("limit") else None),
            soft=status.soft,
            overdrawn=status.overdrawn,
            resets_at_ms=status.resets_at_ms if status.HasField("resets_at_ms") else None,
        )

    @property
    def deficit(self) -> int:
        """Whole tokens the request lacks (0 when it fits, and always 0 for a soft limit)."""
        if self.soft:
            return 0
        return max(0, -(-(self.requested_milli - self.available_milli) // 1000))

    def deficit_seconds(self) -> float | None:
        """Seconds for the refill to make up what the request lacks, by the Python zae-limiter's
        formula (``((deficit * period) // amount + 1) / 1000``), even when the request can never
        fit (then it is refused again after that wait); ``None`` when the limit is unknown."""
        limit = self.limit
        if limit is None or limit.refill_amount == 0:
            return None
        deficit = max(self.requested_milli - self.available_milli, 0)
        return ((deficit * limit.refill_period_ms) // (limit.refill_amount * 1000) + 1) / 1000

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "entity_id": self.entity_id,
            "resource": self.resource,
            "limit_name": self.limit_name,
            "available": self.available,
            "requested": self.requested,
            "exceeded": self.exceeded,
            "retry_after_seconds": self.retry_after_seconds,
            "soft": self.soft,
            "kind": "quota" if self.limit is not None and self.limit.is_quota else "rate",
        }
        if self.resets_at_ms is not None:
            body["resets_at_ms"] = self.resets_at_ms
        if self.limit is not None:
            body.update(
                capacity=self.limit.capacity,
                refill_amount=self.limit.refill_amount,
                refill_period_seconds=self.limit.refill_period_seconds,
            )
        return body


@dataclasses.dataclass(frozen=True)
class Availability:
    """Every limit of one bucket from one snapshot (``check_availability``): nothing is consumed.
    ``checked_at_ms`` is this process's clock when the answer came."""

    entity_id: str
    resource: str
    checked_at_ms: int
    statuses: list[LimitStatus]
    #: A bypass gate decides for the bucket: an acquire is admitted whatever the statuses say.
    bypassed: bool = False

    def status(self, limit_name: str) -> LimitStatus | None:
        return next((s for s in self.statuses if s.limit_name == limit_name), None)

    @property
    def limits(self) -> list[Limit | None]:
        return [s.limit for s in self.statuses]

    @property
    def available(self) -> dict[str, int]:
        """Whole tokens available per limit (negative in debt)."""
        return {s.limit_name: s.available for s in self.statuses}

    @property
    def needed(self) -> dict[str, int]:
        return {s.limit_name: s.requested for s in self.statuses if s.requested > 0}

    @property
    def exceeded(self) -> list[str]:
        return [s.limit_name for s in self.statuses if s.exceeded]

    @property
    def allowed(self) -> bool:
        return self.bypassed or not self.exceeded

    @property
    def deficit(self) -> dict[str, int]:
        """Whole tokens each exceeded limit lacks."""
        return {s.limit_name: s.deficit for s in self.statuses if s.exceeded}

    @property
    def retry_after_seconds(self) -> float:
        """Seconds until every needed amount fits (0.0 now; ``math.inf`` when one never can)."""
        if self.bypassed:
            return 0.0
        waits = [
            math.inf if s.retry_after_seconds is None else s.retry_after_seconds
            for s in self.statuses
        ]
        return max(waits, default=0.0)


@dataclasses.dataclass(frozen=True)
class Entity:
    id: str
    name: str = ""
    parent_id: str | None = None
    cascade: bool = False
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def _from_pb(cls, entity: pb.Entity) -> Entity:
        return cls(
            id=entity.id,
            name=entity.name,
            parent_id=entity.parent_id if entity.HasField("parent_id") else None,
            cascade=entity.cascade,
            metadata=dict(entity.metadata),
        )


@dataclasses.dataclass(frozen=True)
class AuditEvent:
    """One change of an entity or of stored limits. ``before``/``after`` are the daemon's text
    forms; ``at_ms`` is milliseconds since the Unix epoch."""

    subject: str
    action: str
    principal: str
    at_ms: int
    before: str | None
    after: str | None

    @property
    def timestamp(self) -> str:
        """The library's name: when, as an ISO 8601 UTC timestamp (``2026-12-04T10:00:00.123Z``)."""
        moment = datetime.datetime.fromtimestamp(self.at_ms / 1000, tz=datetime.timezone.utc)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{self.at_ms % 1000:03d}Z"

    @property
    def entity_id(self) -> str | None:
        """The library's name: the entity changed (``None`` for resource and system records)."""
        return None if self.subject.startswith("#") else self.subject

    @property
    def resource(self) -> str | None:
        """The library's name: the resource whose defaults changed (``#resource:NAME`` records)."""
        prefix = "#resource:"
        return self.subject[len(prefix) :] if self.subject.startswith(prefix) else None

    @property
    def details(self) -> dict[str, str | None]:
        """The library's name: what changed, ``{"before": ..., "after": ...}``."""
        return {"before": self.before, "after": self.after}

    @classmethod
    def _from_pb(cls, record: pb.AuditRecord) -> AuditEvent:
        return cls(
            subject=record.subject,
            action=record.action,
            principal=record.principal,
            at_ms=record.at_ms,
            before=record.before if record.HasField("before") else None,
            after=record.after if record.HasField("after") else None,
        )


class AuditAction:
    """The audit actions the daemon records, as the library's constants (``event.action ==
    AuditAction.LIMITS_SET``). ``ENTITY_PARENT_CHANGED`` is recorded as ``"entity_moved"``; the
    others the library has are spelled as its own. The rest are the daemon's further changes."""

    ENTITY_CREATED = "entity_created"
    ENTITY_DELETED = "entity_deleted"
    LIMITS_SET = "limits_set"
    LIMITS_DELETED = "limits_deleted"
    ENTITY_PARENT_CHANGED = "entity_moved"
    BUCKET_RESET = "bucket_reset"
    BUCKET_TOPPED_UP = "bucket_topped_up"
    GATE_SET = "gate_set"
    GATE_CLEARED = "gate_cleared"
    CASCADE_SET = "cascade_set"
    CASCADE_CLEARED = "cascade_cleared"
    FAILURE_POLICY_SET = "failure_policy_set"
    FAILURE_POLICY_DELETED = "failure_policy_deleted"


@dataclasses.dataclass(frozen=True)
class AuditPage:
    """A page of audit events, newest first; iterating it iterates the events."""

    events: Sequence[AuditEvent]
    #: Pass as ``page`` for the next (older) events; ``None`` when there are none.
    next_page: str | None

    def __iter__(self) -> Iterator[AuditEvent]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)


def _tokens(milli: int) -> int | float:
    return milli // 1000 if milli % 1000 == 0 else milli / 1000


def _utilization(capacity: int | float, available: int | float) -> float:
    return (capacity - available) / capacity * 100 if capacity > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class EntityCapacity:
    """One entity's capacity and what it has available now, in tokens (the library's fields)."""

    entity_id: str
    capacity: int | float
    available: int | float
    utilization_pct: float


@dataclasses.dataclass(frozen=True)
class ResourceCapacity:
    """One limit's capacity and availability summed over a resource's entities, in tokens."""

    resource: str
    limit_name: str
    total_capacity: int | float
    total_available: int | float
    utilization_pct: float
    entities: list[EntityCapacity]

    @classmethod
    def _from_pb(
        cls, resource: str, limit_name: str, r: pb.ResourceCapacityResponse
    ) -> ResourceCapacity:
        entities = [
            EntityCapacity(
                entity_id=e.entity_id,
                capacity=_tokens(e.capacity_milli),
                available=_tokens(e.available_milli),
                utilization_pct=_utilization(e.capacity_milli, e.available_milli),
            )
            for e in r.entities
        ]
        return cls(
            resource=resource,
            limit_name=limit_name,
            total_capacity=_tokens(r.total_capacity_milli),
            total_available=_tokens(r.total_available_milli),
            utilization_pct=_utilization(r.total_capacity_milli, r.total_available_milli),
            entities=entities,
        )


@dataclasses.dataclass(frozen=True)
class BucketOperationResult:
    """What ``reset_bucket`` or ``top_up`` did (the library's fields, and ``replayed``)."""

    entity_id: str
    resource: str
    #: Bucket items written: 0 when there was nothing to change (no bucket yet, already full).
    shards: int
    #: Tokens each named limit (a reset without names: each limit) gained.
    amounts: Mapping[str, int | float]
    #: The idempotency key was used before: nothing was done now, this is the first answer.
    replayed: bool = False

    @classmethod
    def _from_pb(
        cls, entity_id: str, resource: str, r: pb.BucketResponse
    ) -> BucketOperationResult:
        def tokens(milli: int) -> int | float:
            return milli // 1000 if milli % 1000 == 0 else milli / 1000

        return cls(
            entity_id=entity_id,
            resource=resource,
            shards=r.written,
            amounts={name: tokens(milli) for name, milli in sorted(r.gained_milli.items())},
            replayed=r.replayed,
        )


@dataclasses.dataclass(frozen=True)
class UsageSnapshot:
    """Consumption of one resource in one hour or day, after adjustments and rollbacks; also
    readable with the library's names (``window_start``, ``window_end``, ``window_type``,
    ``counters``)."""

    resource: str
    period: str
    start_ms: int
    consumed_milli: Mapping[str, int]
    entity_id: str = ""

    @property
    def consumed(self) -> dict[str, float]:
        """Consumption per limit in tokens."""
        return {name: milli / 1000 for name, milli in self.consumed_milli.items()}

    @property
    def counters(self) -> dict[str, int]:
        """The library's name: consumption per limit in whole tokens (rounded down)."""
        return {name: milli // 1000 for name, milli in self.consumed_milli.items()}

    @property
    def window_type(self) -> str:
        """The library's name: ``"hourly"`` or ``"daily"``."""
        return {"hour": "hourly", "day": "daily"}.get(self.period, self.period)

    @property
    def window_start(self) -> str:
        """The library's name: the window's start, ``2026-12-04T10:00:00Z``."""
        return _iso_seconds(self.start_ms)

    @property
    def window_end(self) -> str:
        """The library's name: the window's last second, ``2026-12-04T10:59:59Z``."""
        length = 86_400_000 if self.period == "day" else 3_600_000
        return _iso_seconds(self.start_ms + length - 1000)

    @classmethod
    def _from_pb(cls, snapshot: pb.UsageSnapshot) -> UsageSnapshot:
        return cls(
            resource=snapshot.resource,
            period=snapshot.period,
            start_ms=snapshot.start_ms,
            consumed_milli=dict(snapshot.consumed_milli),
            entity_id=snapshot.entity_id,
        )


def _iso_seconds(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class UsageSummary:
    """What ``get_usage_summary`` adds up, as the library's: the snapshots counted, the total and
    the average per snapshot of each limit (whole tokens), the first and last window start."""

    snapshot_count: int
    total: dict[str, int]
    average: dict[str, float]
    min_window_start: str | None
    max_window_start: str | None

    @classmethod
    def _of(cls, snapshots: Sequence[UsageSnapshot]) -> UsageSummary:
        total: dict[str, int] = {}
        counts: dict[str, int] = {}
        for snapshot in snapshots:
            for name, value in snapshot.counters.items():
                total[name] = total.get(name, 0) + value
                counts[name] = counts.get(name, 0) + 1
        starts = [s.window_start for s in snapshots]
        return cls(
            snapshot_count=len(snapshots),
            total=total,
            average={name: value / counts[name] for name, value in total.items()},
            min_window_start=min(starts) if starts else None,
            max_window_start=max(starts) if starts else None,
        )


def amounts(field: str, values: Mapping[str, int], *, allow_negative: bool) -> dict[str, int]:
    """Checks amounts by limit name before they are sent (the daemon checks the rest)."""
    if not isinstance(values, Mapping):
        raise ValidationError(
            f"{field}: must be a mapping of limit name to tokens, got {values!r}",
            field=field,
        )
    low = _I64_MIN if allow_negative else 0
    checked = {}
    for name, value in values.items():
        if type(name) is str and type(value) is int and low <= value <= _I64_MAX:
            checked[name] = value
            continue
        if not isinstance(name, str):
            raise ValidationError(f"{field}: limit names are strings, got {name!r}", field=field)
        checked[name] = _whole(f"{field}[{name}]", value, low=low, high=_I64_MAX)
    return checked


def limits_to_pb(limits: Sequence[Limit] | None) -> list[pb.Limit]:
    if limits is None:
        return []
    out = []
    for i, limit in enumerate(limits):
        if not isinstance(limit, Limit):
            raise ValidationError(f"limits[{i}]: expected a Limit, got {limit!r}", field="limits")
        out.append(limit._to_pb())
    return out


def message(cls: Any, **fields: Any) -> Any:
    """A request message; a value of the wrong type is a ValidationError naming the field."""
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:
        field = next(
            (name for name, value in fields.items() if not _fits(cls, name, value)),
            None,
        )
        raise _validation_kind(field)(f"{field or cls.__name__}: {err}", field=field) from None


def _fits(cls: Any, name: str, value: Any) -> bool:
    try:
        cls(**{name: value})
        return True
    except (TypeError, ValueError):
        return False


_serialized: dict[tuple[Any, str, tuple[Limit, ...]], tuple[bytes, dict[str, Limit]]] = {}


def serialized_limits(
    cls: Any, field: str, limits: Sequence[Limit] | None
) -> tuple[bytes, dict[str, Limit]]:
    """``limits`` as the serialized ``field`` of message ``cls`` (protobuf messages concatenate, so
    this part is appended to the rest of the request), and the limits by name. Cached: a service
    uses a few sets of limits again and again."""
    if not limits:
        return b"", {}
    key = (cls, field, tuple(limits)) if all(isinstance(x, Limit) for x in limits) else None
    cached = _serialized.get(key) if key is not None else None
    if cached is not None:
        return cached
    part = message(cls, **{field: limits_to_pb(limits)}).SerializeToString()
    result = (part, {limit.name: limit for limit in limits})
    if key is not None and len(_serialized) < 1024:
        _serialized[key] = result
    return result
