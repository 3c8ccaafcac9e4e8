//! The lane alone, with explicit times and a store simulated by the reference semantics of a
//! write ([`Bucket::apply`]): what a round starts, whom it answers, what it owes.

use std::time::Duration;

use super::*;
use crate::domain::amounts::Amounts;
use crate::domain::bucket::Rejection;
use crate::domain::ids::ResourceId;
use crate::domain::limit::{Limit, LimitName, MILLI};
use crate::limiter::messages::{Answer, ParentSpec, Resolution, reply};

const T0: i64 = 1_700_000_000_000;

fn id(s: &str) -> EntityId {
    EntityId::new(s).unwrap()
}

fn tokens(name: &str, n: i64) -> Amounts {
    Amounts::new([(LimitName::new(name).unwrap(), n * MILLI)]).unwrap()
}

fn rpm(capacity: u64) -> Vec<Limit> {
    vec![Limit::per_minute("rpm", capacity).unwrap()]
}

fn job(entity: &str, limits: &[Limit], take: i64) -> (AcquireJob, Answer<Decision>) {
    let amounts = tokens("rpm", take);
    let (reply, answer) = reply();
    let job = AcquireJob {
        entity: id(entity),
        resource: ResourceId::new("model").unwrap(),
        limits: limits.to_vec(),
        own: amounts.clone(),
        amounts,
        parent: None,
        parent_share: Amounts::default(),
        bypass: false,
        deadline: tokio::time::Instant::now() + Duration::from_secs(600),
        lease: None,
        reply,
        ticket: None,
        races: 0,
        span: None,
    };
    (job, answer)
}

/// A cascading child's job: `take` of `rpm` from the child and from its parent.
fn child_job(child: &str, parent: &str, limits: &[Limit], take: i64) -> AcquireJob {
    let (mut j, _) = job(child, limits, take);
    j.parent = Some(ParentSpec {
        entity: id(parent),
        limits: limits.to_vec(),
    });
    j.parent_share = j.own.clone();
    j
}

struct Store {
    buckets: std::collections::HashMap<EntityId, Bucket>,
}

impl Store {
    fn new() -> Self {
        Self {
            buckets: Default::default(),
        }
    }

    /// Applies a write as the stores do: `Ok` with the stored bucket, or the conflict.
    fn apply(&mut self, entity: &EntityId, write: &Write) -> Result<Bucket, StoreError> {
        let conflict = |current: Option<&Bucket>| StoreError::Conflict {
            index: 0,
            current: current.cloned().map(Box::new),
        };
        match (write, self.buckets.get_mut(entity)) {
            (Write::Create(b), None) => {
                self.buckets.insert(entity.clone(), b.clone());
                Ok(b.clone())
            }
            (Write::Create(_), Some(current)) => Err(conflict(Some(current))),
            (Write::Change(c), Some(current)) => match current.apply(c) {
                Ok(()) => Ok(current.clone()),
                Err(_) => Err(conflict(Some(current))),
            },
            (Write::Change(_), None) => Err(conflict(None)),
        }
    }

    fn balance(&self, entity: &str) -> i64 {
        self.buckets[&id(entity)].limits[0].balance
    }
}

fn settings() -> LimiterSettings {
    LimiterSettings::default()
}

fn ctx(settings: &LimiterSettings, now: i64) -> Ctx<'_> {
    Ctx { settings, now }
}

/// The one write of a round, applied to `store`.
fn land(io: Option<Io>, store: &mut Store) -> Result<Option<Bucket>, StoreError> {
    let Some(Io::Write(writes)) = io else {
        panic!("expected a write, got {io:?}");
    };
    let mut last = None;
    for (entity, write) in &writes {
        last = Some(store.apply(entity, write)?);
    }
    Ok(if writes.len() == 1 { last } else { None })
}

