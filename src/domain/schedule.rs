//! Schedules of a dripping limit: while one of its cron patterns matches (read in one IANA time
//! zone), the first matching entry changes the limit (scales its capacity and refill, or sets
//! them); while none does, the limit's own values apply.
//!
//! A pattern is a *match* pattern, as in the Python zae-limiter: `* 9-17 * * 1-5` is in force
//! for every minute of business hours. Matching is `croner`'s (Vixie-cron semantics, daylight
//! saving time handled) against the `chrono-tz` copy of the IANA database, minute by minute.
//! The instants where the entry in force changes are the schedule's **boundaries**; the bucket
//! math refills piecewise across them (see [`super::bucket`]).
//!
//! Pure: times are milliseconds since the Unix epoch, given as arguments. What is computed is
//! kept: parsed schedules by their text, and per schedule the last few spans of instants with
//! the same entry in force (every bucket on that schedule asks about an instant in the current
//! one, or the one before).

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex};

use chrono::{DateTime, Duration, TimeZone};
use chrono_tz::Tz;
use croner::Cron;
use dashmap::DashMap;

/// The most entries a schedule may have.
pub const MAX_ENTRIES: usize = 16;
/// The largest scale, in per-mille (a millionfold).
pub const MAX_SCALE_PERMILLE: u64 = 1_000_000_000;
/// How far ahead a boundary is looked for; past it the entry in force is taken to stay (a
/// later question finds the next one).
const HORIZON_MS: i64 = 31 * 24 * 3_600 * 1_000;
/// The longest gap before a known span that is checked minute by minute to join it (an earlier
/// refill time than any asked about so far, typically seconds before).
const JOIN_MS: i64 = 24 * 3_600 * 1_000;
/// The most instants looked at for one boundary (where an entry before the one in force starts
/// matching, or the one in force may stop).
const MAX_STEPS: usize = 1_024;
/// The most matching minutes walked in one go to find where a run of matches ends (a run that
/// goes on is walked further from there when needed): a week.
const MAX_RUN_MINUTES: u32 = 7 * 24 * 60;
/// The longest pattern or zone name taken.
const MAX_TEXT: usize = 128;
/// Spans kept per schedule.
const SPANS: usize = 8;

/// Why a schedule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("schedule entry {index}: cron {pattern:?}: {why}")]
    Cron {
        index: usize,
        pattern: String,
        why: String,
    },
    #[error("time zone {0:?} is not in the IANA time zone database (e.g. UTC, Europe/Berlin)")]
    Zone(String),
    #[error("a schedule has at most {MAX_ENTRIES} entries, got {0}")]
    TooMany(usize),
    #[error("a schedule has at least one entry")]
    Empty,
    #[error(
        "schedule entry {0}: give either a scale or the values it sets (capacity, refill \
         amount, refill period), not both and not neither"
    )]
    Change(usize),
    #[error("schedule entry {index}: {field} {value} is outside 1..={max}")]
    Range {
        index: usize,
        field: &'static str,
        value: u128,
        max: u128,
    },
    #[error("malformed stored schedule {0:?}")]
    Malformed(String),
}

/// What an entry puts in force while its pattern matches. Amounts are milli-tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// Capacity and refill amount times this many thousandths (the period stays).
    Scale(u64),
    /// The values given replace the limit's own.
    Set {
        capacity: Option<i64>,
        refill_amount: Option<i64>,
        refill_period_ms: Option<i64>,
    },
}

/// A dripping limit's values, milli-tokens and milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub capacity: i64,
    pub refill_amount: i64,
    pub refill_period_ms: i64,
}

/// A bucket's balance and carry as a boundary from `before` to `after` leaves them: clamped to
/// the new capacity, the carry restarted by a new period (or a full balance).
pub fn cross(balance: i64, carry: i64, before: Params, after: Params) -> (i64, i64) {
    let carry = if after.refill_period_ms != before.refill_period_ms || balance >= after.capacity {
        0
    } else {
        carry
    };
    (balance.min(after.capacity), carry)
}

impl Change {
    /// A change that sets nothing (not a valid entry's).
    pub const NONE: Self = Self::Set {
        capacity: None,
        refill_amount: None,
        refill_period_ms: None,
    };

    /// `base` with this change applied. A scale rounds down, to at least one milli-token.
    pub fn apply(&self, base: Params) -> Params {
        match *self {
            Self::Scale(permille) => {
                let scaled = |v: i64| {
                    (i128::from(v) * i128::from(permille) / 1_000).clamp(1, i128::from(i64::MAX))
                        as i64
                };
                Params {
                    capacity: scaled(base.capacity),
                    refill_amount: scaled(base.refill_amount),
                    refill_period_ms: base.refill_period_ms,
                }
            }
            Self::Set {
                capacity,
                refill_amount,
                refill_period_ms,
            } => Params {
                capacity: capacity.unwrap_or(base.capacity),
                refill_amount: refill_amount.unwrap_or(base.refill_amount),
                refill_period_ms: refill_period_ms.unwrap_or(base.refill_period_ms),
            },
        }
    }
}

