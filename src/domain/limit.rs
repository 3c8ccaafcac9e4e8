//! Limit definitions: a named token bucket's capacity and refill rate.
//!
//! Everything is kept in integer milli-tokens and milliseconds, so no float ever decides an
//! admission. Constructors validate, so a `Limit` in hand is always usable by the bucket math
//! without overflow checks of its own.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::calendar::{Calendar, CalendarError};
use super::schedule::{Change, Params, Schedule, ScheduleError};

/// Milli-tokens per token.
pub const MILLI: i64 = 1_000;
/// The largest capacity or refill amount, in whole tokens (as in the Python zae-limiter).
pub const MAX_TOKENS: u64 = 1_000_000_000_000_000;
/// The longest refill period: ten years.
pub const MAX_PERIOD_MS: i64 = 10 * 366 * 24 * 3_600 * 1_000;
/// The longest limit name.
pub const MAX_NAME_LEN: usize = 64;
/// The most limits one bucket may have. All of a bucket's limits live in one stored item, and
/// DynamoDB bills a write by the item's size (1 write unit per KB; at most 400 KB): 32 limits
/// with the longest names make an item of about 12 KB.
pub const MAX_LIMITS: usize = 32;

/// Why a limit definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("limit name is empty")]
    EmptyName,
    #[error("limit name {name:?} is {len} characters long, the maximum is {MAX_NAME_LEN}")]
    NameTooLong { name: String, len: usize },
    #[error(
        "limit name {name:?} contains {ch:?}: use letters, digits, '_', '-' and '.' (starting with a letter or digit)"
    )]
    InvalidName { name: String, ch: char },
    #[error("limit {name:?}: {field} must be greater than zero")]
    Zero { name: String, field: &'static str },
    #[error("limit {name:?}: {field} {value} is larger than the maximum {max}")]
    TooLarge {
        name: String,
        field: &'static str,
        value: u128,
        max: u128,
    },
    #[error("limit {name:?} is given more than once")]
    Duplicate { name: String },
    #[error("{count} limits given, the most one bucket may have is {MAX_LIMITS}")]
    TooMany { count: usize },
    #[error("malformed limit encoding {0:?}")]
    Malformed(String),
    #[error("limit {name:?}: {error}")]
    Calendar { name: String, error: CalendarError },
    #[error(
        "limit {name:?}: a session window is a whole number of seconds, at least one; got {ms} ms"
    )]
    Session { name: String, ms: u128 },
    #[error("limit {name:?}: {error}")]
    Schedule { name: String, error: ScheduleError },
    #[error(
        "limit {name:?}: a schedule changes a dripping limit; a quota (calendar or session) \
         cannot have one"
    )]
    ScheduledQuota { name: String },
    #[error(
        "limit {name:?}: under schedule entry {index} its {field} would be {value}, above the \
         maximum {max}"
    )]
    ScheduledTooLarge {
        name: String,
        index: usize,
        field: &'static str,
        value: u128,
        max: u128,
    },
}

impl LimitError {
    /// Whether the limit's name is what is wrong (not its values).
    pub fn is_about_name(&self) -> bool {
        matches!(
            self,
            Self::EmptyName | Self::NameTooLong { .. } | Self::InvalidName { .. }
        )
    }
}

/// A validated limit name: 1 to 64 characters of `[A-Za-z0-9_.-]`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LimitName(std::sync::Arc<str>);

impl LimitName {
    /// # Errors
    /// [`LimitError`] when the name is empty, too long or has a character outside the allowed set.
    pub fn new(name: impl Into<String>) -> Result<Self, LimitError> {
        let name = name.into();
        if name.is_empty() {
            return Err(LimitError::EmptyName);
        }
        let len = name.chars().count();
        if len > MAX_NAME_LEN {
            return Err(LimitError::NameTooLong { name, len });
        }
        let first_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric());
        if let Some(ch) = name
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
            .or(if first_ok { None } else { name.chars().next() })
        {
            return Err(LimitError::InvalidName { name, ch });
        }
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for LimitName {
    type Error = LimitError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<LimitName> for String {
    fn from(value: LimitName) -> Self {
        value.0.to_string()
    }
}

impl fmt::Display for LimitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One token bucket's definition: `capacity` tokens at most, refilled by `refill_amount` tokens every
/// `refill_period`, continuously (lazily computed, never on a timer).
///
/// A **calendar quota** ([`Limit::quota`]) does not drip: its balance goes back to its amount in
/// one lump at each edge of its calendar (the instants its cron pattern starts matching), applied
/// lazily by the first request after it; its refill amount and period are 0.
///
/// A dripping limit may have a **schedule** ([`Limit::with_schedule`]): while one of its cron
/// patterns matches, the first matching entry changes its capacity and refill.
///
/// A **soft** limit is debited like any other but never refuses: a request it cannot cover
/// takes its balance into debt (down to [`super::amounts::MIN_BALANCE`], the floor no balance
/// passes), and its status says so (`overdrawn`). For watching a new limit before enforcing it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Limit {
    name: LimitName,
    capacity: i64,
    refill_amount: i64,
    refill_period_ms: i64,
    soft: bool,
    quota: Option<Quota>,
    schedule: Option<Schedule>,
}

/// How a quota (a limit without drip) gets its amount back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Quota {
    /// At each edge of a calendar.
    Calendar(Calendar),
    /// At the end of a window of this many milliseconds opened by the entity's first admitted
    /// use (after the previous window ended).
    Session(i64),
}