fn admitted(events: Vec<Event>) -> Vec<AcquireJob> {
    events
        .into_iter()
        .filter_map(|e| match e {
            Event::Admitted(job, _) => Some(job),
            _ => None,
        })
        .collect()
}

fn rejection(answer: &mut Answer<Decision>) -> Rejection {
    match answer.try_recv() {
        Ok(Ok(Decision::Rejected { rejection, .. })) => rejection,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_new_bucket_is_read_then_created_and_the_admission_comes_out_as_an_event() {
    let s = settings();
    let mut store = Store::new();
    let mut lane = Lane::default();
    let (j, mut answer) = job("e", &rpm(10), 3);
    lane.acquire(j, &ctx(&s, T0));
    assert!(
        matches!(lane.round(&ctx(&s, T0)), Some(Io::Load(ref e)) if e == &[id("e")]),
        "a bucket never seen is read first"
    );
    lane.loaded(Ok(vec![(id("e"), None)]), &ctx(&s, T0));
    let stored = land(lane.round(&ctx(&s, T0)), &mut store);
    assert!(answer.try_recv().is_err(), "not answered before the write");
    lane.written(stored, &ctx(&s, T0));
    let events = lane.take_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Used(u) if u == &[(id("e"), tokens("rpm", 3))])),
        "the consumption is usage"
    );
    let jobs = admitted(events);
    assert_eq!(jobs.len(), 1, "the group answers it");
    assert_eq!(store.balance("e"), 7 * MILLI);
    assert!(lane.is_idle());
}

#[test]
fn the_cache_refuses_at_no_store_cost_until_it_is_stale() {
    let s = settings();
    let mut store = Store::new();
    let mut lane = Lane::default();
    let (j, _) = job("e", &rpm(10), 10);
    lane.acquire(j, &ctx(&s, T0));
    lane.round(&ctx(&s, T0));
    lane.loaded(Ok(vec![(id("e"), None)]), &ctx(&s, T0));
    let stored = land(lane.round(&ctx(&s, T0)), &mut store);
    lane.written(stored, &ctx(&s, T0));
    lane.take_events();
    // Empty now: a request within the staleness bound is refused on the spot, with the wait.
    let (j, mut answer) = job("e", &rpm(10), 1);
    lane.acquire(j, &ctx(&s, T0 + 600));
    let r = rejection(&mut answer);
    assert_eq!(
        r.retry_after_ms(),
        Some(5_400),
        "a token each 6 s, 0.6 s passed"
    );
    assert!(lane.round(&ctx(&s, T0 + 600)).is_none(), "no store call");
    // Past the staleness bound, a refusal reads first (a refund elsewhere would be missed).
    let late = T0 + s.max_staleness_ms + 1;
    let (j, _) = job("e", &rpm(10), 5);
    lane.acquire(j, &ctx(&s, late));
    assert!(matches!(lane.round(&ctx(&s, late)), Some(Io::Load(_))));
}

#[test]
fn a_request_above_the_capacity_is_refused_without_anything_cached() {
    let s = settings();
    let mut lane = Lane::default();
    let (j, mut answer) = job("e", &rpm(10), 11);
    lane.acquire(j, &ctx(&s, T0));
    assert_eq!(rejection(&mut answer).retry_after_ms(), None, "never fits");
    assert!(lane.round(&ctx(&s, T0)).is_none());
}

#[test]
fn the_parent_refuses_after_the_child_admits_and_says_so() {
    let s = settings();
    let mut lane = Lane::default();
    lane.restore(id("child"), None, T0);
    let mut parent = Bucket::full(rpm(10), T0);
    parent.limits[0].balance = 0;
    lane.restore(id("parent"), Some(parent), T0);
    let mut j = child_job("child", "parent", &rpm(10), 1);
    let (reply, mut answer) = reply();
    j.reply = reply;
    lane.acquire(j, &ctx(&s, T0));
    match answer.try_recv() {
        Ok(Ok(Decision::Rejected { refused_by, .. })) => {
            assert_eq!(refused_by, Some(id("parent")));
        }
        other => panic!("expected the parent's refusal, got {other:?}"),
    }
}