struct Entry {
    pattern: String,
    cron: Cron,
    change: Change,
}

/// Every instant in `from..to` has entry `active` in force (`None`: the limit's own values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub from: i64,
    pub to: i64,
    pub active: Option<usize>,
}

struct Inner {
    entries: Vec<Entry>,
    tz: Tz,
    stored: String,
    spans: Mutex<Vec<Span>>,
}

/// The schedules parsed so far, by their stored text (cleared when it reaches [`MAX_KNOWN`]).
static KNOWN: LazyLock<DashMap<String, Schedule>> = LazyLock::new(DashMap::new);
const MAX_KNOWN: usize = 1_024;

/// The entries of a schedule, in order (the first matching one is in force), in one time zone.
#[derive(Clone)]
pub struct Schedule(Arc<Inner>);

impl Schedule {
    /// # Errors
    /// [`ScheduleError`] for no entries or more than [`MAX_ENTRIES`], a pattern that is not five
    /// cron fields or that never matches, a zone not in the database, or a change out of range
    /// (checked against the limit by [`super::limit::Limit::with_schedule`]).
    pub fn new(entries: &[(String, Change)], tz: &str) -> Result<Self, ScheduleError> {
        if entries.is_empty() {
            return Err(ScheduleError::Empty);
        }
        if entries.len() > MAX_ENTRIES {
            return Err(ScheduleError::TooMany(entries.len()));
        }
        if tz.len() > MAX_TEXT {
            return Err(ScheduleError::Zone(tz.chars().take(MAX_TEXT).collect()));
        }
        let zone: Tz = tz.parse().map_err(|_| ScheduleError::Zone(tz.to_owned()))?;
        let entries = entries
            .iter()
            .map(|(p, c)| (p.split_whitespace().collect::<Vec<_>>().join(" "), *c))
            .collect::<Vec<_>>();
        let stored = stored_text(&entries, zone.name());
        if let Some(known) = KNOWN.get(&stored) {
            return Ok(known.clone());
        }
        let mut parsed = Vec::with_capacity(entries.len());
        for (index, (pattern, change)) in entries.into_iter().enumerate() {
            check_change(index, &change)?;
            parsed.push(Entry {
                cron: parse_pattern(index, &pattern, zone)?,
                pattern,
                change,
            });
        }
        let schedule = Self(Arc::new(Inner {
            entries: parsed,
            tz: zone,
            stored: stored.clone(),
            spans: Mutex::default(),
        }));
        if KNOWN.len() >= MAX_KNOWN {
            KNOWN.clear();
        }
        KNOWN.insert(stored, schedule.clone());
        Ok(schedule)
    }

