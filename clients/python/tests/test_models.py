"""Values built without a daemon: limits as the Python zae-limiter spells them."""

from __future__ import annotations

import pytest

from zae_limiter_client import Limit, ScheduleEntry, ValidationError


def test_the_fourth_field_of_a_limit_is_seconds_as_in_the_library():
    # The library's direct constructor: 100 per 60 seconds.
    limit = Limit("rpm", 100, 100, 60)
    assert limit == Limit.per_minute("rpm", 100)
    assert limit.refill_period_ms == 60_000
    assert limit.refill_period_seconds == 60
    assert Limit("rpm", 100, 100, refill_period_seconds=60) == limit
    assert Limit("rps", 10, 10, 0.25).refill_period_ms == 250
    assert Limit.custom("rpm", 100, 100, 60) == limit


def test_milliseconds_only_behind_their_keyword():
    assert Limit("fast", 5, 5, refill_period_ms=60).refill_period_seconds == 0.06
    with pytest.raises(ValidationError, match="once"):
        Limit("both", 5, 5, 60, refill_period_ms=60_000)
    with pytest.raises(ValidationError, match="once"):
        Limit("neither", 5, 5)
    with pytest.raises(ValidationError, match="number"):
        Limit("text", 5, 5, "60")
    with pytest.raises(ValidationError, match="finite"):
        Limit("inf", 5, 5, float("inf"))


def test_schedule_entries_as_the_library_spells_them():
    peak = ScheduleEntry("* 9-17 * * MON-FRI", tz="America/New_York", scale=0.5)
    night = ScheduleEntry("* 0-6 * * *", tz="America/New_York", capacity=50, refill_amount=25)
    limit = Limit.per_minute("tpm", 10_000).with_schedule((peak, night))
    assert limit.schedule == (peak, night)
    assert limit.with_schedule(()) == Limit.per_minute("tpm", 10_000)
    wire = limit._to_pb()
    assert wire.schedule_tz == "America/New_York"
    assert [e.scale_permille for e in wire.schedule] == [500, 0]
    assert (wire.schedule[1].capacity, wire.schedule[1].refill_amount) == (50, 25)
    assert Limit._from_pb(wire) == limit
    # A scale to a thousandth, at least one.
    assert ScheduleEntry("* * * * *", scale=0.0001).scale_permille == 1
    assert ScheduleEntry("* * * * *", scale=2.3).scale_permille == 2_300


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "scale"),
        ({"scale": 2.0, "capacity": 5}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": 0}, "scale"),
        ({"scale": 10**7}, "scale"),
        ({"scale": True}, "scale"),
        ({"capacity": 0}, "capacity"),
        ({"capacity": 1.5}, "capacity"),
        ({"refill_period_seconds": -1}, "refill_period_seconds"),
    ],
)
def test_bad_schedule_entries_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValidationError) as refused:
        ScheduleEntry("* * * * *", **kwargs)
    assert field in str(refused.value)


def test_a_schedule_has_one_time_zone():
    with pytest.raises(ValidationError, match="same tz"):
        Limit.per_minute("r", 1).with_schedule(
            (ScheduleEntry("* 1 * * *", scale=2.0), ScheduleEntry("* 2 * * *", "Europe/Berlin", scale=2.0))
        )