/// The longest session window: a year.
pub const MAX_SESSION_MS: i64 = 366 * 24 * 3_600 * 1_000;

impl Limit {
    /// `rate` tokens per second; the capacity is `rate` (see [`Limit::with_burst`]).
    ///
    /// # Errors
    /// [`LimitError`] for a bad name, a zero rate or a rate above [`MAX_TOKENS`].
    pub fn per_second(name: &str, rate: u64) -> Result<Self, LimitError> {
        Self::custom(name, rate, rate, Duration::from_secs(1))
    }

    /// `rate` tokens per minute. See [`Limit::per_second`].
    ///
    /// # Errors
    /// As [`Limit::per_second`].
    pub fn per_minute(name: &str, rate: u64) -> Result<Self, LimitError> {
        Self::custom(name, rate, rate, Duration::from_secs(60))
    }

    /// `rate` tokens per hour. See [`Limit::per_second`].
    ///
    /// # Errors
    /// As [`Limit::per_second`].
    pub fn per_hour(name: &str, rate: u64) -> Result<Self, LimitError> {
        Self::custom(name, rate, rate, Duration::from_secs(3_600))
    }

    /// `rate` tokens per day. See [`Limit::per_second`].
    ///
    /// # Errors
    /// As [`Limit::per_second`].
    pub fn per_day(name: &str, rate: u64) -> Result<Self, LimitError> {
        Self::custom(name, rate, rate, Duration::from_secs(86_400))
    }

    /// A bucket of `capacity` tokens refilled by `refill_amount` tokens every `refill_period`.
    ///
    /// # Errors
    /// [`LimitError`] for a bad name, a zero value, values above [`MAX_TOKENS`], or a period shorter
    /// than a millisecond or longer than ten years.
    pub fn custom(
        name: &str,
        capacity: u64,
        refill_amount: u64,
        refill_period: Duration,
    ) -> Result<Self, LimitError> {
        let name = LimitName::new(name)?;
        let capacity = whole_tokens(&name, "capacity", capacity)?;
        let refill_amount = whole_tokens(&name, "refill amount", refill_amount)?;
        let period = refill_period.as_millis();
        if period == 0 {
            return Err(zero(&name, "refill period (in milliseconds)"));
        }
        if period > MAX_PERIOD_MS as u128 {
            return Err(LimitError::TooLarge {
                name: name.0.to_string(),
                field: "refill period (ms)",
                value: period,
                max: MAX_PERIOD_MS as u128,
            });
        }
        Ok(Self {
            name,
            capacity,
            refill_amount,
            refill_period_ms: period as i64,
            soft: false,
            quota: None,
            schedule: None,
        })
    }

    /// A calendar quota: `amount` tokens, all back at each edge of `calendar` (and no drip).
    ///
    /// # Errors
    /// [`LimitError`] for a bad name, a zero amount or one above [`MAX_TOKENS`].
    pub fn quota(name: &str, amount: u64, calendar: Calendar) -> Result<Self, LimitError> {
        let name = LimitName::new(name)?;
        let capacity = whole_tokens(&name, "amount", amount)?;
        Ok(Self::quota_from_milli(
            name,
            capacity,
            Quota::Calendar(calendar),
        ))
    }

    /// A session quota: `amount` tokens per window of `window`, opened by the first admitted
    /// use after the previous window ended; all back at its end (no drip).
    ///
    /// # Errors
    /// [`LimitError`] for a bad name, a zero amount or one above [`MAX_TOKENS`], or a window
    /// that is not a whole number of seconds from one second to a year.
    pub fn session_quota(name: &str, amount: u64, window: Duration) -> Result<Self, LimitError> {
        let name = LimitName::new(name)?;
        let capacity = whole_tokens(&name, "amount", amount)?;
        let ms = session_ms(&name, window.as_millis())?;
        Ok(Self::quota_from_milli(name, capacity, Quota::Session(ms)))
    }

