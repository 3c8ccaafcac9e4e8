//! The administration rules: entities (a parent must exist, no entity is its own ancestor),
//! stored limits, the namespace registry, audit pages and usage. The gRPC layer only converts;
//! the CLI and tests may call this directly.
//!
//! Every call runs under the caller's deadline (a store that cannot answer in time is
//! `Unavailable`), and every change made here is seen at once by this daemon's decisions (its
//! look-up caches are cleared).

use tokio::time::Instant;

use crate::domain::ids::{EntityId, Namespace, ResourceId};
use crate::domain::limit::{Limit, LimitName};
use crate::domain::records::{
    Actor, Entity, FailurePolicy, Gate, LevelSettings, LimitScope, Period,
};
use crate::limiter::{Limiter, LimiterError, within};
use crate::store::{AuditPage, UsageCursor, UsagePage, UsageQuery};

pub use crate::domain::records::MAX_DEPTH;
pub use buckets::{ONCE_MS, Operated};

mod buckets;

/// Audit records per page when a caller asks for none.
const DEFAULT_PAGE: usize = 50;
/// The most audit records in a page.
const MAX_PAGE: u32 = 1_000;

/// Which usage snapshots: hourly or daily ones starting in a time range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageWindow {
    /// `None`: hourly and daily.
    pub period: Option<Period>,
    /// Snapshots starting at or after this (ms since the epoch); with `to_ms` 0 as well: the
    /// last 24 hours.
    pub from_ms: i64,
    /// Snapshots starting before this; 0: no end.
    pub to_ms: i64,
}

impl UsageWindow {
    /// `period` as callers spell it: `hour` or `hourly` (also empty), `day` or `daily`, `all`.
    ///
    /// # Errors
    /// `InvalidArgument` naming the field `period`.
    pub fn new(period: &str, from_ms: i64, to_ms: i64) -> Result<Self, LimiterError> {
        let period = match period {
            "" | "hour" | "hourly" => Some(Period::Hour),
            "day" | "daily" => Some(Period::Day),
            "all" => None,
            other => {
                return Err(LimiterError::invalid(
                    "period",
                    format!("{other:?} is not hour (hourly), day (daily) or all"),
                ));
            }
        };
        Ok(Self {
            period,
            from_ms,
            to_ms,
        })
    }

    /// The start times the window covers at `now`, as `from..to`.
    fn range(&self, now: i64) -> (i64, i64) {
        match (self.from_ms, self.to_ms) {
            (0, 0) => (now - 86_400_000, now + 1),
            (from, 0) => (from, i64::MAX),
            range => range,
        }
    }
}

/// Which snapshots a usage listing covers: an entity's (one resource or all), or one
/// resource's across entities.
#[derive(Debug, Clone)]
pub struct UsageOf {
    pub entity: Option<EntityId>,
    pub resource: Option<ResourceId>,
    pub window: UsageWindow,
    pub page_size: usize,
    pub page: Option<UsageCursor>,
}

/// The administration calls, over one limiter's store.
#[derive(Debug, Clone)]
pub struct Admin {
    limiter: Limiter,
}

/// Gates and cascade policies are set for an entity, a resource or both.
fn no_system_level(scope: &LimitScope) -> Result<(), LimiterError> {
    match scope {
        LimitScope::System => Err(LimiterError::invalid(
            "scope",
            "gates and cascade policies are set for an entity, a resource or both (there is no \
             system level)",
        )),
        _ => Ok(()),
    }
}

fn quoted(id: &EntityId) -> String {
    format!("{:?}", id.as_str())
}

