"""Values built without a daemon: limits as the Python zae-limiter spells them."""

from __future__ import annotations

import pytest

from zae_limiter_client import Limit, ValidationError


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