    fn quota_from_milli(name: LimitName, capacity: i64, quota: Quota) -> Self {
        Self {
            name,
            capacity,
            refill_amount: 0,
            refill_period_ms: 0,
            soft: false,
            quota: Some(quota),
            schedule: None,
        }
    }

    /// The same limit with a capacity of `burst` tokens instead of one period's refill (of a
    /// quota: its amount).
    ///
    /// # Errors
    /// [`LimitError`] for a zero burst or one above [`MAX_TOKENS`].
    pub fn with_burst(mut self, burst: u64) -> Result<Self, LimitError> {
        self.capacity = whole_tokens(&self.name, "burst", burst)?;
        match self.schedule.take() {
            // Its entries scale the new capacity: checked again.
            Some(schedule) => self.with_schedule(schedule),
            None => Ok(self),
        }
    }

    /// A limit from its stored milli-token form.
    ///
    /// # Errors
    /// [`LimitError`] when any value is out of range.
    pub fn from_milli(
        name: LimitName,
        capacity: i64,
        refill_amount: i64,
        refill_period_ms: i64,
    ) -> Result<Self, LimitError> {
        let max = MAX_TOKENS as i64 * MILLI;
        for (field, value, max) in [
            ("capacity", capacity, max),
            ("refill amount", refill_amount, max),
            ("refill period (ms)", refill_period_ms, MAX_PERIOD_MS),
        ] {
            if value <= 0 {
                return Err(zero(&name, field));
            }
            if value > max {
                return Err(LimitError::TooLarge {
                    name: name.0.to_string(),
                    field,
                    value: value as u128,
                    max: max as u128,
                });
            }
        }
        Ok(Self {
            name,
            capacity,
            refill_amount,
            refill_period_ms,
            soft: false,
            quota: None,
            schedule: None,
        })
    }

    /// The same limit under `schedule` (see [`super::schedule`]).
    ///
    /// # Errors
    /// [`LimitError::ScheduledQuota`] for a quota, [`LimitError::ScheduledTooLarge`] when an
    /// entry would take a value above its maximum.
    pub fn with_schedule(mut self, schedule: Schedule) -> Result<Self, LimitError> {
        if self.quota.is_some() {
            return Err(LimitError::ScheduledQuota {
                name: self.name.to_string(),
            });
        }
        let max = MAX_TOKENS as i64 * MILLI;
        for (index, params) in schedule.all_params(self.base()).enumerate().skip(1) {
            for (field, value, max) in [
                ("capacity (milli-tokens)", params.capacity, max),
                ("refill amount (milli-tokens)", params.refill_amount, max),
                ("refill period (ms)", params.refill_period_ms, MAX_PERIOD_MS),
            ] {
                if value > max {
                    return Err(LimitError::ScheduledTooLarge {
                        name: self.name.to_string(),
                        index: index - 1,
                        field,
                        value: value as u128,
                        max: max as u128,
                    });
                }
            }
        }
        self.schedule = Some(schedule);
        Ok(self)
    }

    /// The schedule of a scheduled limit.
    pub fn schedule(&self) -> Option<&Schedule> {
        self.schedule.as_ref()
    }

    /// Its own values (a schedule's entries change them while they match).
    pub fn base(&self) -> Params {
        Params {
            capacity: self.capacity,
            refill_amount: self.refill_amount,
            refill_period_ms: self.refill_period_ms,
        }
    }

    /// Its values in force at `at_ms`.
    pub fn params_at(&self, at_ms: i64) -> Params {
        match &self.schedule {
            None => self.base(),
            Some(s) => s.params(self.base(), at_ms),
        }
    }

    /// Its capacity in force at `at_ms`, milli-tokens.
    pub fn capacity_at(&self, at_ms: i64) -> i64 {
        self.params_at(at_ms).capacity
    }

    /// Of a scheduled limit: the limit as it stands at `at_ms`, its schedule applied (and no
    /// schedule of its own).
    pub fn in_force(&self, at_ms: i64) -> Option<Self> {
        let schedule = self.schedule.as_ref()?;
        let p = schedule.params(self.base(), at_ms);
        Some(Self {
            capacity: p.capacity,
            refill_amount: p.refill_amount,
            refill_period_ms: p.refill_period_ms,
            schedule: None,
            ..self.clone()
        })
    }

    /// The same limit, soft (`true`: debited, never refusing) or enforced.
    #[must_use]
    pub fn with_soft(mut self, soft: bool) -> Self {
        self.soft = soft;
        self
    }

