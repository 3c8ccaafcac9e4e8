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
//! Pure: times are milliseconds since the Unix epoch, given as arguments. What is computed is
//! kept: the parsed calendars by pattern and zone (a limit given with each call names its
//! calendar each time), and per calendar the last span of instants whose next edge is known (every
//! bucket on that calendar asks about an instant in the current period).

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex};

use chrono::{DateTime, Duration, TimeZone};
use chrono_tz::Tz;
use croner::Cron;
use dashmap::DashMap;

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

/// What a calendar last computed: every instant in `from..edge` has `edge` as its next edge.
#[derive(Debug, Clone, Copy)]
struct Span {
    from: i64,
    edge: i64,
}

type Memo = Option<Span>;

/// The calendars parsed so far, by pattern and zone (cleared when it reaches [`MAX_KNOWN`]).
static KNOWN: LazyLock<DashMap<(String, String), Calendar>> = LazyLock::new(DashMap::new);
const MAX_KNOWN: usize = 1_024;

/// A cron pattern in a time zone.
#[derive(Clone)]
pub struct Calendar {
    cron: Arc<Cron>,
    pattern: Arc<str>,
    tz: Tz,
    /// Its text in a stored limit set (see [`Calendar::stored`]).
    stored: Arc<str>,
    memo: Arc<Mutex<Memo>>,
}

impl Calendar {
    /// # Errors
    /// [`CalendarError`] for a pattern that is not five cron fields (or an alias such as
    /// `@monthly`), a zone not in the database, or a pattern that never starts matching.
    pub fn new(pattern: &str, tz: &str) -> Result<Self, CalendarError> {
        let pattern = pattern.split_whitespace().collect::<Vec<_>>().join(" ");
        // A limit given with each call parses its calendar each time: the parsed ones are kept
        // (and with them what each has computed).
        let key = (pattern, tz.to_owned());
        if let Some(calendar) = KNOWN.get(&key) {
            return Ok(calendar.clone());
        }
        let calendar = Self::parse(&key.0, tz)?;
        if KNOWN.len() >= MAX_KNOWN {
            KNOWN.clear();
        }
        KNOWN.insert(key, calendar.clone());
        Ok(calendar)
    }

    fn parse(pattern: &str, tz: &str) -> Result<Self, CalendarError> {
        let bad = |why: &str| CalendarError::Cron(pattern.to_owned(), why.to_owned());
        if pattern.len() > MAX_TEXT {
            return Err(bad("is too long"));
        }
        let fields = pattern.split(' ').count();
        if !(pattern.starts_with('@') && fields == 1) && fields != 5 {
            return Err(bad(
                "expected five fields: minute hour day-of-month month day-of-week",
            ));
        }
        let cron = Cron::from_str(pattern).map_err(|e| bad(&e.to_string()))?;
        if tz.len() > MAX_TEXT {
            return Err(CalendarError::Zone(tz.chars().take(MAX_TEXT).collect()));
        }
        let zone: Tz = tz.parse().map_err(|_| CalendarError::Zone(tz.to_owned()))?;
        let calendar = Self {
            cron: Arc::new(cron),
            pattern: pattern.into(),
            stored: format!("{}@{}", escape(pattern), escape(zone.name())).into(),
            tz: zone,
            memo: Arc::default(),
        };
        // Checked from a fixed instant (2000-01-01), so that accepting a pattern is pure too.
        if calendar.compute(946_684_800_000).is_none() {
            return Err(CalendarError::NoEdge(pattern.to_owned()));
        }
        Ok(calendar)
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    pub fn tz(&self) -> &str {
        self.tz.name()
    }

    /// `PATTERN@ZONE` with no ' ', ',', ':' or '%' of their own (written `%20`, `%2C`, `%3A`,
    /// `%25`): its form inside a stored limit set. [`Calendar::from_stored`] reads it back.
    pub fn stored(&self) -> &str {
        &self.stored
    }

    /// # Errors
    /// As [`Calendar::new`], and [`CalendarError::Cron`] for text with no zone.
    pub fn from_stored(text: &str) -> Result<Self, CalendarError> {
        let (pattern, tz) = text
            .rsplit_once('@')
            .ok_or_else(|| CalendarError::Cron(text.to_owned(), "has no @ZONE".to_owned()))?;
        Self::new(&unescape(pattern), &unescape(tz))
    }

    /// The first edge strictly after `after_ms`, if there is one within [`HORIZON_MS`].
    pub fn next_edge(&self, after_ms: i64) -> Option<i64> {
        let memo = self.memo.lock().map(|m| *m).unwrap_or(None);
        if let Some(Span { from, edge }) = memo
            && (from..edge).contains(&after_ms)
        {
            return Some(edge);
        }
        let edge = self.compute(after_ms);
        if let (Some(edge), Ok(mut m)) = (edge, self.memo.lock()) {
            // Every instant from `after_ms` up to the edge has this same next edge.
            let from = match *m {
                Some(s) if s.edge == edge => s.from.min(after_ms),
                _ => after_ms,
            };
            *m = Some(Span { from, edge });
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

/// `%`, `,`, `:` and ' ' as `%25`, `%2C`, `%3A`, `%20`.
pub(super) fn escape(text: &str) -> String {
    text.replace('%', "%25")
        .replace(',', "%2C")
        .replace(':', "%3A")
        .replace(' ', "%20")
}

pub(super) fn unescape(text: &str) -> String {
    text.replace("%20", " ")
        .replace("%3A", ":")
        .replace("%2C", ",")
        .replace("%25", "%")
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