    /// The entries' patterns and changes, in order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, Change)> {
        self.0
            .entries
            .iter()
            .map(|e| (e.pattern.as_str(), e.change))
    }

    pub fn tz(&self) -> &str {
        self.0.tz.name()
    }

    /// `PATTERN~CHANGE;...@ZONE` with no ' ', ',', ':' or '%' of its own: its form inside a
    /// stored limit set. A change is `xPERMILLE`, or `cMILLI`, `aMILLI`, `pMS` joined by `~`.
    /// [`Schedule::from_stored`] reads it back.
    pub fn stored(&self) -> &str {
        &self.0.stored
    }

    /// # Errors
    /// As [`Schedule::new`], and [`ScheduleError::Malformed`] for text not in its form.
    pub fn from_stored(text: &str) -> Result<Self, ScheduleError> {
        if let Some(known) = KNOWN.get(text) {
            return Ok(known.clone());
        }
        let malformed = || ScheduleError::Malformed(text.to_owned());
        let (body, tz) = text.rsplit_once('@').ok_or_else(malformed)?;
        let entries = body
            .split(';')
            .map(|entry| {
                let mut parts = entry.split('~');
                let pattern = unescape(parts.next().ok_or_else(malformed)?);
                let mut change = None;
                let (mut capacity, mut refill_amount, mut refill_period_ms) = (None, None, None);
                for part in parts {
                    let (tag, value) = part.split_at_checked(1).ok_or_else(malformed)?;
                    let value: i64 = value.parse().map_err(|_| malformed())?;
                    let slot = match tag {
                        "x" if change.is_none() => {
                            change = Some(Change::Scale(
                                u64::try_from(value).map_err(|_| malformed())?,
                            ));
                            continue;
                        }
                        "c" => &mut capacity,
                        "a" => &mut refill_amount,
                        "p" => &mut refill_period_ms,
                        _ => return Err(malformed()),
                    };
                    if slot.replace(value).is_some() {
                        return Err(malformed());
                    }
                }
                let set = Change::Set {
                    capacity,
                    refill_amount,
                    refill_period_ms,
                };
                let change = match change {
                    Some(scale) if set == Change::NONE => scale,
                    Some(_) => return Err(malformed()),
                    None => set,
                };
                Ok((pattern, change))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(&entries, &unescape(tz))
    }

    /// `base` as the schedule has it at `at_ms`.
    pub fn params(&self, base: Params, at_ms: i64) -> Params {
        match self.span(at_ms).active {
            Some(i) => self.0.entries[i].change.apply(base),
            None => base,
        }
    }

    /// Every value `base` takes under the schedule (its own and each entry's).
    pub fn all_params(&self, base: Params) -> impl Iterator<Item = Params> + '_ {
        std::iter::once(base).chain(self.0.entries.iter().map(move |e| e.change.apply(base)))
    }

    /// Whether a boundary lies in `(from_ms, to_ms]`.
    pub fn boundary_between(&self, from_ms: i64, to_ms: i64) -> bool {
        to_ms > from_ms && self.span(from_ms).to <= to_ms
    }

    /// The span of instants around `at_ms` with the same entry in force: from `at_ms` (or
    /// earlier) up to the next boundary (or as far as it was looked for).
    pub fn span(&self, at_ms: i64) -> Span {
        let later = match self.0.spans.lock() {
            Ok(spans) => {
                if let Some(s) = spans.iter().find(|s| (s.from..s.to).contains(&at_ms)) {
                    return *s;
                }
                spans
                    .iter()
                    .filter(|s| s.from > at_ms && s.from - at_ms <= JOIN_MS)
                    .min_by_key(|s| s.from)
                    .copied()
            }
            Err(_) => None,
        };
        // Shortly before a known span, with the same entry in force at every minute up to it:
        // the span starts earlier (no need to look ahead again).
        if let Some(s) = later
            && self.same_until(at_ms, s.from, s.active)
        {
            let joined = Span { from: at_ms, ..s };
            if let Ok(mut spans) = self.0.spans.lock()
                && let Some(known) = spans.iter_mut().find(|k| **k == s)
            {
                known.from = at_ms;
            }
            return joined;
        }
        let computed = self.compute(at_ms);
        if let Ok(mut spans) = self.0.spans.lock() {
            // Every instant from `at_ms` to the boundary has it as its next one: join a span
            // known to end there.
            match spans
                .iter_mut()
                .find(|s| s.to == computed.to && s.active == computed.active)
            {
                Some(s) => s.from = s.from.min(computed.from),
                None => {
                    if spans.len() >= SPANS {
                        spans.remove(0);
                    }
                    spans.push(computed);
                }
            }
        }
        computed
    }

    /// Whether `active` is in force at every minute from `from_ms`'s up to `to_ms`.
    fn same_until(&self, from_ms: i64, to_ms: i64, active: Option<usize>) -> bool {
        let mut minute = from_ms - from_ms.rem_euclid(60_000);
        while minute < to_ms {
            let Some(at) = self.0.tz.timestamp_millis_opt(minute).single() else {
                return false;
            };
            if self.active_at(&at) != active {
                return false;
            }
            minute += 60_000;
        }
        true
    }

    /// The entry in force at the minute `at`: the first matching one.
    fn active_at(&self, at: &DateTime<Tz>) -> Option<usize> {
        self.0.entries.iter().position(|e| self.matches(e, at))
    }

    fn matches(&self, entry: &Entry, at: &DateTime<Tz>) -> bool {
        entry.cron.is_time_matching(at).unwrap_or(false)
    }

    /// The first minute after `at` where `entry` may stop matching (matching now) or starts
    /// matching (not matching now); `None` when it never starts again.
    fn next_change(
        &self,
        entry: &Entry,
        at: &DateTime<Tz>,
        matching: bool,
    ) -> Option<DateTime<Tz>> {
        if !matching {
            return entry.cron.find_next_occurrence(at, false).ok();
        }
        let mut end = *at + Duration::minutes(1);
        let mut walked = 1;
        while walked < MAX_RUN_MINUTES && self.matches(entry, &end) {
            end += Duration::minutes(1);
            walked += 1;
        }
        Some(end)
    }

    fn compute(&self, at_ms: i64) -> Span {
        let limit = at_ms.saturating_add(HORIZON_MS);
        // Matching is per minute (every zone's offset is a whole number of minutes).
        let Some(start) = self
            .0
            .tz
            .timestamp_millis_opt(at_ms - at_ms.rem_euclid(60_000))
            .single()
        else {
            return Span {
                from: at_ms,
                to: at_ms.saturating_add(60_000),
                active: None,
            };
        };
        let entries = &self.0.entries;
        let active = self.active_at(&start);
        // Only the entry in force and those before it (not matching) decide where another one
        // is: a later entry matters only once the one in force stops matching.
        let watched = active.map_or(entries.len(), |a| a + 1);
        // The entry in force stays up to `to` at least (a boundary if it changes there).
        let (mut t, mut to) = (start, limit);
        for _ in 0..MAX_STEPS {
            let next = entries[..watched]
                .iter()
                .enumerate()
                .filter_map(|(i, e)| self.next_change(e, &t, Some(i) == active))
                .min();
            let Some(at) = next.filter(|at| at.timestamp_millis() <= limit) else {
                to = limit;
                break;
            };
            to = at.timestamp_millis();
            if self.active_at(&at) != active {
                break;
            }
            t = at;
        }
        Span {
            from: at_ms,
            to: to.max(at_ms.saturating_add(1)),
            active,
        }
    }
}