    pub fn name(&self) -> &LimitName {
        &self.name
    }
    /// How a quota gets its amount back (`None`: a dripping limit).
    pub fn quota_kind(&self) -> Option<&Quota> {
        self.quota.as_ref()
    }
    /// The calendar of a calendar quota.
    pub fn calendar(&self) -> Option<&Calendar> {
        match &self.quota {
            Some(Quota::Calendar(c)) => Some(c),
            _ => None,
        }
    }
    /// The window of a session quota, ms.
    pub fn session_ms(&self) -> Option<i64> {
        match self.quota {
            Some(Quota::Session(ms)) => Some(ms),
            _ => None,
        }
    }
    /// Capacity in milli-tokens.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }
    /// Refill amount per period, in milli-tokens (0 for a quota).
    pub fn refill_amount(&self) -> i64 {
        self.refill_amount
    }
    pub fn refill_period_ms(&self) -> i64 {
        self.refill_period_ms
    }
    /// Whether the limit is soft: debited, never refusing.
    pub fn is_soft(&self) -> bool {
        self.soft
    }
}

impl std::str::FromStr for Limit {
    type Err = LimitError;

    /// `NAME=RATE/PERIOD[,burst=N][,soft]`: `rpm=100/1m`, `tpm=10000/60s,burst=15000`,
    /// `d=5/1d`, `tpm=50000/1m,soft`. A schedule adds `when(PATTERN)=CHANGE` entries (the first
    /// matching one is in force) and `tz=ZONE` (default UTC), a change being `xSCALE` or
    /// `capacity:N`, `refill:N`, `period:PERIOD` joined by `+`:
    /// `rpm=100/1m,when(* 9-17 * * 1-5)=x2,when(* 0-6 * * *)=capacity:20+refill:20`. The period is a count (default 1) and a unit: `ms`, `s`,
    /// `m`, `h` or `d`. A calendar quota: `NAME=AMOUNT/cron(PATTERN)[,tz=ZONE][,soft]`, e.g.
    /// `tok=1000000/cron(0 0 1 * *),tz=Europe/Berlin` (the time zone defaults to UTC).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = || {
            LimitError::Malformed(format!(
                "{spec} (expected NAME=RATE/PERIOD[,burst=N][,soft], e.g. rpm=100/1m, with a \
                 schedule's [,when(PATTERN)=xSCALE|capacity:N+refill:N+period:P]...[,tz=ZONE], \
                 or a quota NAME=AMOUNT/cron(PATTERN)[,tz=ZONE][,soft], e.g. \
                 tok=1000/cron(0 0 1 * *))"
            ))
        };
        let (name, rest) = spec.split_once('=').ok_or_else(bad)?;
        if let Some((amount, session)) = rest.split_once("/session(") {
            let (window, options) = session.split_once(')').ok_or_else(bad)?;
            let soft = match options.trim() {
                "" => false,
                o if o.strip_prefix(',').is_some_and(|o| o.trim() == "soft") => true,
                _ => return Err(bad()),
            };
            let amount: u64 = amount.trim().parse().map_err(|_| bad())?;
            let window = parse_period(window).ok_or_else(bad)?;
            return Ok(Self::session_quota(name.trim(), amount, window)?.with_soft(soft));
        }
        if let Some((amount, quota)) = rest.split_once("/cron(") {
            let (pattern, options) = quota.split_once(')').ok_or_else(bad)?;
            let (mut tz, mut soft) = (None, false);
            for option in options.split(',').skip(1) {
                match option.trim() {
                    "soft" if !soft => soft = true,
                    o => match o.strip_prefix("tz=") {
                        Some(z) if tz.is_none() => tz = Some(z),
                        _ => return Err(bad()),
                    },
                }
            }
            if !options.is_empty() && !options.starts_with(',') {
                return Err(bad());
            }
            let amount: u64 = amount.trim().parse().map_err(|_| bad())?;
            let name = name.trim();
            let calendar = Calendar::new(pattern, tz.unwrap_or("UTC")).map_err(|error| {
                LimitError::Calendar {
                    name: name.to_owned(),
                    error,
                }
            })?;
            return Ok(Self::quota(name, amount, calendar)?.with_soft(soft));
        }
        let mut parts = split_options(rest);
        let rate_period = parts.next().ok_or_else(bad)?;
        let (mut burst, mut soft, mut tz, mut entries) = (None, false, None, Vec::new());
        for option in parts {
            match option.trim() {
                "soft" if !soft => soft = true,
                o if o.starts_with("when(") => {
                    let (pattern, change) = o["when(".len()..].split_once(")=").ok_or_else(bad)?;
                    entries.push((pattern.to_owned(), parse_change(change).ok_or_else(bad)?));
                }
                o => match (o.strip_prefix("burst="), o.strip_prefix("tz=")) {
                    (Some(b), _) if burst.is_none() => burst = Some(b),
                    (_, Some(z)) if tz.is_none() => tz = Some(z),
                    _ => return Err(bad()),
                },
            }
        }
        let (rate, period) = rate_period.split_once('/').ok_or_else(bad)?;
        let rate: u64 = rate.trim().parse().map_err(|_| bad())?;
        let period = parse_period(period).ok_or_else(bad)?;
        let name = name.trim();
        let mut limit = Self::custom(name, rate, rate, period)?.with_soft(soft);
        if let Some(b) = burst {
            limit = limit.with_burst(b.trim().parse().map_err(|_| bad())?)?;
        }
        match (entries.is_empty(), tz) {
            (true, None) => Ok(limit),
            (true, Some(_)) => Err(bad()),
            (false, tz) => {
                let schedule = Schedule::new(&entries, tz.unwrap_or("UTC")).map_err(|error| {
                    LimitError::Schedule {
                        name: name.to_owned(),
                        error,
                    }
                })?;
                limit.with_schedule(schedule)
            }
        }
    }
}

