use proptest::prelude::*;

use super::*;
use crate::domain::bucket::plan_settle;
use crate::domain::limit::{LimitName, MILLI};

fn name(s: &str) -> LimitName {
    LimitName::new(s).unwrap()
}

fn limits(cap: u64, per_min: u64) -> Vec<Limit> {
    vec![
        Limit::custom("rpm", cap, per_min, std::time::Duration::from_secs(60)).unwrap(),
        Limit::custom(
            "tpm",
            cap * 10,
            per_min * 10,
            std::time::Duration::from_secs(60),
        )
        .unwrap(),
    ]
}

fn amounts(rpm: i64, tpm: i64) -> Amounts {
    Amounts::new([(name("rpm"), rpm * MILLI), (name("tpm"), tpm * MILLI)]).unwrap()
}

/// Applies a batch's writes to the confirmed states, as a store would.
fn stored(confirmed: &[Option<Bucket>], plan: &BatchPlan) -> Vec<Option<Bucket>> {
    let mut out = confirmed.to_vec();
    for w in &plan.writes {
        let next = match (&w.write, &out[w.item]) {
            (Write::Create(b), None) => b.clone(),
            (Write::Change(c), Some(b)) => {
                let mut b = b.clone();
                b.apply(c)
                    .expect("a planned write applies to the state it was planned from");
                b
            }
            _ => panic!("a create for a stored bucket, or a change for a missing one"),
        };
        assert_eq!(next, w.expected, "the write leaves the state it expects");
        out[w.item] = Some(next);
    }
    out
}

#[test]
fn a_cascading_request_needs_both_buckets_and_a_refusal_charges_neither() {
    let own = limits(10, 10);
    let parent = limits(3, 3);
    let a = amounts(1, 1);
    let req = Request {
        own: Some(Ask {
            item: 0,
            limits: &own,
            amounts: &a,
        }),
        parent: Some(Ask {
            item: 1,
            limits: &parent,
            amounts: &a,
        }),
    };
    let plan = decide_batch(&[None, None], &[req; 5], 0);
    assert_eq!(
        plan.admitted(),
        3,
        "the parent's 3 requests bound the child"
    );
    assert!(matches!(
        plan.verdicts[3],
        Verdict::Rejected {
            by_parent: true,
            ..
        }
    ));
    let after = stored(&[None, None], &plan);
    for b in &after {
        assert_eq!(
            b.as_ref().unwrap().limits[0].consumed,
            i128::from(3 * MILLI)
        );
    }
}

#[test]
fn another_limit_set_ends_the_batch_in_order() {
    let a = limits(10, 10);
    let b = limits(20, 20);
    let x = amounts(1, 1);
    let queue = [
        Request {
            own: Some(Ask {
                item: 0,
                limits: &a,
                amounts: &x,
            }),
            parent: None,
        },
        Request {
            own: Some(Ask {
                item: 0,
                limits: &b,
                amounts: &x,
            }),
            parent: None,
        },
        Request {
            own: Some(Ask {
                item: 0,
                limits: &a,
                amounts: &x,
            }),
            parent: None,
        },
    ];
    let plan = decide_batch(&[None], &queue, 0);
    assert!(matches!(plan.verdicts[0], Verdict::Admitted(_)));
    assert_eq!(plan.verdicts[1], Verdict::Deferred);
    assert_eq!(
        plan.verdicts[2],
        Verdict::Deferred,
        "later requests keep their place"
    );
}

#[test]
fn refunds_never_lift_a_balance_above_capacity_and_debt_has_a_floor() {
    let l = limits(100, 100);
    let plan = decide_batch(
        &[None],
        &[Request {
            own: Some(Ask {
                item: 0,
                limits: &l,
                amounts: &amounts(10, 10),
            }),
            parent: None,
        }],
        0,
    );
    let seen = stored(&[None], &plan)[0].clone().unwrap();
    // Give back 50 after taking 10: the balance stops at the capacity.
    let (write, expected) = plan_settle(&seen, &amounts(-50, 0), 1).unwrap().unwrap();
    let mut b = seen.clone();
    let Write::Change(c) = write else {
        panic!("a settle changes a stored bucket")
    };
    b.apply(&c).unwrap();
    assert_eq!(b, expected);
    assert_eq!(b.limit(&name("rpm")).unwrap().balance, 100 * MILLI);
    // A charge past the floor is refused before anything is written.
    let deep = Amounts::new([(name("rpm"), crate::domain::amounts::MAX_AMOUNT)]).unwrap();
    let mut debt = seen.clone();
    for _ in 0..4 {
        let (w, _) = plan_settle(&debt, &deep, 1).unwrap().unwrap();
        let Write::Change(c) = w else { unreachable!() };
        debt.apply(&c).unwrap();
    }
    assert!(plan_settle(&debt, &deep, 1).is_err());
}

fn arb_bucket() -> impl Strategy<Value = Option<(i64, i64)>> {
    prop::option::of((-50i64..=100, -500i64..=1_000))
}

fn arb_queue() -> impl Strategy<Value = Vec<(bool, i64, i64)>> {
    prop::collection::vec((any::<bool>(), 0i64..=30, 0i64..=300), 0..40)
}

fn bucket_at(l: &[Limit], rpm: i64, tpm: i64) -> Bucket {
    let mut b = Bucket::full(l.to_vec(), 0);
    b.limits[0].balance = rpm * MILLI;
    b.limits[1].balance = tpm * MILLI;
    b
}

