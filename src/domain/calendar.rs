//! Calendars of quota periods: a five-field cron pattern read in an IANA time zone, and the
//! instants it **starts matching** (its edges), where a calendar quota's balance goes back to its
//! amount.
//!
//! The pattern is evaluated by `croner` (Vixie-cron semantics, daylight saving time handled: a
//! fixed time that falls in a spring-forward gap fires just after it, one in a fall-back overlap
//! fires once) against the `chrono-tz` copy of the IANA database. An edge is a matching minute
//! whose previous minute does not match, so `0 0 1 * *` has one edge a month, and so does
//! `* * 1 * *` (the first minute of the 1st). A pattern that never starts matching within
//! [`HORIZON_MS`] of any instant (`* * * * *` always matches) is refused.
//!
//! Pure: times are milliseconds since the Unix epoch, given as arguments. The last edge computed
//! is kept (one per calendar and its clones), since a bucket asks the same question until its
//! refill time moves.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, TimeZone};
use chrono_tz::Tz;
use croner::Cron;

/// How far ahead an edge is looked for: a little over ten years (every practical quota period,
/// and 29 February, has one within it).
pub const HORIZON_MS: i64 = 10 * 366 * 24 * 3_600 * 1_000;
/// The most consecutive matching minutes walked to find where a run of matches ends (a pattern
/// like `* * 1 * *` matches for a whole day): 62 days.
const MAX_RUN_MINUTES: u32 = 62 * 24 * 60;
/// The longest pattern or zone name taken.
const MAX_TEXT: usize = 128;

/// Why a calendar was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    #[error("cron {0:?}: {1}")]
    Cron(String, String),
    #[error("time zone {0:?} is not in the IANA time zone database (e.g. UTC, Europe/Berlin)")]
    Zone(String),
    #[error("cron {0:?} never starts matching (it matches all the time, or never)")]
    NoEdge(String),
}

/// The last question a calendar was asked and its answer: (after, first edge after it).
type Memo = Option<(i64, Option<i64>)>;

/// A cron pattern in a time zone.
#[derive(Clone)]
pub struct Calendar {
    cron: Arc<Cron>,
    pattern: Arc<str>,
    tz: Tz,
    memo: Arc<Mutex<Memo>>,
}

impl Calendar {
    /// # Errors
    /// [`CalendarError`] for a pattern that is not five cron fields (or an alias such as
    /// `@monthly`), a zone not in the database, or a pattern that never starts matching.
    pub fn new(pattern: &str, tz: &str) -> Result<Self, CalendarError> {
        let pattern = pattern.split_whitespace().collect::<Vec<_>>().join(" ");
        let bad = |why: &str| CalendarError::Cron(pattern.clone(), why.to_owned());
        if pattern.len() > MAX_TEXT {
            return Err(bad("is too long"));
        }
        let fields = pattern.split(' ').count();
        if !(pattern.starts_with('@') && fields == 1) && fields != 5 {
            return Err(bad(
                "expected five fields: minute hour day-of-month month day-of-week",
            ));
        }
        let cron = Cron::from_str(&pattern).map_err(|e| bad(&e.to_string()))?;
        if tz.len() > MAX_TEXT {
            return Err(CalendarError::Zone(tz.chars().take(MAX_TEXT).collect()));
        }
        let zone: Tz = tz.parse().map_err(|_| CalendarError::Zone(tz.to_owned()))?;
        let calendar = Self {
            cron: Arc::new(cron),
            pattern: pattern.clone().into(),
            tz: zone,
            memo: Arc::default(),
        };
        // Checked from a fixed instant (2000-01-01), so that accepting a pattern is pure too.
        if calendar.compute(946_684_800_000).is_none() {
            return Err(CalendarError::NoEdge(pattern));
        }
        Ok(calendar)
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    pub fn tz(&self) -> &str {
        self.tz.name()
    }

    /// The first edge strictly after `after_ms`, if there is one within [`HORIZON_MS`].
    pub fn next_edge(&self, after_ms: i64) -> Option<i64> {
        let memo = self.memo.lock().map(|m| *m).unwrap_or(None);
        if let Some((after, edge)) = memo
            && after == after_ms
        {
            return edge;
        }
        let edge = self.compute(after_ms);
        if let Ok(mut m) = self.memo.lock() {
            *m = Some((after_ms, edge));
        }
        edge
    }

    /// Whether an edge lies in `(from_ms, to_ms]`.
    pub fn edge_between(&self, from_ms: i64, to_ms: i64) -> bool {
        to_ms > from_ms && self.next_edge(from_ms).is_some_and(|e| e <= to_ms)
    }

    fn compute(&self, after_ms: i64) -> Option<i64> {
        let limit = after_ms.checked_add(HORIZON_MS)?;
        let mut from = self.tz.timestamp_millis_opt(after_ms).single()?;
        loop {
            let next = self.cron.find_next_occurrence(&from, false).ok()?;
            let at = next.timestamp_millis();
            if at > limit {
                return None;
            }
            if !self.matches(&(next - Duration::minutes(1))) {
                return Some(at);
            }
            // Inside a run of matching minutes: find its end, then the next match after it.
            let mut end = next;
            let mut walked = 0;
            while self.matches(&end) {
                walked += 1;
                if walked > MAX_RUN_MINUTES {
                    return None;
                }
                end += Duration::minutes(1);
            }
            from = end;
        }
    }

    fn matches(&self, at: &DateTime<Tz>) -> bool {
        self.cron.is_time_matching(at).unwrap_or(false)
    }
}

impl PartialEq for Calendar {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern && self.tz == other.tz
    }
}

impl Eq for Calendar {}

impl std::hash::Hash for Calendar {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.pattern.hash(state);
        self.tz.name().hash(state);
    }
}

impl fmt::Debug for Calendar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Calendar({:?} in {})", self.pattern, self.tz.name())
    }
}

#[cfg(test)]
mod tests;
