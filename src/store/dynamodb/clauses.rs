//! What a write checks and changes, and the one builder of each kind of write.
//!
//! A bucket [`Change`] becomes [`Clauses::change`]: the same conditions as
//! [`crate::domain::bucket::Bucket::apply`], one per attribute, rendered as an update expression
//! ([`Expr::change`], for `UpdateItem` and transactions) or as a PartiQL statement (the batch
//! writer). Every put and every update of the store is built by [`put`] and [`update`], and sent
//! alone or inside a transaction as built.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{
    AttributeValue, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem, Update,
};

use super::keys::{
    CONFIG, Item, REFILLED_AT, balance_attr, carry_attr, consumed_attr, n, s, topped_up_attr,
};
use super::schema::PK;
use crate::domain::bucket::{Change, LimitChange};
use crate::domain::limit::encode;
use crate::store::StoreError;

/// An update expression with its placeholders, built clause by clause.
#[derive(Default)]
pub(super) struct Expr {
    pub names: HashMap<String, String>,
    pub values: HashMap<String, AttributeValue>,
    pub conditions: Vec<String>,
    pub set: Vec<String>,
    pub add: Vec<String>,
    pub remove: Vec<String>,
}

impl Expr {
    pub fn name(&mut self, attr: &str) -> String {
        let key = format!("#a{}", self.names.len());
        self.names.insert(key.clone(), attr.to_owned());
        key
    }

    pub fn value(&mut self, v: AttributeValue) -> String {
        let key = format!(":v{}", self.values.len());
        self.values.insert(key.clone(), v);
        key
    }

    fn update_expression(&self) -> String {
        let mut parts = Vec::new();
        for (verb, clauses) in [
            ("SET", &self.set),
            ("ADD", &self.add),
            ("REMOVE", &self.remove),
        ] {
            if !clauses.is_empty() {
                parts.push(format!("{verb} {}", clauses.join(", ")));
            }
        }
        parts.join(" ")
    }

    fn condition_expression(&self) -> Option<String> {
        (!self.conditions.is_empty()).then(|| self.conditions.join(" AND "))
    }

    /// The update expression for a change's clauses.
    pub fn change(change: &Change, mark_attr: &str) -> Self {
        let mut e = Self::default();
        for c in Clauses::change(change, mark_attr) {
            match c {
                Clause::Compare(attr, op, v) => {
                    let (a, v) = (e.name(&attr), e.value(v));
                    e.conditions.push(format!("{a} {op} {v}"));
                }
                Clause::Missing(attr) => {
                    let a = e.name(&attr);
                    e.conditions.push(format!("attribute_not_exists({a})"));
                }
                Clause::Set(attr, v) => {
                    let (a, v) = (e.name(&attr), e.value(v));
                    e.set.push(format!("{a} = {v}"));
                }
                Clause::Add(attr, v) => {
                    let (a, v) = (e.name(&attr), e.value(v));
                    e.add.push(format!("{a} {v}"));
                }
                Clause::Remove(attr) => {
                    let a = e.name(&attr);
                    e.remove.push(a);
                }
            }
        }
        e
    }
}