proptest! {
    /// Whatever the queue, the admitted sum fits each confirmed state; the writes, applied as a
    /// store would, leave exactly the expected states; refused requests change nothing; and the
    /// same inputs give the same plan. Decided on the stored balances, the admitted sum fits them.
    #[test]
    fn never_admits_more_than_the_confirmed_state_allows(
        own in arb_bucket(),
        parent in arb_bucket(),
        queue in arb_queue(),
        now in 0i64..=120_000,
    ) {
        let own_limits = limits(100, 60);
        let parent_limits = limits(80, 30);
        let confirmed = vec![
            own.map(|(r, t)| bucket_at(&own_limits, r, t)),
            parent.map(|(r, t)| bucket_at(&parent_limits, r, t)),
        ];
        let asked: Vec<Amounts> = queue.iter().map(|(_, r, t)| amounts(*r, *t)).collect();
        let requests: Vec<Request<'_>> = queue
            .iter()
            .zip(&asked)
            .map(|((cascade, _, _), a)| Request {
                own: Some(Ask { item: 0, limits: &own_limits, amounts: a }),
                parent: cascade.then_some(Ask { item: 1, limits: &parent_limits, amounts: a }),
            })
            .collect();
        // What the plan's admitted requests take of one limit of bucket `item`.
        let admitted_of = |plan: &BatchPlan, item: usize, limit: &Limit| -> i64 {
            plan.verdicts.iter().zip(&requests).zip(&asked)
                .filter(|((v, r), _)| matches!(v, Verdict::Admitted(_))
                    && (item == 0 || r.parent.is_some()))
                .map(|(_, a)| a.get(limit.name()))
                .sum()
        };
        let plan = decide_batch(&confirmed, &requests, now);
        prop_assert_eq!(&plan, &decide_batch(&confirmed, &requests, now));
        prop_assert_eq!(plan.verdicts.len(), requests.len());

        let after = stored(&confirmed, &plan);
        for (item, l) in [(0usize, &own_limits), (1, &parent_limits)] {
            let start = match &confirmed[item] {
                Some(b) => b.at(now),
                None => Bucket::full(l.clone(), now),
            };
            for (i, limit) in l.iter().enumerate() {
                let admitted = admitted_of(&plan, item, limit);
                if admitted > 0 {
                    prop_assert!(admitted <= start.limits[i].balance,
                        "admitted {} of {} with {} available", admitted, limit.name(), start.limits[i].balance);
                }
                let consumed_before = confirmed[item].as_ref().map_or(0, |b| b.limits[i].consumed);
                let consumed_after = after[item].as_ref().map_or(0, |b| b.limits[i].consumed);
                prop_assert_eq!(consumed_after - consumed_before, i128::from(admitted));
            }
        }

        // Taking every refused request out of the queue changes no other decision.
        let kept: Vec<Request<'_>> = requests.iter().zip(&plan.verdicts)
            .filter(|(_, v)| !matches!(v, Verdict::Rejected { .. }))
            .map(|(r, _)| *r)
            .collect();
        let again = decide_batch(&confirmed, &kept, now);
        let expected: Vec<&Verdict> = plan.verdicts.iter()
            .filter(|v| !matches!(v, Verdict::Rejected { .. }))
            .collect();
        prop_assert_eq!(again.verdicts.iter().collect::<Vec<_>>(), expected);
        prop_assert_eq!(again.writes, plan.writes);

        // On the stored balances (nothing refilled since the stored refill time credited): the
        // admitted sum fits each bucket as stored, the writes leave the expected states, and
        // every refusal that can ever fit has a retry-after.
        let plan = decide_batch_on_stored(&confirmed, &requests, now);
        stored(&confirmed, &plan);
        for (item, l) in [(0usize, &own_limits), (1, &parent_limits)] {
            let start = match &confirmed[item] {
                Some(b) => b.clone(),
                None => Bucket::full(l.clone(), now),
            };
            for (i, limit) in l.iter().enumerate() {
                let admitted = admitted_of(&plan, item, limit);
                if admitted > 0 {
                    prop_assert!(admitted <= start.limits[i].balance,
                        "admitted {} of {} with {} stored", admitted, limit.name(), start.limits[i].balance);
                }
            }
        }
        for v in &plan.verdicts {
            if let Verdict::Rejected { rejection, .. } = v {
                let fits_some_day = rejection.statuses.iter().all(|s| s.requested <= s.limit.capacity());
                prop_assert_eq!(rejection.retry_after_ms().is_some(), fits_some_day);
            }
        }
    }
}

#[test]
fn asking_a_quota_past_its_amount_is_not_refused_on_an_unknown_state() {
    use crate::domain::calendar::Calendar;
    let monthly = Calendar::new("0 0 1 * *", "UTC").unwrap();
    let quota = vec![Limit::quota("month", 10, monthly).unwrap()];
    let session = vec![Limit::session_quota("s", 10, std::time::Duration::from_secs(60)).unwrap()];
    let dripping = limits(10, 10);
    let ask = |limits: &[Limit], a: &Amounts| {
        let request = Request {
            own: Some(Ask {
                item: 0,
                limits,
                amounts: a,
            }),
            parent: None,
        };
        refusal(&[None], &request, 0).is_some()
    };
    let eleven = |n: &str| Amounts::new([(name(n), 11 * MILLI)]).unwrap();
    // A topped-up quota may hold it: the store decides.
    assert!(!ask(&quota, &eleven("month")));
    assert!(!ask(&session, &eleven("s")));
    // A dripping limit never holds more than its capacity: refused at once.
    assert!(ask(&dripping, &eleven("rpm")));
}