/// The comma-separated parts of a limit's text, outside parentheses (a cron pattern may have
/// commas of its own).
fn split_options(text: &str) -> impl Iterator<Item = &str> {
    let mut depth = 0_i32;
    let mut start = 0;
    let mut parts = Vec::new();
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter()
}

/// A schedule entry's change as people write it: `x0.5` (a scale, to a thousandth), or any of
/// `capacity:N`, `refill:N`, `period:PERIOD` joined by `+` (the values it sets).
fn parse_change(text: &str) -> Option<Change> {
    let text = text.trim();
    if let Some(scale) = text.strip_prefix('x') {
        let (whole, fraction) = scale.split_once('.').unwrap_or((scale, ""));
        if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let whole: u64 = whole.parse().ok()?;
        let fraction: u64 = format!("{fraction:0<3}").parse().ok()?;
        return Some(Change::Scale(
            whole.checked_mul(1_000)?.checked_add(fraction)?,
        ));
    }
    let (mut capacity, mut refill_amount, mut refill_period_ms) = (None, None, None);
    for part in text.split('+') {
        let (key, value) = part.trim().split_once(':')?;
        let tokens = || -> Option<i64> {
            let n: u64 = value.trim().parse().ok()?;
            Some(i64::try_from(n.min(MAX_TOKENS + 1)).ok()? * MILLI)
        };
        let slot = match key.trim() {
            "capacity" => (&mut capacity, tokens()?),
            "refill" => (&mut refill_amount, tokens()?),
            "period" => (
                &mut refill_period_ms,
                i64::try_from(parse_period(value)?.as_millis()).ok()?,
            ),
            _ => return None,
        };
        if slot.0.replace(slot.1).is_some() {
            return None;
        }
    }
    Some(Change::Set {
        capacity,
        refill_amount,
        refill_period_ms,
    })
}

/// A period as people write it: a count (default 1) and a unit, `ms`, `s`, `m`, `h` or `d`.
fn parse_period(period: &str) -> Option<Duration> {
    let period = period.trim();
    let split = period.find(|c: char| !c.is_ascii_digit())?;
    let (count, unit) = period.split_at(split);
    let count: u64 = if count.is_empty() {
        1
    } else {
        count.parse().ok()?
    };
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(count.checked_mul(unit_ms)?))
}

/// A session window in ms: whole seconds, one second to [`MAX_SESSION_MS`].
fn session_ms(name: &LimitName, ms: u128) -> Result<i64, LimitError> {
    if ms < 1_000 || !ms.is_multiple_of(1_000) {
        return Err(LimitError::Session {
            name: name.to_string(),
            ms,
        });
    }
    if ms > MAX_SESSION_MS as u128 {
        return Err(LimitError::TooLarge {
            name: name.0.to_string(),
            field: "session window (ms)",
            value: ms,
            max: MAX_SESSION_MS as u128,
        });
    }
    Ok(ms as i64)
}

fn zero(name: &LimitName, field: &'static str) -> LimitError {
    LimitError::Zero {
        name: name.0.to_string(),
        field,
    }
}

fn whole_tokens(name: &LimitName, field: &'static str, tokens: u64) -> Result<i64, LimitError> {
    if tokens == 0 {
        return Err(zero(name, field));
    }
    if tokens > MAX_TOKENS {
        return Err(LimitError::TooLarge {
            name: name.0.to_string(),
            field,
            value: tokens.into(),
            max: MAX_TOKENS.into(),
        });
    }
    Ok(tokens as i64 * MILLI)
}