fn check_change(index: usize, change: &Change) -> Result<(), ScheduleError> {
    let range = |field, value: u128, max: u128| {
        if value == 0 || value > max {
            return Err(ScheduleError::Range {
                index,
                field,
                value,
                max,
            });
        }
        Ok(())
    };
    let max_milli = u128::from(super::limit::MAX_TOKENS) * super::limit::MILLI as u128;
    match *change {
        Change::Scale(permille) => range(
            "scale (per-mille)",
            permille.into(),
            MAX_SCALE_PERMILLE.into(),
        ),
        Change::Set {
            capacity,
            refill_amount,
            refill_period_ms,
        } => {
            if *change == Change::NONE {
                return Err(ScheduleError::Change(index));
            }
            let value = |v: Option<i64>| v.map(|v| u128::try_from(v).unwrap_or(0));
            if let Some(v) = value(capacity) {
                range("capacity (milli-tokens)", v, max_milli)?;
            }
            if let Some(v) = value(refill_amount) {
                range("refill amount (milli-tokens)", v, max_milli)?;
            }
            if let Some(v) = value(refill_period_ms) {
                range("refill period (ms)", v, super::limit::MAX_PERIOD_MS as u128)?;
            }
            Ok(())
        }
    }
}

fn parse_pattern(index: usize, pattern: &str, zone: Tz) -> Result<Cron, ScheduleError> {
    let bad = |why: &str| ScheduleError::Cron {
        index,
        pattern: pattern.to_owned(),
        why: why.to_owned(),
    };
    if pattern.len() > MAX_TEXT {
        return Err(bad("is too long"));
    }
    if pattern.split(' ').count() != 5 {
        return Err(bad(
            "expected five fields: minute hour day-of-month month day-of-week",
        ));
    }
    let cron = Cron::from_str(pattern).map_err(|e| bad(&e.to_string()))?;
    // Checked from a fixed instant (2000-01-01), so that accepting a pattern is pure too.
    let from = zone
        .timestamp_millis_opt(946_684_800_000)
        .single()
        .ok_or_else(|| bad("cannot be read in this zone"))?;
    let first = cron.find_next_occurrence(&from, true).ok();
    if first.is_none_or(|t| t.timestamp_millis() > 946_684_800_000 + 10 * HORIZON_MS) {
        return Err(bad("never matches"));
    }
    Ok(cron)
}

fn stored_text(entries: &[(String, Change)], tz: &str) -> String {
    let mut out = String::new();
    for (i, (pattern, change)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        out.push_str(&escape(pattern));
        match change {
            Change::Scale(permille) => out.push_str(&format!("~x{permille}")),
            Change::Set {
                capacity,
                refill_amount,
                refill_period_ms,
            } => {
                for (tag, value) in [
                    ("c", capacity),
                    ("a", refill_amount),
                    ("p", refill_period_ms),
                ] {
                    if let Some(v) = value {
                        out.push_str(&format!("~{tag}{v}"));
                    }
                }
            }
        }
    }
    out.push('@');
    out.push_str(&escape(tz));
    out
}

/// A calendar's escapes, and the separators of a schedule's own.
fn escape(text: &str) -> String {
    super::calendar::escape(text)
        .replace(';', "%3B")
        .replace('~', "%7E")
        .replace('@', "%40")
}

fn unescape(text: &str) -> String {
    super::calendar::unescape(
        &text
            .replace("%40", "@")
            .replace("%7E", "~")
            .replace("%3B", ";"),
    )
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.0.stored == other.0.stored
    }
}

impl Eq for Schedule {}

impl std::hash::Hash for Schedule {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.stored.hash(state);
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.0.stored)
    }
}

#[cfg(test)]
mod tests;
