use proptest::prelude::*;

use super::*;

/// Milliseconds since the epoch of an RFC 3339 time.
fn at(rfc3339: &str) -> i64 {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

fn cal(pattern: &str, tz: &str) -> Calendar {
    Calendar::new(pattern, tz).unwrap()
}

#[test]
fn a_monthly_calendar_starts_each_month_once_in_its_zone() {
    let utc = cal("0 0 1 * *", "UTC");
    assert_eq!(
        utc.next_edge(at("2026-01-15T10:00:00Z")),
        Some(at("2026-02-01T00:00:00Z"))
    );
    assert_eq!(
        utc.next_edge(at("2026-02-01T00:00:00Z")),
        Some(at("2026-03-01T00:00:00Z")),
        "strictly after"
    );
    assert_eq!(
        utc.next_edge(at("2026-01-31T23:59:59.999Z")),
        Some(at("2026-02-01T00:00:00Z"))
    );
    // Midnight in Berlin is 23:00 UTC in winter, 22:00 in summer.
    let berlin = cal("0 0 * * *", "Europe/Berlin");
    assert_eq!(
        berlin.next_edge(at("2026-01-10T12:00:00Z")),
        Some(at("2026-01-10T23:00:00Z"))
    );
    assert_eq!(
        berlin.next_edge(at("2026-07-10T12:00:00Z")),
        Some(at("2026-07-10T22:00:00Z"))
    );
    // The last day of the month, whatever its length.
    let last = cal("0 0 L * *", "UTC");
    assert_eq!(
        last.next_edge(at("2028-02-01T00:00:00Z")),
        Some(at("2028-02-29T00:00:00Z"))
    );
    assert_eq!(
        last.next_edge(at("2026-04-01T00:00:00Z")),
        Some(at("2026-04-30T00:00:00Z"))
    );
}

#[test]
fn a_run_of_matching_minutes_has_one_edge_at_its_start() {
    let first = cal("* * 1 * *", "UTC");
    assert_eq!(
        first.next_edge(at("2026-01-01T05:00:00Z")),
        Some(at("2026-02-01T00:00:00Z"))
    );
    let office = cal("* 9-17 * * 1-5", "UTC");
    // Friday 2026-01-09 10:00: in the run; the next start is Monday 09:00.
    assert_eq!(
        office.next_edge(at("2026-01-09T10:00:00Z")),
        Some(at("2026-01-12T09:00:00Z"))
    );
}

#[test]
fn missed_edges_are_seen_as_one_and_the_window_is_half_open() {
    let daily = cal("0 0 * * *", "UTC");
    let from = at("2026-01-01T12:00:00Z");
    assert!(
        daily.edge_between(from, at("2026-03-01T00:00:00Z")),
        "sixty edges missed"
    );
    assert!(
        daily.edge_between(from, at("2026-01-02T00:00:00Z")),
        "up to and with the edge"
    );
    assert!(!daily.edge_between(from, at("2026-01-01T23:59:59.999Z")));
    assert!(!daily.edge_between(at("2026-01-02T00:00:00Z"), at("2026-01-02T00:00:00Z")));
}

#[test]
fn daylight_saving_changes_keep_one_edge_a_day() {
    // New York springs forward at 02:00 on 2026-03-08 and falls back at 02:00 on 2026-11-01.
    for (pattern, day) in [
        ("30 2 * * *", "2026-03-08"),
        ("30 1 * * *", "2026-11-01"),
        ("0 0 * * *", "2026-03-08"),
    ] {
        let ny = cal(pattern, "America/New_York");
        let start = at(&format!("{day}T04:00:00Z")); // local midnight or 23:00 the day before
        let mut edges = Vec::new();
        let mut from = start;
        while let Some(e) = ny.next_edge(from) {
            if e >= start + 86_400_000 {
                break;
            }
            edges.push(e);
            from = e;
        }
        assert_eq!(edges.len(), 1, "{pattern} on {day}: {edges:?}");
    }
}

#[test]
fn patterns_and_zones_that_cannot_be_used_are_refused_with_the_reason() {
    for (pattern, tz) in [
        ("* * * * *", "UTC"),
        ("0 0 1 * * *", "UTC"),
        ("0 0 1 *", "UTC"),
        ("61 0 * * *", "UTC"),
        ("", "UTC"),
        ("0 0 1 * *", "Mars/Olympus"),
        ("0 0 1 * *", ""),
    ] {
        assert!(Calendar::new(pattern, tz).is_err(), "{pattern:?} in {tz:?}");
    }
    let err = Calendar::new("* * * * *", "UTC").unwrap_err().to_string();
    assert!(err.contains("never starts matching"), "{err}");
    assert_eq!(cal("@monthly", "UTC").pattern(), "@monthly");
    assert_eq!(
        cal(" 0  0 1 * * ", "UTC"),
        cal("0 0 1 * *", "UTC"),
        "spacing is not meaning"
    );
}

const PATTERNS: &[&str] = &[
    "0 * * * *",
    "*/15 * * * *",
    "0 0 * * *",
    "30 2 * * *",
    "0 9-17 * * 1-5",
    "* 9 * * *",
    "0 0 1 * *",
    "0 0 L * *",
    "0 0 29 2 *",
];
const ZONES: &[&str] = &[
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Pacific/Chatham",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// The next edge is after the instant, matches, follows a minute that does not, and no
    /// other edge lies between (checked minute by minute when it is within three days); the
    /// edge after an edge is later still.
    #[test]
    fn an_edge_is_the_first_start_of_a_match_after_the_instant(
        p in 0..PATTERNS.len(),
        z in 0..ZONES.len(),
        after in 1_700_000_000_000i64..2_100_000_000_000,
    ) {
        let c = cal(PATTERNS[p], ZONES[z]);
        let edge = c.next_edge(after).expect("every pattern here has edges");
        prop_assert!(edge > after);
        let local = |ms: i64| c.tz.timestamp_millis_opt(ms).single().unwrap();
        prop_assert!(c.matches(&local(edge)));
        prop_assert!(!c.matches(&local(edge - 60_000)));
        prop_assert_eq!(edge % 60_000, 0, "at a minute's start");
        if edge - after <= 3 * 86_400_000 {
            let mut minute = after - after.rem_euclid(60_000) + 60_000;
            while minute < edge {
                prop_assert!(
                    !c.matches(&local(minute)) || c.matches(&local(minute - 60_000)),
                    "an earlier edge at {}", minute
                );
                minute += 60_000;
            }
        }
        let then = c.next_edge(edge).unwrap();
        prop_assert!(then > edge);
        prop_assert_eq!(c.next_edge(edge - 1), Some(edge));
    }
}