/// Checks a set of limits for duplicate names and returns it sorted by name (the canonical order).
///
/// # Errors
/// [`LimitError::Duplicate`] when two limits share a name.
pub fn canonical(mut limits: Vec<Limit>) -> Result<Vec<Limit>, LimitError> {
    if limits.len() > MAX_LIMITS {
        return Err(LimitError::TooMany {
            count: limits.len(),
        });
    }
    limits.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = limits.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(LimitError::Duplicate {
            name: w[0].name.0.to_string(),
        });
    }
    Ok(limits)
}

/// The stored text form of a limit set: `name:capacity:refill_amount:refill_period_ms` in
/// milli-tokens, followed by `:cron=`/`:session=` for a quota, `:sched=` for a schedule
/// ([`Schedule::stored`]) and `:soft` for a soft limit, comma separated, in canonical order. Equal
/// sets encode equally, so the text also serves as a version stamp in conditional writes (and a
/// limit turned soft or back is a change of configuration: its balance is kept).
pub fn encode(limits: &[Limit]) -> String {
    let mut out = String::new();
    for (i, l) in limits.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "{}:{}:{}:{}",
            l.name, l.capacity, l.refill_amount, l.refill_period_ms
        ));
        match &l.quota {
            Some(Quota::Calendar(c)) => {
                out.push_str(":cron=");
                out.push_str(c.stored());
            }
            Some(Quota::Session(ms)) => out.push_str(&format!(":session={ms}")),
            None => {}
        }
        if let Some(schedule) = &l.schedule {
            out.push_str(":sched=");
            out.push_str(schedule.stored());
        }
        if l.soft {
            out.push_str(":soft");
        }
    }
    out
}

/// Milli-tokens as tokens: `1`, `0.5`.
pub fn tokens(milli: i64) -> String {
    if milli % MILLI == 0 {
        (milli / MILLI).to_string()
    } else {
        format!("{}", milli as f64 / MILLI as f64)
    }
}

/// A period as people write it: `1s`, `1m`, `1h`, `1d`, `90s`, `250ms`.
pub fn period(ms: i64) -> String {
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

impl Limit {
    /// The limit in its user's units: `rpm 100/1m, burst 150` (`, soft` when soft).
    pub fn describe(&self) -> String {
        if let Some(ms) = self.session_ms() {
            return format!(
                "{} {}/session({}){}",
                self.name,
                tokens(self.capacity),
                period(ms),
                if self.soft { ", soft" } else { "" }
            );
        }
        if let Some(c) = self.calendar() {
            return format!(
                "{} {}/cron({}), tz {}{}",
                self.name,
                tokens(self.capacity),
                c.pattern(),
                c.tz(),
                if self.soft { ", soft" } else { "" }
            );
        }
        let mut text = format!(
            "{} {}/{}, burst {}",
            self.name,
            tokens(self.refill_amount),
            period(self.refill_period_ms),
            tokens(self.capacity),
        );
        if let Some(schedule) = &self.schedule {
            for (pattern, change) in schedule.entries() {
                text.push_str(&format!(", when({pattern}) {}", describe_change(change)));
            }
            text.push_str(&format!(", tz {}", schedule.tz()));
        }
        if self.soft {
            text.push_str(", soft");
        }
        text
    }
}

/// A schedule entry's change in the limit grammar's form (`x0.5`, `capacity:20+refill:20`).
pub fn describe_change(change: Change) -> String {
    match change {
        Change::Scale(permille) => {
            let text = format!("x{}.{:03}", permille / 1_000, permille % 1_000);
            text.trim_end_matches('0').trim_end_matches('.').to_owned()
        }
        Change::Set {
            capacity,
            refill_amount,
            refill_period_ms,
        } => {
            let parts: Vec<String> = [
                capacity.map(|c| format!("capacity:{}", tokens(c))),
                refill_amount.map(|a| format!("refill:{}", tokens(a))),
                refill_period_ms.map(|p| format!("period:{}", period(p))),
            ]
            .into_iter()
            .flatten()
            .collect();
            parts.join("+")
        }
    }
}

/// Parses [`encode`]'s form.
///
/// # Errors
/// [`LimitError`] for malformed text or out-of-range values.
pub fn decode(text: &str) -> Result<Vec<Limit>, LimitError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let limits = text
        .split(',')
        .map(|part| {
            let malformed = || LimitError::Malformed(part.to_owned());
            let fields: Vec<&str> = part.split(':').collect();
            let [name, cap, amount, period, options @ ..] = &fields[..] else {
                return Err(malformed());
            };
            let (mut soft, mut quota, mut schedule) = (false, None, None);
            for option in options {
                let kind = option
                    .strip_prefix("cron=")
                    .map(|c| ("cron", c))
                    .or_else(|| option.strip_prefix("session=").map(|w| ("session", w)));
                match (kind, option.strip_prefix("sched=")) {
                    (None, None) if *option == "soft" && !soft => soft = true,
                    (Some(k), None) if quota.is_none() && schedule.is_none() && !soft => {
                        quota = Some(k);
                    }
                    (None, Some(text)) if quota.is_none() && schedule.is_none() && !soft => {
                        schedule = Some(text);
                    }
                    _ => return Err(malformed()),
                }
            }
            let num = |s: &str| s.parse::<i64>().map_err(|_| malformed());
            let name = LimitName::new(*name)?;
            let limit = match quota {
                None => {
                    let limit = Limit::from_milli(name, num(cap)?, num(amount)?, num(period)?)?;
                    match schedule {
                        None => limit,
                        Some(text) => {
                            let schedule = Schedule::from_stored(text).map_err(|error| {
                                LimitError::Schedule {
                                    name: limit.name.to_string(),
                                    error,
                                }
                            })?;
                            limit.with_schedule(schedule)?
                        }
                    }
                }
                Some((kind, text)) => {
                    if (num(amount)?, num(period)?) != (0, 0) {
                        return Err(malformed());
                    }
                    let quota = match kind {
                        "cron" => {
                            let calendar = Calendar::from_stored(text).map_err(|error| {
                                LimitError::Calendar {
                                    name: name.to_string(),
                                    error,
                                }
                            })?;
                            Quota::Calendar(calendar)
                        }
                        _ => {
                            let ms = u128::try_from(num(text)?).map_err(|_| malformed())?;
                            Quota::Session(session_ms(&name, ms)?)
                        }
                    };
                    let capacity = num(cap)?;
                    // The same range as a dripping limit's capacity.
                    Limit::from_milli(name.clone(), capacity, 1, 1)?;
                    Limit::quota_from_milli(name, capacity, quota)
                }
            };
            Ok(limit.with_soft(soft))
        })
        .collect::<Result<Vec<_>, _>>()?;
    canonical(limits)
}