#[test]
fn acquires_queued_behind_a_write_go_out_together_in_the_next() {
    let s = settings();
    let mut store = Store::new();
    let mut lane = Lane::default();
    lane.restore(id("e"), None, T0);
    let (first, _) = job("e", &rpm(100), 1);
    lane.acquire(first, &ctx(&s, T0));
    let in_flight = lane.round(&ctx(&s, T0));
    for _ in 0..5 {
        let (j, _) = job("e", &rpm(100), 2);
        lane.acquire(j, &ctx(&s, T0));
        assert!(
            lane.round(&ctx(&s, T0)).is_none(),
            "one store call at a time"
        );
    }
    let stored = land(in_flight, &mut store);
    lane.written(stored, &ctx(&s, T0));
    assert_eq!(admitted(lane.take_events()).len(), 1);
    let stored = land(lane.round(&ctx(&s, T0)), &mut store);
    lane.written(stored, &ctx(&s, T0));
    assert_eq!(
        admitted(lane.take_events()).len(),
        5,
        "one write for the five"
    );
    assert_eq!(store.balance("e"), 89 * MILLI);
}

#[test]
fn a_lost_race_is_decided_again_on_the_returned_item_without_a_read() {
    let s = settings();
    let mut store = Store::new();
    let mut lane = Lane::default();
    lane.restore(id("e"), None, T0);
    let (j, mut answer) = job("e", &rpm(10), 4);
    lane.acquire(j, &ctx(&s, T0));
    let ours = lane.round(&ctx(&s, T0));
    // Another daemon created the bucket and took 8 first.
    let mut theirs = Bucket::full(rpm(10), T0);
    theirs.limits[0].balance = 2 * MILLI;
    store.buckets.insert(id("e"), theirs);
    let lost = land(ours, &mut store);
    assert!(matches!(lost, Err(StoreError::Conflict { .. })));
    lane.written(lost, &ctx(&s, T0));
    assert!(admitted(lane.take_events()).is_empty());
    // 4 no longer fits the 2 left: refused on the item the race returned, with no read.
    assert!(
        lane.round(&ctx(&s, T0)).is_none(),
        "no read, nothing to write"
    );
    assert_eq!(rejection(&mut answer).statuses[0].available, 2 * MILLI);
    let (j, _) = job("e", &rpm(10), 2);
    lane.acquire(j, &ctx(&s, T0));
    let stored = land(lane.round(&ctx(&s, T0)), &mut store);
    lane.written(stored, &ctx(&s, T0));
    assert_eq!(
        admitted(lane.take_events()).len(),
        1,
        "the 2 left are taken"
    );
    assert_eq!(store.balance("e"), 0);
}

