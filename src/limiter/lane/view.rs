//! A lane's view of its buckets: per bucket, the state the store last confirmed and what queued
//! acquires reserve of it; and the refusal decided on it at zero store cost.
//!
//! Other daemons can only lower a balance (except by refunds and raised limits, which the
//! staleness bound covers), so a confirmed state refilled to now, less what is reserved, is an
//! upper bound on the truth: a request it cannot cover is refused at once, with the exact
//! retry-after, and the store sees nothing.

use std::collections::{BTreeMap, HashMap};

use super::Ctx;
use crate::domain::amounts::Amounts;
use crate::domain::batch::{Ask, Request, refusal};
use crate::domain::bucket::{Bucket, Rejection};
use crate::domain::ids::EntityId;
use crate::domain::limit::{Limit, LimitName};
use crate::limiter::messages::AcquireJob;

/// A bucket's state as the store last confirmed it.
pub(super) struct Cached {
    /// `None`: the store has no such bucket.
    pub bucket: Option<Bucket>,
    pub at_ms: i64,
    /// Just read, or returned by a lost race: one round may decide on it whatever its age.
    pub from_store: bool,
}

/// Milli-tokens that queued acquires hold of a bucket (wider than `i64`: a long queue of large
/// requests must not wrap it).
type Reserved = BTreeMap<LimitName, i128>;

#[derive(Default)]
struct Item {
    cache: Option<Cached>,
    reserved: Reserved,
}

#[derive(Default)]
pub(super) struct View {
    items: HashMap<EntityId, Item>,
}

impl View {
    /// Starts from a state an earlier actor of the group confirmed at `at_ms`.
    pub fn restore(&mut self, entity: EntityId, bucket: Option<Bucket>, at_ms: i64) {
        self.confirm(entity, bucket, at_ms, false);
    }

    /// The cached buckets, with the time each was confirmed.
    pub fn cached(&self) -> impl Iterator<Item = (&EntityId, Option<&Bucket>, i64)> {
        self.items
            .iter()
            .filter_map(|(e, i)| i.cache.as_ref().map(|c| (e, c.bucket.as_ref(), c.at_ms)))
    }

    /// The confirmed state of a bucket, if it is cached.
    pub fn get(&self, entity: &EntityId) -> Option<&Cached> {
        self.items.get(entity).and_then(|i| i.cache.as_ref())
    }

    /// The store confirmed `bucket` at `at_ms` (`from_store`: read, or returned by a lost race).
    pub fn confirm(
        &mut self,
        entity: EntityId,
        bucket: Option<Bucket>,
        at_ms: i64,
        from_store: bool,
    ) {
        self.items.entry(entity).or_default().cache = Some(Cached {
            bucket,
            at_ms,
            from_store,
        });
    }

    /// Forgets what the store confirmed of a bucket (a write of unknown outcome touched it).
    pub fn forget(&mut self, entity: &EntityId) {
        if let Some(item) = self.items.get_mut(entity) {
            item.cache = None;
        }
    }

    /// A round decided on these states: later rounds go by their age.
    pub fn used(&mut self, entities: &[EntityId]) {
        for e in entities {
            if let Some(cache) = self.items.get_mut(e).and_then(|i| i.cache.as_mut()) {
                cache.from_store = false;
            }
        }
    }

    /// Whether the bucket's state is cached at all, however old.
    pub fn seen(&self, entity: &EntityId) -> bool {
        self.get(entity).is_some()
    }

    /// Whether the cached state may refuse: just read, or younger than the staleness bound.
    pub fn fresh(&self, entity: &EntityId, ctx: &Ctx<'_>) -> bool {
        self.get(entity)
            .is_some_and(|c| c.from_store || ctx.now - c.at_ms <= ctx.settings.max_staleness_ms)
    }

    /// A queued acquire holds its shares of its buckets until it is decided.
    pub fn reserve(&mut self, job: &AcquireJob) {
        self.hold(job, 1);
    }

    /// The acquire is decided (admitted, refused or failed): its shares are free again.
    pub fn release(&mut self, job: &AcquireJob) {
        self.hold(job, -1);
    }

    fn hold(&mut self, job: &AcquireJob, sign: i128) {
        for (entity, _, share) in job.charged() {
            let item = self.items.entry(entity.clone()).or_default();
            hold(&mut item.reserved, share, sign);
        }
    }

    /// The refusal the cache decides, with the cascade parent that refused: each bucket as it
    /// stands now less what is reserved of it, when its state is fresh; taken as full otherwise,
    /// so that only a request that can never fit is refused.
    pub fn refusal<'a>(
        &self,
        job: &'a AcquireJob,
        ctx: &Ctx<'_>,
    ) -> Option<(Rejection, Option<EntityId>)> {
        let state = |entity: &EntityId, limits: &[Limit]| {
            let item = self.items.get(entity)?;
            let cache = item.cache.as_ref()?;
            if !self.fresh(entity, ctx) {
                return None;
            }
            projected(cache, limits, &item.reserved, ctx.now)
        };
        let mut states = Vec::with_capacity(2);
        let mut ask = |entity: &EntityId, limits: &'a [Limit], amounts: &'a Amounts| {
            states.push(state(entity, limits));
            Ask {
                item: states.len() - 1,
                limits,
                amounts,
            }
        };
        let own = (!job.bypass).then(|| ask(&job.entity, &job.limits, &job.own));
        let parent = job
            .parent
            .as_ref()
            .map(|p| ask(&p.entity, &p.limits, &job.parent_share));
        let request = Request { own, parent };
        let (rejection, by_parent) = refusal(&states, &request, ctx.now)?;
        let refused_by = by_parent.then(|| job.parent.as_ref().map(|p| p.entity.clone()));
        Some((rejection, refused_by.flatten()))
    }
}

fn hold(r: &mut Reserved, amounts: &Amounts, sign: i128) {
    for (name, a) in amounts.iter() {
        let delta = sign * i128::from(a);
        match r.get_mut(name) {
            Some(total) => {
                *total += delta;
                if *total == 0 {
                    r.remove(name);
                }
            }
            None if delta != 0 => {
                r.insert(name.clone(), delta);
            }
            None => {}
        }
    }
}

/// The bucket as it stands at `now` less what is reserved of it (`None`: it would be cached
/// under another limit set, so the cache says nothing about this request).
fn projected(cache: &Cached, limits: &[Limit], reserved: &Reserved, now: i64) -> Option<Bucket> {
    let mut b = match &cache.bucket {
        Some(b)
            if b.limits.len() == limits.len()
                && b.limits.iter().zip(limits).all(|(s, l)| s.limit == *l) =>
        {
            b.at(now)
        }
        Some(_) => return None,
        None => Bucket::full(limits.to_vec(), now),
    };
    for l in &mut b.limits {
        let held = reserved.get(l.limit.name()).copied().unwrap_or(0);
        l.balance = (i128::from(l.balance) - held).max(i128::from(i64::MIN / 2)) as i64;
    }
    Some(b)
}