#[cfg(test)]
mod describe_tests {
    use super::*;

    #[test]
    fn limits_read_in_tokens_and_periods() {
        let l = decode("rpm:1000:1000:60000").unwrap();
        assert_eq!(l[0].describe(), "rpm 1/1m, burst 1");
        let l = decode("tps:1500:500:1000,tpd:250:5000:86400000").unwrap();
        assert_eq!(l[0].describe(), "tpd 5/1d, burst 0.25");
        assert_eq!(l[1].describe(), "tps 0.5/1s, burst 1.5");
        assert_eq!(period(90_000), "90s");
        assert_eq!(period(250), "250ms");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_set_capacity_and_period() {
        let l = Limit::per_minute("rpm", 100).unwrap();
        assert_eq!(l.capacity(), 100_000);
        assert_eq!(l.refill_amount(), 100_000);
        assert_eq!(l.refill_period_ms(), 60_000);
        let l = Limit::per_second("rps", 1).unwrap().with_burst(10).unwrap();
        assert_eq!((l.capacity(), l.refill_amount()), (10_000, 1_000));
        assert_eq!(
            Limit::per_hour("h", 5).unwrap().refill_period_ms(),
            3_600_000
        );
        assert_eq!(
            Limit::per_day("d", 5).unwrap().refill_period_ms(),
            86_400_000
        );
    }

    #[test]
    fn bad_definitions_are_refused_with_the_field_named() {
        assert_eq!(Limit::per_second("", 1), Err(LimitError::EmptyName));
        let long = "x".repeat(65);
        assert!(matches!(
            Limit::per_second(&long, 1),
            Err(LimitError::NameTooLong { len: 65, .. })
        ));
        assert!(matches!(
            Limit::per_second("a b", 1),
            Err(LimitError::InvalidName { ch: ' ', .. })
        ));
        assert!(matches!(
            Limit::per_second("-a", 1),
            Err(LimitError::InvalidName { ch: '-', .. })
        ));
        let err = Limit::per_second("rpm", 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "limit \"rpm\": capacity must be greater than zero"
        );
        assert!(matches!(
            Limit::per_second("rpm", MAX_TOKENS + 1),
            Err(LimitError::TooLarge {
                field: "capacity",
                ..
            })
        ));
        assert!(Limit::per_second("rpm", MAX_TOKENS).is_ok());
        assert!(matches!(
            Limit::custom("x", 1, 1, Duration::from_micros(999)),
            Err(LimitError::Zero { .. })
        ));
        assert!(matches!(
            Limit::custom("x", 1, 1, Duration::from_secs(u64::MAX)),
            Err(LimitError::TooLarge { .. })
        ));
        assert!(matches!(
            Limit::per_second("x", 1).unwrap().with_burst(0),
            Err(LimitError::Zero { field: "burst", .. })
        ));
    }

    #[test]
    fn specs_parse_as_people_write_them() {
        assert_eq!(
            "rpm=100/1m".parse(),
            Ok(Limit::per_minute("rpm", 100).unwrap())
        );
        assert_eq!(
            "rps=1/s,burst=10".parse(),
            Limit::per_second("rps", 1).unwrap().with_burst(10)
        );
        assert_eq!(
            "tpm=10000/60s".parse::<Limit>().unwrap().refill_period_ms(),
            60_000
        );
        assert_eq!(
            "x=5/250ms".parse::<Limit>().unwrap().refill_period_ms(),
            250
        );
        assert_eq!(
            "tpm=50000/1m,soft".parse(),
            Ok(Limit::per_minute("tpm", 50_000).unwrap().with_soft(true))
        );
        assert_eq!(
            "rps=1/s, soft ,burst=10".parse(),
            Limit::per_second("rps", 1)
                .unwrap()
                .with_soft(true)
                .with_burst(10)
        );
        for bad in [
            "rpm=1/1m,soft,soft",
            "rpm=1/1m,burst=2,burst=3",
            "rpm=1/1m,hard",
            "rpm",
            "rpm=100",
            "rpm=100/1w",
            "rpm=a/1m",
            "rpm=1/1m,b=2",
            "rpm=0/1m",
        ] {
            assert!(bad.parse::<Limit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn encoding_round_trips_in_canonical_order() {
        let limits = vec![
            Limit::per_minute("tpm", 10_000).unwrap(),
            Limit::per_minute("rpm", 100)
                .unwrap()
                .with_burst(150)
                .unwrap(),
        ];
        let limits = canonical(limits).unwrap();
        let text = encode(&limits);
        assert_eq!(text, "rpm:150000:100000:60000,tpm:10000000:10000000:60000");
        assert_eq!(decode(&text).unwrap(), limits);
        let soft = vec![Limit::per_minute("rpm", 1).unwrap().with_soft(true)];
        assert_eq!(encode(&soft), "rpm:1000:1000:60000:soft");
        assert_eq!(decode(&encode(&soft)).unwrap(), soft);
        assert_ne!(encode(&soft), encode(&[soft[0].clone().with_soft(false)]));
        assert!(decode("rpm:1:1:1:hard").is_err());
        assert!(decode("rpm:1:2").is_err());
        assert!(decode("rpm:0:1:1").is_err());
        assert!(matches!(
            canonical(vec![
                Limit::per_second("a", 1).unwrap(),
                Limit::per_minute("a", 1).unwrap()
            ]),
            Err(LimitError::Duplicate { .. })
        ));
    }
}

#[cfg(test)]
mod quota_tests {
    use super::*;

    #[test]
    fn quotas_parse_as_people_write_them() {
        let q: Limit = "tok=1000/cron(0 0 1 * *)".parse().unwrap();
        assert_eq!(
            (q.capacity(), q.refill_amount(), q.refill_period_ms()),
            (1_000_000, 0, 0)
        );
        assert_eq!(q.calendar().unwrap().tz(), "UTC");
        assert_eq!(q.describe(), "tok 1000/cron(0 0 1 * *), tz UTC");
        let q: Limit = "shift=5/cron(0 9,17 * * 1-5),tz=Europe/Berlin,soft"
            .parse()
            .unwrap();
        assert!(q.is_soft());
        assert_eq!(q.calendar().unwrap().pattern(), "0 9,17 * * 1-5");
        assert_eq!(
            q.describe(),
            "shift 5/cron(0 9,17 * * 1-5), tz Europe/Berlin, soft"
        );
        for bad in [
            "tok=1000/cron(* * * * *)",
            "tok=1000/cron(0 0 1 * *),tz=Nowhere",
            "tok=1000/cron(0 0 1 * *",
            "tok=1000/cron(0 0 1 * *)x",
            "tok=0/cron(0 0 1 * *)",
            "tok=1000/cron(0 0 1 * *),burst=5",
            "tok=1000/cron(0 0 1 * *),tz=UTC,tz=UTC",
        ] {
            assert!(bad.parse::<Limit>().is_err(), "{bad}");
        }
        let err = "tok=1/cron(0 0 1 * *),tz=Mars"
            .parse::<Limit>()
            .unwrap_err();
        assert!(err.to_string().contains("Mars"), "{err}");
    }
}
