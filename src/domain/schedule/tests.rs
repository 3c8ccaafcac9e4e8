use proptest::prelude::*;

use super::*;

/// Milliseconds since the epoch of an RFC 3339 time.
fn at(rfc3339: &str) -> i64 {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

fn sched(entries: &[(&str, Change)], tz: &str) -> Schedule {
    let entries: Vec<_> = entries.iter().map(|(p, c)| (p.to_string(), *c)).collect();
    Schedule::new(&entries, tz).unwrap()
}

const HALF: Change = Change::Scale(500);
const DOUBLE: Change = Change::Scale(2_000);

#[test]
fn business_hours_are_in_force_while_they_match_and_end_at_the_first_minute_after() {
    let s = sched(&[("* 9-17 * * 1-5", DOUBLE)], "UTC");
    // 2026-03-02 is a Monday.
    let span = s.span(at("2026-03-02T08:30:00Z"));
    assert_eq!((span.active, span.to), (None, at("2026-03-02T09:00:00Z")));
    let span = s.span(at("2026-03-02T09:00:00Z"));
    assert_eq!(
        (span.active, span.to),
        (Some(0), at("2026-03-02T18:00:00Z"))
    );
    let span = s.span(at("2026-03-02T17:59:59.999Z"));
    assert_eq!(
        (span.active, span.to),
        (Some(0), at("2026-03-02T18:00:00Z"))
    );
    // Friday evening to Monday morning.
    let span = s.span(at("2026-03-06T18:00:00Z"));
    assert_eq!((span.active, span.to), (None, at("2026-03-09T09:00:00Z")));
    assert!(s.boundary_between(at("2026-03-02T08:59:00Z"), at("2026-03-02T09:00:00Z")));
    assert!(!s.boundary_between(at("2026-03-02T09:00:00Z"), at("2026-03-02T17:59:00Z")));
}

#[test]
fn the_first_matching_entry_wins() {
    let s = sched(&[("* 12 * * *", HALF), ("* 9-17 * * *", DOUBLE)], "UTC");
    let spans: Vec<_> = [
        "2026-03-02T11:00:00Z",
        "2026-03-02T12:00:00Z",
        "2026-03-02T13:00:00Z",
    ]
    .iter()
    .map(|t| {
        let s = s.span(at(t));
        (s.active, s.to)
    })
    .collect();
    assert_eq!(
        spans,
        vec![
            (Some(1), at("2026-03-02T12:00:00Z")),
            (Some(0), at("2026-03-02T13:00:00Z")),
            (Some(1), at("2026-03-02T18:00:00Z")),
        ]
    );
    // An entry shadowed all the time is never a boundary: the always-matching first one wins.
    let s = sched(&[("* * * * *", HALF), ("* 9-17 * * *", DOUBLE)], "UTC");
    let span = s.span(at("2026-03-02T11:00:00Z"));
    assert_eq!(span.active, Some(0));
    assert!(span.to - at("2026-03-02T11:00:00Z") >= 30 * 24 * 3_600_000);
}

#[test]
fn patterns_are_read_in_their_zone_across_daylight_saving_time() {
    // New York, 2026-03-08: 02:00 local does not exist (clocks go from 01:59 to 03:00).
    let s = sched(&[("* 1 * * *", HALF)], "America/New_York");
    let span = s.span(at("2026-03-08T06:00:00Z")); // 01:00 EST
    assert_eq!(
        (span.active, span.to),
        (Some(0), at("2026-03-08T07:00:00Z"))
    ); // 03:00 EDT
    // 2026-11-01: 01:00-01:59 happens twice, so the hour matches for two hours.
    let span = s.span(at("2026-11-01T05:00:00Z")); // 01:00 EDT
    assert_eq!(
        (span.active, span.to),
        (Some(0), at("2026-11-01T07:00:00Z"))
    ); // 02:00 EST
    // Berlin's nights are an hour earlier in UTC in summer.
    let s = sched(&[("* 0-5 * * *", HALF)], "Europe/Berlin");
    assert_eq!(
        s.span(at("2026-07-10T12:00:00Z")).to,
        at("2026-07-10T22:00:00Z")
    );
    assert_eq!(
        s.span(at("2026-01-10T12:00:00Z")).to,
        at("2026-01-10T23:00:00Z")
    );
}

#[test]
fn changes_scale_or_set_the_limit_s_values() {
    let base = Params {
        capacity: 100_000,
        refill_amount: 50_000,
        refill_period_ms: 60_000,
    };
    assert_eq!(
        HALF.apply(base),
        Params {
            capacity: 50_000,
            refill_amount: 25_000,
            refill_period_ms: 60_000
        }
    );
    // A scale rounds down to at least one milli-token.
    let tiny = Change::Scale(1).apply(Params {
        capacity: 999,
        refill_amount: 1,
        refill_period_ms: 1,
    });
    assert_eq!((tiny.capacity, tiny.refill_amount), (1, 1));
    let set = Change::Set {
        capacity: Some(7_000),
        refill_amount: None,
        refill_period_ms: Some(1_000),
    };
    assert_eq!(
        set.apply(base),
        Params {
            capacity: 7_000,
            refill_amount: 50_000,
            refill_period_ms: 1_000
        }
    );
}

#[test]
fn bad_schedules_are_refused_with_the_entry_named() {
    let err = |entries: &[(&str, Change)], tz: &str| {
        let entries: Vec<_> = entries.iter().map(|(p, c)| (p.to_string(), *c)).collect();
        Schedule::new(&entries, tz).unwrap_err().to_string()
    };
    assert!(err(&[], "UTC").contains("at least one"));
    assert!(err(&[("* * * *", HALF)], "UTC").contains("entry 0"));
    assert!(err(&[("* * * * *", HALF), ("61 * * * *", HALF)], "UTC").contains("entry 1"));
    assert!(err(&[("* * 30 2 *", HALF)], "UTC").contains("entry 0"));
    assert!(err(&[("* * * * *", HALF)], "Mars/Olympus").contains("Mars/Olympus"));
    assert!(err(&[("* * * * *", Change::Scale(0))], "UTC").contains("scale"));
    assert!(err(&[("* * * * *", Change::NONE)], "UTC").contains("entry 0"));
    let many: Vec<_> = (0..17).map(|_| ("* * * * *", HALF)).collect();
    assert!(err(&many, "UTC").contains("at most 16"));
}

#[test]
fn schedules_round_trip_through_their_stored_form() {
    let s = sched(
        &[
            ("* 9-17 * * MON-FRI", DOUBLE),
            (
                "*/5 0-6 1,15 * *",
                Change::Set {
                    capacity: Some(3_000),
                    refill_amount: None,
                    refill_period_ms: Some(90_000),
                },
            ),
        ],
        "Europe/Berlin",
    );
    let text = s.stored();
    assert!(!text.contains([' ', ',', ':']), "{text}");
    let back = Schedule::from_stored(text).unwrap();
    assert_eq!(back, s);
    assert_eq!(
        back.entries().collect::<Vec<_>>(),
        s.entries().collect::<Vec<_>>()
    );
    for bad in [
        "",
        "@UTC",
        "*%20*%20*%20*%20*~q5@UTC",
        "*%20*%20*%20*%20*~x5~c1@UTC",
        "x",
    ] {
        assert!(Schedule::from_stored(bad).is_err(), "{bad}");
    }
}

/// The entry in force at the minute of `t`, matched entry by entry (the oracle).
fn active_by_minute(entries: &[(&str, Change)], tz: Tz, t: i64) -> Option<usize> {
    let minute = tz.timestamp_millis_opt(t - t.rem_euclid(60_000)).unwrap();
    entries.iter().position(|(p, _)| {
        Cron::from_str(p)
            .unwrap()
            .is_time_matching(&minute)
            .unwrap()
    })
}

const PATTERNS: &[&str] = &[
    "* 9-17 * * 1-5",
    "*/20 * * * *",
    "0-29 */3 * * *",
    "* 0-6 * * *",
    "* * * * 6,0",
    "* 12 * * *",
    "15 10 * * *",
    "* 1-2 * * *",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Walking minute by minute agrees with the span found: the same entry is in force at every
    /// minute up to its end, and another one at its end.
    #[test]
    fn a_span_is_what_matching_every_minute_finds(
        picks in prop::collection::vec(0usize..PATTERNS.len(), 1..4),
        offsets in prop::collection::vec((0i64..(14 * 24 * 60), 0i64..60_000), 1..4),
        berlin in any::<bool>(),
    ) {
        let tz_name = if berlin { "Europe/Berlin" } else { "America/New_York" };
        let tz: Tz = tz_name.parse().unwrap();
        let entries: Vec<(&str, Change)> = picks.iter().map(|i| (PATTERNS[*i], HALF)).collect();
        let s = sched(&entries, tz_name);
        // Around the March changes of both zones; later questions may come shortly before
        // earlier ones (a span known is then joined, or not, by checking the gap).
        for (minute, ms) in offsets {
            let t = at("2026-03-01T00:00:00Z") + minute * 60_000 + ms;
            for t in [t, t - 90_000, t - 3_000] {
                let span = s.span(t);
                let active = active_by_minute(&entries, tz, t);
                prop_assert_eq!(span.active, active);
                prop_assert!(span.from <= t && t < span.to);
                let mut m = t - t.rem_euclid(60_000) + 60_000;
                let end = span.to.min(t + 3 * 24 * 3_600_000);
                while m < end {
                    prop_assert_eq!(active_by_minute(&entries, tz, m), active, "at {}", m);
                    m += 60_000;
                }
                if span.to <= t + 3 * 24 * 3_600_000 {
                    prop_assert_ne!(active_by_minute(&entries, tz, span.to), active, "at the end {}", span.to);
                }
            }
        }
    }
}