/// Whether `token` has the form of an audit page token (a record's sort key: 20 digits of time,
/// `#`, 16 hex digits), so a garbage token is refused instead of read as "no more records".
pub fn valid_page_token(token: &str) -> bool {
    let Some((time, suffix)) = token.split_once('#') else {
        return false;
    };
    time.len() == 20
        && time.bytes().all(|b| b.is_ascii_digit())
        && suffix.len() == 16
        && suffix
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Admin {
    pub fn new(limiter: Limiter) -> Self {
        Self { limiter }
    }

    /// Creates an entity whose parent (if any) exists.
    ///
    /// # Errors
    /// `InvalidArgument` for an entity that is its own parent, `FailedPrecondition` for a
    /// missing parent, `AlreadyExists`, or the store's error.
    pub async fn create_entity(
        &self,
        ns: &Namespace,
        entity: &Entity,
        by: &Actor,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        if entity.parent.as_ref() == Some(&entity.id) {
            return Err(LimiterError::invalid(
                "entity.parent_id",
                "an entity cannot be its own parent",
            ));
        }
        within(deadline, async {
            if let Some(parent) = &entity.parent {
                self.require(ns, parent).await?;
            }
            Ok(self.store().create_entity(ns, entity, by).await?)
        })
        .await?;
        self.limiter.forget_lookups();
        Ok(())
    }

    /// # Errors
    /// `NotFound` when there is no such entity, or the store's error.
    pub async fn entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        deadline: Instant,
    ) -> Result<Entity, LimiterError> {
        within(deadline, async {
            Ok(self.store().get_entity(ns, id).await?)
        })
        .await?
        .ok_or_else(|| LimiterError::NotFound(format!("entity {} does not exist", quoted(id))))
    }

    /// Deletes an entity with its buckets and entity-level limits.
    ///
    /// # Errors
    /// `NotFound`, `FailedPrecondition` while it has children (unless `force`), or the store's.
    pub async fn delete_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        force: bool,
        by: &Actor,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        within(deadline, async {
            Ok(self.store().delete_entity(ns, id, force, by).await?)
        })
        .await?;
        self.limiter.forget_lookups();
        Ok(())
    }

    /// Gives an entity another parent (or none). The new parent must exist and must not be the
    /// entity itself or one of its descendants (that would make a cycle).
    ///
    /// # Errors
    /// `InvalidArgument` for the entity as its own parent; `FailedPrecondition` for a missing
    /// parent or a cycle (naming it); `NotFound`, or the store's error.
    pub async fn move_entity(
        &self,
        ns: &Namespace,
        id: &EntityId,
        parent: Option<&EntityId>,
        by: &Actor,
        deadline: Instant,
    ) -> Result<Entity, LimiterError> {
        if parent == Some(id) {
            return Err(LimiterError::invalid(
                "parent_id",
                "an entity cannot be its own parent",
            ));
        }
        let moved = within(deadline, async {
            if let Some(parent) = parent {
                self.refuse_cycle(ns, id, parent).await?;
            }
            Ok(self.store().move_entity(ns, id, parent, by).await?)
        })
        .await?;
        self.limiter.forget_lookups();
        Ok(moved)
    }

    /// Walks up from `parent`: reaching `id` means the move would close a cycle.
    async fn refuse_cycle(
        &self,
        ns: &Namespace,
        id: &EntityId,
        parent: &EntityId,
    ) -> Result<(), LimiterError> {
        let mut chain = vec![id.clone(), parent.clone()];
        let mut current = self.require(ns, parent).await?;
        while let Some(up) = current.parent {
            chain.push(up.clone());
            if up == *id {
                let path: Vec<&str> = chain.iter().map(EntityId::as_str).collect();
                return Err(LimiterError::FailedPrecondition(format!(
                    "moving {} under {} would make a cycle: {}",
                    quoted(id),
                    quoted(parent),
                    path.join(" -> ")
                )));
            }
            if chain.len() > MAX_DEPTH {
                return Err(LimiterError::FailedPrecondition(format!(
                    "moving {} under {} would make a hierarchy deeper than {MAX_DEPTH}",
                    quoted(id),
                    quoted(parent)
                )));
            }
            match self.store().get_entity(ns, &up).await? {
                Some(e) => current = e,
                None => break,
            }
        }
        Ok(())
    }

    /// The entity `id`, which must exist to be a parent.
    async fn require(&self, ns: &Namespace, id: &EntityId) -> Result<Entity, LimiterError> {
        self.store().get_entity(ns, id).await?.ok_or_else(|| {
            LimiterError::FailedPrecondition(format!("parent {} does not exist", quoted(id)))
        })
    }

    /// # Errors
    /// The store's error.
    pub async fn children(
        &self,
        ns: &Namespace,
        id: &EntityId,
        deadline: Instant,
    ) -> Result<Vec<Entity>, LimiterError> {
        within(deadline, async {
            Ok(self.store().list_children(ns, id).await?)
        })
        .await
    }

    /// Replaces the limits stored at `scope`.
    ///
    /// # Errors
    /// `InvalidArgument` for an empty set, or the store's error.
    pub async fn set_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        limits: &[Limit],
        by: &Actor,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        if limits.is_empty() {
            return Err(LimiterError::invalid("limits", "is empty"));
        }
        within(deadline, async {
            Ok(self.store().set_limits(ns, scope, limits, by).await?)
        })
        .await?;
        self.limiter.forget_lookups();
        Ok(())
    }

    /// The limits stored at `scope` (empty when none).
    ///
    /// # Errors
    /// The store's error.
    pub async fn limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        deadline: Instant,
    ) -> Result<Vec<Limit>, LimiterError> {
        within(deadline, async {
            Ok(self
                .store()
                .get_limits(ns, scope)
                .await?
                .unwrap_or_default())
        })
        .await
    }

    /// Entities with limits stored for `resource`, a page at a time (`page_size` 0: 50; at most
    /// 1,000), after the id `page`; with the id to pass for the next page, if any.
    ///
    /// # Errors
    /// `InvalidArgument` for a page that is no entity id, or the store's error.
    pub async fn entities_with_limits(
        &self,
        ns: &Namespace,
        resource: &ResourceId,
        page_size: u32,
        page: &str,
        deadline: Instant,
    ) -> Result<(Vec<EntityId>, Option<EntityId>), LimiterError> {
        let page_size = match page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE) as usize,
        };
        let after = (!page.is_empty())
            .then(|| EntityId::new(page).map_err(|e| LimiterError::invalid("page", e)))
            .transpose()?;
        within(deadline, async {
            let store = self.store();
            Ok(store
                .list_entities_with_limits(ns, resource, page_size, after.as_ref())
                .await?)
        })
        .await
    }

    /// One limit's capacity and what is available of it now, per entity with a bucket on
    /// `resource` that has the limit (`parents_only`: only entities that have children), in id
    /// order, milli-tokens.
    ///
    /// # Errors
    /// The store's error.
    pub async fn resource_capacity(
        &self,
        ns: &Namespace,
        resource: &ResourceId,
        limit: &LimitName,
        parents_only: bool,
        deadline: Instant,
    ) -> Result<Vec<(EntityId, i64, i64)>, LimiterError> {
        let now = self.limiter.now_ms();
        within(deadline, async {
            let buckets = self.store().resource_buckets(ns, resource).await?;
            let mut found = Vec::with_capacity(buckets.len());
            for (entity, bucket) in buckets {
                let Some(state) = bucket.at(now).limit(limit).cloned() else {
                    continue;
                };
                if parents_only && self.store().list_children(ns, &entity).await?.is_empty() {
                    continue;
                }
                found.push((entity, state.limit.capacity_at(now), state.balance));
            }
            Ok(found)
        })
        .await
    }

    /// Resources with default limits stored, in order.
    ///
    /// # Errors
    /// The store's error.
    pub async fn resources_with_defaults(
        &self,
        ns: &Namespace,
        deadline: Instant,
    ) -> Result<Vec<ResourceId>, LimiterError> {
        within(deadline, async {
            Ok(self.store().list_resources_with_defaults(ns).await?)
        })
        .await
    }

    /// # Errors
    /// `NotFound` when nothing is stored at `scope`, or the store's error.
    pub async fn delete_limits(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        by: &Actor,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        within(deadline, async {
            Ok(self.store().delete_limits(ns, scope, by).await?)
        })
        .await?;
        self.limiter.forget_lookups();
        Ok(())
    }

    /// Sets the gate at `scope` (`None`: clears it); every acquire this daemon decides from now on
    /// sees it.
    ///
    /// # Errors
    /// `InvalidArgument` for the system scope (gates are per entity and resource), `NotFound`
    /// when clearing a gate that is not set, or the store's error.
    pub async fn set_gate(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        gate: Option<Gate>,
        by: &Actor,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        no_system_level(scope)?;
        within(deadline, async {
            Ok(self.store().set_gate(ns, scope, gate, by).await?)
        })
        .await?;
        self.limiter.forget_lookups();
        Ok(())
    }

    /// Sets whether an acquire at `scope` charges the entity's cascade parent too (`None`:
    /// clears it; the next level decides, then the entity's own flag); every acquire this daemon
    /// decides from now on sees it, other daemons within `limits_cache_ms`.
    ///
    /// # Errors
    /// As [`Admin::set_gate`].
    pub async fn set_cascade(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        cascade: Option<bool>,
        by: &Actor,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        no_system_level(scope)?;
        within(deadline, async {
            Ok(self.store().set_cascade(ns, scope, cascade, by).await?)
        })
        .await?;
        self.limiter.forget_lookups();
        Ok(())
    }

    /// The gate and cascade policy set at `scope` (each `None` when not set).
    ///
    /// # Errors
    /// As [`Admin::set_gate`].
    pub async fn level(
        &self,
        ns: &Namespace,
        scope: &LimitScope,
        deadline: Instant,
    ) -> Result<LevelSettings, LimiterError> {
        no_system_level(scope)?;
        within(deadline, async {
            let levels = self
                .store()
                .get_level_settings(ns, std::slice::from_ref(scope))
                .await?;
            Ok(levels.into_iter().next().unwrap_or_default())
        })
        .await
    }

    /// Stores the namespace's failure policy (`None`: removes it), for acquires that give none.
    ///
    /// # Errors
    /// `NotFound` when removing one that is not stored, or the store's error.
    pub async fn set_failure_policy(
        &self,
        ns: &Namespace,
        policy: Option<FailurePolicy>,
        by: &Actor,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        within(deadline, async {
            Ok(self.store().set_failure_policy(ns, policy, by).await?)
        })
        .await?;
        self.limiter.failure_policy_changed(ns, policy);
        Ok(())
    }

    /// The namespace's stored failure policy (`None`: the daemon's applies).
    ///
    /// # Errors
    /// The store's error.
    pub async fn failure_policy(
        &self,
        ns: &Namespace,
        deadline: Instant,
    ) -> Result<Option<FailurePolicy>, LimiterError> {
        within(deadline, async {
            Ok(self.store().get_failure_policy(ns).await?)
        })
        .await
    }

    /// One page of audit records of `subject`, newest first: `page_size` of them (0: 50; at
    /// most 1,000); `page` (empty: the first) continues a previous page.
    ///
    /// # Errors
    /// `InvalidArgument` for an empty subject or a malformed page token, or the store's error.
    pub async fn audit(
        &self,
        ns: &Namespace,
        subject: &str,
        page_size: u32,
        page: &str,
        deadline: Instant,
    ) -> Result<AuditPage, LimiterError> {
        let page_size = match page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE) as usize,
        };
        let page = (!page.is_empty()).then_some(page);
        if subject.is_empty() {
            return Err(LimiterError::invalid("subject", "is empty"));
        }
        if let Some(token) = page
            && !valid_page_token(token)
        {
            return Err(LimiterError::invalid(
                "page",
                format!("{token:?} is not a page token (pass the next_page of a previous answer)"),
            ));
        }
        within(deadline, async {
            Ok(self
                .store()
                .list_audit(ns, subject, page_size, page)
                .await?)
        })
        .await
    }

    /// # Errors
    /// The store's error.
    pub async fn create_namespace(
        &self,
        ns: &Namespace,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        within(deadline, async {
            Ok(self.store().create_namespace(ns).await?)
        })
        .await?;
        self.limiter.forget_lookups();
        Ok(())
    }

    /// Every namespace this daemon accepts now: the configured ones and, when the
    /// configuration admits them (`"*"`), the registered ones.
    ///
    /// # Errors
    /// The store's error.
    pub async fn namespaces(&self, deadline: Instant) -> Result<Vec<Namespace>, LimiterError> {
        let settings = self.limiter.settings();
        let mut usable = settings.namespaces.clone();
        if settings.registered {
            let registered = within(deadline, async {
                Ok(self.store().list_namespaces().await?)
            })
            .await?;
            for ns in registered {
                if !usable.contains(&ns) {
                    usable.push(ns);
                }
            }
        }
        Ok(usable)
    }

    /// # Errors
    /// `NotFound` for a namespace not registered, or the store's error.
    pub async fn delete_namespace(
        &self,
        ns: &Namespace,
        deadline: Instant,
    ) -> Result<(), LimiterError> {
        within(deadline, async {
            Ok(self.store().delete_namespace(ns).await?)
        })
        .await?;
        self.limiter.forget_lookups();
        Ok(())
    }

    /// A page of usage snapshots (see [`UsageOf`]).
    ///
    /// # Errors
    /// The store's error.
    pub async fn usage(
        &self,
        ns: &Namespace,
        of: &UsageOf,
        deadline: Instant,
    ) -> Result<UsagePage, LimiterError> {
        if of.entity.is_none() && of.resource.is_none() {
            return Err(LimiterError::invalid(
                "entity_id",
                "give an entity, a resource, or both",
            ));
        }
        let (from_ms, to_ms) = of.window.range(self.limiter.now_ms());
        let query = UsageQuery {
            entity: of.entity.as_ref(),
            resource: of.resource.as_ref(),
            period: of.window.period,
            from_ms,
            to_ms,
            page_size: of.page_size,
            page: of.page.as_ref(),
        };
        within(deadline, async {
            Ok(self.store().usage(ns, &query).await?)
        })
        .await
    }

    fn store(&self) -> &dyn crate::store::Store {
        &**self.limiter.store()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_windows_take_the_librarys_spelling_and_default_to_the_last_day() {
        let hourly = UsageWindow::new("hourly", 0, 0).unwrap();
        assert_eq!(hourly, UsageWindow::new("hour", 0, 0).unwrap());
        assert_eq!(
            UsageWindow::new("", 0, 0).unwrap().period,
            Some(Period::Hour)
        );
        assert_eq!(
            UsageWindow::new("daily", 0, 0).unwrap().period,
            Some(Period::Day)
        );
        assert_eq!(UsageWindow::new("all", 0, 0).unwrap().period, None);
        assert!(matches!(
            UsageWindow::new("weekly", 0, 0),
            Err(LimiterError::InvalidArgument { ref field, .. }) if field == "period"
        ));
        assert_eq!(
            hourly.range(100_000_000),
            (100_000_000 - 86_400_000, 100_000_001)
        );
        let from = UsageWindow::new("day", 5, 0).unwrap();
        assert_eq!(from.range(100_000_000), (5, i64::MAX));
        assert_eq!(UsageWindow::new("day", 5, 9).unwrap().range(0), (5, 9));
    }

    #[test]
    fn page_tokens_have_the_form_of_a_sort_key() {
        let real = crate::store::audit_sort_key(1_700_000_000_000);
        assert!(valid_page_token(&real), "{real}");
        for bad in [
            "",
            "garbage",
            "00000000000000000001#zz",
            "1#0123456789abcdef",
        ] {
            assert!(!valid_page_token(bad), "{bad}");
        }
    }
}