/// One condition or update of a bucket write, on one attribute.
pub(super) enum Clause {
    /// The attribute compared (`=`, `>=` or `<=`, the same in both renderings) with a value.
    Compare(String, &'static str, AttributeValue),
    Missing(String),
    Set(String, AttributeValue),
    /// Adds a number to an attribute that exists.
    Add(String, AttributeValue),
    Remove(String),
}

pub(super) struct Clauses;

impl Clauses {
    /// What a [`Change`] checks and writes: the same conditions as `Bucket::apply`, rendered as
    /// an update expression ([`Expr::change`]) or as a PartiQL statement (`batch`).
    pub fn change(change: &Change, mark_attr: &str) -> Vec<Clause> {
        let mut out = Vec::new();
        let seen = s(change.seen_config.clone());
        out.push(Clause::Compare(CONFIG.into(), "=", seen.clone()));
        if let Some(mark) = change.mark {
            out.push(match mark.from {
                Some(from) => Clause::Compare(mark_attr.into(), "=", n(from)),
                None => Clause::Missing(mark_attr.into()),
            });
            out.push(Clause::Set(mark_attr.into(), n(mark.to)));
        }
        if let Some(refill) = &change.refill {
            out.push(Clause::Compare(
                REFILLED_AT.into(),
                "=",
                n(refill.seen_refilled_at),
            ));
            out.push(Clause::Set(REFILLED_AT.into(), n(refill.refilled_at)));
            out.push(Clause::Set(CONFIG.into(), s(encode(&refill.limits))));
            for name in &refill.removed {
                for attr in [
                    balance_attr(name),
                    carry_attr(name),
                    consumed_attr(name),
                    topped_up_attr(name),
                ] {
                    out.push(Clause::Remove(attr));
                }
            }
        } else if change.is_noop() || (change.limits.is_empty() && change.mark.is_none()) {
            // Nothing to add: rewrite the configuration with itself so the write still checks.
            out.push(Clause::Set(CONFIG.into(), seen));
        }
        for c in &change.limits {
            match c {
                LimitChange::Update {
                    name,
                    delta,
                    consumed,
                    min_balance,
                    max_balance,
                    carry,
                    topped_up,
                } => {
                    let b = balance_attr(name);
                    out.push(Clause::Compare(b.clone(), ">=", n(*min_balance)));
                    if let Some(max) = max_balance {
                        out.push(Clause::Compare(b.clone(), "<=", n(*max)));
                    }
                    if *delta != 0 {
                        out.push(Clause::Add(b, n(*delta)));
                    }
                    if *consumed != 0 {
                        out.push(Clause::Add(consumed_attr(name), n(*consumed)));
                    }
                    if let Some(carry) = carry {
                        out.push(Clause::Set(carry_attr(name), n(*carry)));
                    }
                    match topped_up {
                        Some(0) => out.push(Clause::Remove(topped_up_attr(name))),
                        Some(t) => out.push(Clause::Set(topped_up_attr(name), n(*t))),
                        None => {}
                    }
                }
                LimitChange::Insert(state) => {
                    let name = state.limit.name();
                    out.push(Clause::Set(balance_attr(name), n(state.balance)));
                    out.push(Clause::Set(carry_attr(name), n(state.carry)));
                    out.push(Clause::Set(consumed_attr(name), n(state.consumed)));
                    if state.topped_up != 0 {
                        out.push(Clause::Set(topped_up_attr(name), n(state.topped_up)));
                    }
                }
            }
        }
        out
    }
}

/// What a put requires of the item it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Existing {
    /// None may exist (a create).
    Absent,
    /// It must exist (a replacement of something known).
    Present,
    /// Anything (an overwrite).
    Any,
}

fn maybe<T>(map: HashMap<String, T>) -> Option<HashMap<String, T>> {
    (!map.is_empty()).then_some(map)
}

fn built(e: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The one builder of a put: `item`, under the condition `existing`; a failed condition returns
/// the item as stored.
pub(super) fn put(table: &str, item: Item, existing: Existing) -> Result<Put, StoreError> {
    let condition = match existing {
        Existing::Absent => Some("attribute_not_exists(#pk)"),
        Existing::Present => Some("attribute_exists(#pk)"),
        Existing::Any => None,
    };
    Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .set_condition_expression(condition.map(str::to_owned))
        .set_expression_attribute_names(
            condition.map(|_| HashMap::from([("#pk".into(), PK.into())])),
        )
        .set_return_values_on_condition_check_failure(
            condition.map(|_| ReturnValuesOnConditionCheckFailure::AllOld),
        )
        .build()
        .map_err(built)
}

/// The one builder of an update: `e` on the item at `key`; a failed condition returns the item
/// as stored.
pub(super) fn update(table: &str, key: Item, e: Expr) -> Result<Update, StoreError> {
    let update_expression = e.update_expression();
    let condition = e.condition_expression();
    let on_failure = condition
        .as_ref()
        .map(|_| ReturnValuesOnConditionCheckFailure::AllOld);
    Update::builder()
        .table_name(table)
        .set_key(Some(key))
        .update_expression(update_expression)
        .set_condition_expression(condition)
        .set_expression_attribute_names(maybe(e.names))
        .set_expression_attribute_values(maybe(e.values))
        .set_return_values_on_condition_check_failure(on_failure)
        .build()
        .map_err(built)
}

/// A put or an update as one action of a transaction.
pub(super) fn action(write: Action) -> TransactWriteItem {
    match write {
        Action::Put(p) => TransactWriteItem::builder().put(p).build(),
        Action::Update(u) => TransactWriteItem::builder().update(u).build(),
    }
}

/// A built write.
pub(super) enum Action {
    Put(Put),
    Update(Update),
}