#[test]
fn a_write_of_unknown_outcome_is_resolved_before_anything_else_and_given_back_if_it_landed() {
    let s = settings();
    let mut store = Store::new();
    let mut lane = Lane::default();
    lane.restore(id("e"), Some(Bucket::full(rpm(10), T0)), T0);
    store.buckets.insert(id("e"), Bucket::full(rpm(10), T0));
    let (j, mut answer) = job("e", &rpm(10), 3);
    lane.acquire(j, &ctx(&s, T0));
    let Some(Io::Write(writes)) = lane.round(&ctx(&s, T0)) else {
        panic!("a write")
    };
    // The write lands, its answer is lost.
    store.apply(&writes[0].0, &writes[0].1).unwrap();
    let mark = writes[0].1.marks().expect("marked");
    lane.written(Err(StoreError::Transient("lost".into())), &ctx(&s, T0));
    assert!(
        matches!(answer.try_recv(), Ok(Err(e)) if e.is_outage()),
        "the caller hears the failure policy at once"
    );
    let (j, _) = job("e", &rpm(10), 1);
    lane.acquire(j, &ctx(&s, T0));
    // Back-off first, then the resolution, before any other write.
    let resolve = loop {
        match lane.round(&ctx(&s, T0)) {
            Some(Io::Wait(ms)) => std::thread::sleep(Duration::from_millis(ms as u64)),
            other => break other,
        }
    };
    assert!(
        matches!(resolve, Some(Io::Resolve(ref e, m)) if e == &id("e") && m == mark),
        "{resolve:?}"
    );
    let current = store.buckets[&id("e")].clone();
    lane.resolved(
        Ok(Resolution {
            landed: current.mark == Some(mark),
            current: Some(current),
        }),
        &ctx(&s, T0),
    );
    // The refund of the landed write goes first, then the queued acquire.
    let stored = land(lane.round(&ctx(&s, T0)), &mut store);
    lane.written(stored, &ctx(&s, T0));
    assert_eq!(store.balance("e"), 10 * MILLI, "given back");
    let stored = land(lane.round(&ctx(&s, T0)), &mut store);
    lane.written(stored, &ctx(&s, T0));
    assert_eq!(store.balance("e"), 9 * MILLI);
}

#[test]
fn a_lease_settlement_is_answered_through_an_event_and_one_too_deep_is_refused() {
    let s = settings();
    let mut store = Store::new();
    let mut lane = Lane::default();
    store.buckets.insert(id("e"), Bucket::full(rpm(10), T0));
    lane.restore(id("e"), Some(Bucket::full(rpm(10), T0)), T0);
    lane.settle(Settle {
        parts: vec![(id("e"), tokens("rpm", 25))],
        counted: Vec::new(),
        lease: Some(7),
        give_up_ms: T0 + 60_000,
    });
    let stored = land(lane.round(&ctx(&s, T0)), &mut store);
    lane.written(stored, &ctx(&s, T0));
    let events = lane.take_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Settled(7, Ok(())))),
        "settled"
    );
    assert_eq!(store.balance("e"), -15 * MILLI, "a charge may go into debt");
    let floor = crate::domain::amounts::MIN_BALANCE / MILLI;
    lane.settle(Settle {
        parts: vec![(id("e"), tokens("rpm", -floor))],
        counted: Vec::new(),
        lease: Some(8),
        give_up_ms: T0 + 60_000,
    });
    assert!(lane.round(&ctx(&s, T0)).is_none(), "nothing is written");
    assert!(
        lane.take_events()
            .iter()
            .any(|e| matches!(e, Event::Settled(8, Err(LimiterError::OutOfRange { .. })))),
        "past the floor: refused for good"
    );
}

#[test]
fn a_settlement_whose_time_is_up_is_given_up() {
    let s = settings();
    let mut lane = Lane::default();
    lane.restore(id("e"), Some(Bucket::full(rpm(10), T0)), T0);
    lane.settle(Settle {
        parts: vec![(id("e"), tokens("rpm", -1))],
        counted: Vec::new(),
        lease: None,
        give_up_ms: T0 + 100,
    });
    assert!(lane.round(&ctx(&s, T0 + 100)).is_none());
    assert!(lane.is_idle(), "dropped unwritten");
}

#[test]
fn a_caller_past_its_deadline_is_told_so_and_charged_nothing() {
    let s = settings();
    let mut lane = Lane::default();
    lane.restore(id("e"), Some(Bucket::full(rpm(10), T0)), T0);
    let (mut j, mut answer) = job("e", &rpm(10), 1);
    j.deadline = tokio::time::Instant::now();
    lane.acquire(j, &ctx(&s, T0));
    assert!(lane.round(&ctx(&s, T0)).is_none(), "no write for it");
    assert!(matches!(answer.try_recv(), Ok(Err(LimiterError::Deadline))));
    assert!(lane.is_idle());
}
