//! How results are printed: a table for people (`--output table`, the default), JSON for scripts
//! (`--output json`), times in RFC 3339 and amounts in tokens.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::Limit;
use crate::domain::limit::{MILLI, describe_change, period};
use crate::proto;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub(super) fn entity_json(e: &proto::Entity) -> Value {
    json!({
        "id": e.id,
        "name": e.name,
        "parent_id": e.parent_id,
        "cascade": e.cascade,
        "metadata": e.metadata.iter().collect::<BTreeMap<_, _>>(),
    })
}

pub(super) fn limit_json(l: &proto::Limit) -> Value {
    let mut value = json!({
        "name": l.name,
        "capacity": l.capacity,
        "refill_amount": l.refill_amount,
        "refill_period_ms": l.refill_period_ms,
        "refill_period": period(l.refill_period_ms as i64),
        "soft": l.soft,
    });
    if !l.quota_cron.is_empty() {
        value["quota_cron"] = json!(l.quota_cron);
        value["quota_tz"] = json!(l.quota_tz);
    }
    if l.quota_reset_after_ms > 0 {
        value["quota_reset_after_ms"] = json!(l.quota_reset_after_ms);
    }
    if !l.schedule.is_empty() {
        value["schedule"] = l
            .schedule
            .iter()
            .map(|e| json!({"cron": e.cron, "change": describe_change(e.change())}))
            .collect();
        value["schedule_tz"] = json!(l.schedule_tz);
    }
    value
}

/// A stored limit set (the audit's `before`/`after`) in tokens and periods; other values (an
/// entity's JSON) as they are.
pub(super) fn audit_value(text: &str) -> (Value, String) {
    match crate::domain::limit::decode(text) {
        Ok(limits) if !limits.is_empty() => (
            Value::Array(
                limits
                    .iter()
                    .map(|l| {
                        let mut value = json!({
                            "name": l.name().as_str(),
                            "capacity": l.capacity() as f64 / MILLI as f64,
                            "refill_amount": l.refill_amount() as f64 / MILLI as f64,
                            "refill_period_ms": l.refill_period_ms(),
                            "refill_period": period(l.refill_period_ms()),
                            "soft": l.is_soft(),
                        });
                        if let Some(c) = l.calendar() {
                            value["quota_cron"] = json!(c.pattern());
                            value["quota_tz"] = json!(c.tz());
                        }
                        if let Some(ms) = l.session_ms() {
                            value["quota_reset_after_ms"] = json!(ms);
                        }
                        if let Some(s) = l.schedule() {
                            value["schedule"] = s
                                .entries()
                                .map(|(p, c)| json!({"cron": p, "change": describe_change(c)}))
                                .collect();
                            value["schedule_tz"] = json!(s.tz());
                        }
                        value
                    })
                    .collect(),
            ),
            limits
                .iter()
                .map(Limit::describe)
                .collect::<Vec<_>>()
                .join("; "),
        ),
        _ => (Value::String(text.to_owned()), text.to_owned()),
    }
}

/// Epoch milliseconds as RFC 3339 in UTC (`2026-11-29T09:31:37.123Z`).
pub fn rfc3339(ms: i64) -> String {
    let (days, in_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, sec, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1_000 % 60,
        in_day % 1_000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{sec:02}.{milli:03}Z")
}

/// Left-aligned columns under a header.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_uppercase()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

pub(super) fn entity_rows(entities: &[proto::Entity]) -> String {
    let rows: Vec<Vec<String>> = entities
        .iter()
        .map(|e| {
            vec![
                e.id.clone(),
                e.name.clone(),
                e.parent_id.clone().unwrap_or_else(|| "-".into()),
                e.cascade.to_string(),
                e.metadata
                    .iter()
                    .collect::<BTreeMap<_, _>>()
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    table(&["id", "name", "parent", "cascade", "metadata"], &rows)
}

/// A limit set as a table; a `soft` column only when some limit is soft.
/// How a limit gets its tokens back: `100/1m` (with its schedule), `quota: cron(...)`,
/// `quota: session(1h)`.
pub(super) fn rate_text(l: &proto::Limit) -> String {
    match (l.quota_cron.is_empty(), l.quota_reset_after_ms) {
        (false, _) => format!("quota: cron({}), tz {}", l.quota_cron, l.quota_tz),
        (true, 0) => {
            let mut rate = format!("{}/{}", l.refill_amount, period(l.refill_period_ms as i64));
            for e in &l.schedule {
                rate.push_str(&format!(
                    ", when({}) {}",
                    e.cron,
                    describe_change(e.change())
                ));
            }
            if !l.schedule.is_empty() {
                rate.push_str(&format!(", tz {}", l.schedule_tz));
            }
            rate
        }
        (true, ms) => format!("quota: session({})", period(ms as i64)),
    }
}

pub(super) fn limit_rows(limits: &[proto::Limit]) -> String {
    let any_soft = limits.iter().any(|l| l.soft);
    let rows: Vec<Vec<String>> = limits
        .iter()
        .map(|l| {
            let mut row = vec![l.name.clone(), rate_text(l), l.capacity.to_string()];
            if any_soft {
                row.push(if l.soft { "yes" } else { "no" }.to_owned());
            }
            row
        })
        .collect();
    let headers: &[&str] = if any_soft {
        &["limit", "rate", "burst", "soft"]
    } else {
        &["limit", "rate", "burst"]
    };
    table(headers, &rows)
}
