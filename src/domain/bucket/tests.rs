use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::domain::limit::{MAX_PERIOD_MS, MAX_TOKENS, MILLI, canonical};

const T0: i64 = 1_700_000_000_000;

fn name(s: &str) -> LimitName {
    LimitName::new(s).unwrap()
}

fn tokens(n: &str, t: i64) -> Vec<(LimitName, i64)> {
    vec![(name(n), t * MILLI)]
}

/// Plans and applies as a single writer would; returns whether the request was admitted.
fn acquire(
    bucket: &mut Option<Bucket>,
    limits: &[Limit],
    amounts: &[(LimitName, i64)],
    now: i64,
) -> bool {
    match plan(bucket.as_ref(), limits, amounts, now) {
        Plan::Reject(_) => false,
        Plan::Admit { write, expected } => {
            match write {
                Write::Create(b) => *bucket = Some(b),
                Write::Change(c) => bucket.as_mut().unwrap().apply(&c).unwrap(),
            }
            assert_eq!(
                bucket.as_ref(),
                Some(&expected),
                "expected state matches applied state"
            );
            true
        }
    }
}

fn rejection(
    bucket: Option<&Bucket>,
    limits: &[Limit],
    amounts: &[(LimitName, i64)],
    now: i64,
) -> Rejection {
    match plan(bucket, limits, amounts, now) {
        Plan::Reject(r) => r,
        Plan::Admit { .. } => panic!("expected a rejection"),
    }
}

fn balance(bucket: &Option<Bucket>, n: &str, now: i64) -> i64 {
    bucket
        .as_ref()
        .unwrap()
        .at(now)
        .limit(&name(n))
        .unwrap()
        .balance
}

#[test]
fn burst_admits_capacity_then_waits_one_refill() {
    let limits = vec![Limit::per_second("rps", 1).unwrap().with_burst(10).unwrap()];
    let mut b = None;
    let admitted = (0..15)
        .filter(|_| acquire(&mut b, &limits, &tokens("rps", 1), T0))
        .count();
    assert_eq!(admitted, 10);
    let r = rejection(b.as_ref(), &limits, &tokens("rps", 1), T0);
    assert_eq!(r.retry_after_ms(), Some(1_000));
    assert!(!acquire(&mut b, &limits, &tokens("rps", 1), T0 + 999));
    assert!(acquire(&mut b, &limits, &tokens("rps", 1), T0 + 1_000));
}

#[test]
fn refill_in_one_millisecond_steps_is_exact() {
    // 100 per minute = 5/3 milli-tokens per millisecond: every step leaves a remainder.
    let limits = vec![Limit::per_minute("rpm", 100).unwrap()];
    let mut b = None;
    assert!(acquire(&mut b, &limits, &tokens("rpm", 100), T0));
    assert_eq!(balance(&b, "rpm", T0), 0);
    // One milli-token every millisecond: the writes refill when the stored balance is short,
    // and defer the refill otherwise.
    let one = vec![(name("rpm"), 1)];
    let mut refills = 0;
    for ms in 1..=60_000 {
        let before = b.as_ref().unwrap().refilled_at;
        assert!(acquire(&mut b, &limits, &one, T0 + ms));
        refills += i32::from(b.as_ref().unwrap().refilled_at != before);
    }
    assert!(refills > 1, "some writes carried a refill: {refills}");
    assert!(refills < 60_000, "some deferred it: {refills}");
    assert_eq!(
        balance(&b, "rpm", T0 + 60_000),
        100_000 - 60_000,
        "one minute refills exactly 100 tokens"
    );
}

#[test]
fn a_refill_the_request_does_not_need_is_deferred_and_commutes() {
    // 10 tokens a second, at most 100: 50 stored, 10 more due after a second.
    let limits = vec![
        Limit::per_second("rps", 10)
            .unwrap()
            .with_burst(100)
            .unwrap(),
    ];
    let mut seen = Bucket::full(limits.clone(), T0);
    seen.limits[0].balance = 50 * MILLI;
    let Plan::Admit { write, expected } = plan(Some(&seen), &limits, &tokens("rps", 5), T0 + 1_000)
    else {
        panic!("45 of 60 fit");
    };
    let Write::Change(change) = write else {
        panic!("the bucket exists");
    };
    assert!(change.refill.is_none(), "no refill written: {change:?}");
    assert_eq!(expected.refilled_at, T0);
    assert_eq!(expected.at(T0 + 1_000).limits[0].balance, 55 * MILLI);
    // Another daemon refilled and consumed meanwhile: the consumption still applies.
    let mut raced = seen.at(T0 + 500);
    raced.limits[0].balance -= 20 * MILLI;
    raced.apply(&change).unwrap();
    assert_eq!(raced.at(T0 + 1_000).limits[0].balance, 35 * MILLI);
    // A refund elsewhere that the deferred refill would carry past the capacity stops it.
    let mut refunded = seen.clone();
    refunded.limits[0].balance = 95 * MILLI;
    assert!(refunded.apply(&change).is_err());
}

#[test]
fn a_refill_is_written_when_the_request_needs_it_or_it_would_clamp() {
    let limits = vec![
        Limit::per_second("rps", 10)
            .unwrap()
            .with_burst(100)
            .unwrap(),
    ];
    let refill_written = |stored: i64, take: i64| {
        let mut seen = Bucket::full(limits.clone(), T0);
        seen.limits[0].balance = stored * MILLI;
        match plan(Some(&seen), &limits, &tokens("rps", take), T0 + 1_000) {
            Plan::Admit {
                write: Write::Change(c),
                ..
            } => c.refill.is_some(),
            other => panic!("expected a change, got {other:?}"),
        }
    };
    assert!(!refill_written(50, 50), "covered by what is stored");
    assert!(refill_written(5, 10), "needs the refill");
    assert!(refill_written(95, 1), "the refill would reach the capacity");
}

#[test]
fn refill_over_long_intervals_clamps_to_capacity() {
    let limits = vec![Limit::per_day("big", MAX_TOKENS).unwrap()];
    let mut b = None;
    assert!(acquire(
        &mut b,
        &limits,
        &tokens("big", MAX_TOKENS as i64),
        T0
    ));
    assert_eq!(
        balance(&b, "big", T0 + 43_200_000),
        MAX_TOKENS as i64 * MILLI / 2
    );
    // Ten years later (and i64::MAX, which would overflow 64-bit products): full, never above.
    for later in [T0 + MAX_PERIOD_MS, i64::MAX] {
        assert_eq!(balance(&b, "big", later), MAX_TOKENS as i64 * MILLI);
    }
}

#[test]
fn adjust_into_debt_then_retry_after_grows_and_recovers_exactly() {
    let limits = vec![Limit::per_minute("tpm", 1_000).unwrap()];
    let mut b = None;
    assert!(acquire(&mut b, &limits, &tokens("tpm", 100), T0));
    b.as_mut().unwrap().adjust(&tokens("tpm", 2_000)).unwrap();
    assert_eq!(balance(&b, "tpm", T0), -1_100 * MILLI);
    // deficit 1,101 tokens at 1,000 tokens/min = 66.06 s
    let r = rejection(b.as_ref(), &limits, &tokens("tpm", 1), T0);
    assert_eq!(r.retry_after_ms(), Some(66_060));
    assert_eq!(r.statuses[0].available, -1_100 * MILLI);
    // Even a request that consumes nothing from the indebted limit waits.
    assert!(!acquire(&mut b, &limits, &[], T0 + 66_000 - 1));
    assert!(!acquire(&mut b, &limits, &tokens("tpm", 1), T0 + 66_059));
    assert!(acquire(&mut b, &limits, &tokens("tpm", 1), T0 + 66_060));
    assert_eq!(
        b.as_ref().unwrap().limits[0].consumed,
        i128::from(2_101 * MILLI)
    );
}

#[test]
fn refunds_above_capacity_are_trimmed_by_the_next_refill() {
    let limits = vec![Limit::per_second("rps", 10).unwrap()];
    let mut b = None;
    assert!(acquire(&mut b, &limits, &tokens("rps", 1), T0));
    b.as_mut().unwrap().adjust(&tokens("rps", -5)).unwrap();
    assert_eq!(b.as_ref().unwrap().limits[0].balance, 14 * MILLI);
    assert_eq!(balance(&b, "rps", T0 + 1), 10 * MILLI);
    // The next consumption refills (that would clamp) and so trims the refund.
    assert!(acquire(&mut b, &limits, &tokens("rps", 1), T0 + 100));
    assert_eq!(b.as_ref().unwrap().limits[0].balance, 9 * MILLI);
}

#[test]
fn a_clock_going_backwards_neither_refills_nor_moves_the_timestamp() {
    let limits = vec![Limit::per_second("rps", 10).unwrap()];
    let mut b = None;
    assert!(acquire(&mut b, &limits, &tokens("rps", 10), T0));
    assert!(!acquire(&mut b, &limits, &tokens("rps", 1), T0 - 5_000));
    assert!(!acquire(&mut b, &limits, &tokens("rps", 1), i64::MIN));
    assert_eq!(b.as_ref().unwrap().refilled_at, T0);
    assert!(acquire(&mut b, &limits, &tokens("rps", 1), T0 + 100));
}

#[test]
fn multi_limit_check_is_all_or_nothing_and_reports_every_violation() {
    let limits = canonical(vec![
        Limit::per_minute("rpm", 10).unwrap(),
        Limit::per_minute("tpm", 1_000).unwrap(),
        Limit::per_minute("xpm", 5).unwrap(),
    ])
    .unwrap();
    let mut b = None;
    let req = |rpm, tpm, xpm| {
        vec![
            (name("rpm"), rpm * MILLI),
            (name("tpm"), tpm * MILLI),
            (name("xpm"), xpm * MILLI),
        ]
    };
    assert!(acquire(&mut b, &limits, &req(1, 900, 1), T0));
    let before = b.clone();
    let r = rejection(b.as_ref(), &limits, &req(1, 200, 5), T0);
    let violated: Vec<&str> = r.violated().map(|s| s.limit.name().as_str()).collect();
    assert_eq!(violated, ["tpm", "xpm"]);
    assert_eq!(r.statuses.len(), 3);
    // 100 tokens short at 1,000/min = 6 s; one token short at 5/min = 12 s: the longest wait wins.
    assert_eq!(r.retry_after_ms(), Some(12_000));
    assert!(!acquire(&mut b, &limits, &req(1, 200, 5), T0));
    assert_eq!(b, before, "a refused request changes nothing");
}

#[test]
fn more_than_capacity_never_fits() {
    let limits = vec![Limit::per_second("rps", 10).unwrap()];
    let r = rejection(None, &limits, &tokens("rps", 11), T0);
    assert_eq!(r.retry_after_ms(), None);
    assert_eq!(r.statuses[0].retry_after_ms, None);
    let mut b = Bucket::full(limits, T0);
    assert!(b.adjust(&tokens("nope", 1)).is_err());
}

#[test]
fn plain_consumptions_commute_but_only_one_refill_wins() {
    let limits = vec![Limit::per_second("rps", 10).unwrap()];
    let mut b = None;
    assert!(acquire(&mut b, &limits, &tokens("rps", 4), T0));
    let seen = b.clone().unwrap();
    let change = |take, now| match plan(Some(&seen), &limits, &tokens("rps", take), now) {
        Plan::Admit {
            write: Write::Change(c),
            ..
        } => c,
        other => panic!("unexpected {other:?}"),
    };
    // Writers planned from the same state without refill all apply while tokens last.
    let plain = change(2, T0);
    assert!(plain.refill.is_none());
    let mut stored = seen.clone();
    for _ in 0..3 {
        stored.apply(&plain).unwrap();
    }
    assert_eq!(stored.limits[0].balance, 0);
    assert_eq!(stored.limits[0].consumed, i128::from(10 * MILLI));
    // A fourth one would overdraw: refused.
    assert_eq!(stored.apply(&plain), Err(ConditionFailed));
    // A consumption the stored 6 tokens cannot cover needs the 3 refilled by now: two such
    // refills planned from the same state, the second fails.
    let refill = change(8, T0 + 300);
    assert!(refill.refill.is_some());
    let mut stored = seen.clone();
    stored.apply(&refill).unwrap();
    assert_eq!(stored.limits[0].balance, MILLI);
    assert_eq!(stored.apply(&refill), Err(ConditionFailed));
    // A refund that raced a refill stops the refill (it would overfill).
    let mut stored = seen.clone();
    stored.adjust(&tokens("rps", -1)).unwrap();
    assert_eq!(stored.apply(&refill), Err(ConditionFailed));
}

#[test]
fn reconfiguring_clamps_shrinks_keeps_debt_and_starts_new_limits_full() {
    let old = vec![Limit::per_minute("rpm", 100).unwrap()];
    let mut b = None;
    assert!(acquire(&mut b, &old, &tokens("rpm", 10), T0));
    let new = canonical(vec![
        Limit::per_minute("rpm", 50).unwrap(),
        Limit::per_minute("tpm", 1_000).unwrap(),
    ])
    .unwrap();
    assert!(acquire(&mut b, &new, &tokens("tpm", 10), T0));
    let stored = b.as_ref().unwrap();
    assert_eq!(stored.limit_set(), new);
    assert_eq!(stored.limit(&name("rpm")).unwrap().balance, 50 * MILLI);
    assert_eq!(
        stored.limit(&name("rpm")).unwrap().consumed,
        i128::from(10 * MILLI)
    );
    assert_eq!(stored.limit(&name("tpm")).unwrap().balance, 990 * MILLI);
    // Dropping a limit removes it.
    let only_tpm = vec![Limit::per_minute("tpm", 1_000).unwrap()];
    assert!(acquire(&mut b, &only_tpm, &[], T0 + 1));
    assert_eq!(b.as_ref().unwrap().limit_set(), only_tpm);
    // A capacity raise refills over time rather than at once.
    let raised = vec![Limit::per_minute("tpm", 2_000).unwrap()];
    assert!(acquire(&mut b, &raised, &[], T0 + 2));
    assert!(balance(&b, "tpm", T0 + 2) < 1_000 * MILLI);
}

#[test]
fn custom_limits_refill_by_their_own_period() {
    let limits = vec![Limit::custom("c", 5, 1, Duration::from_secs(3)).unwrap()];
    let mut b = None;
    assert!(acquire(&mut b, &limits, &tokens("c", 5), T0));
    assert_eq!(
        rejection(b.as_ref(), &limits, &tokens("c", 2), T0).retry_after_ms(),
        Some(6_000)
    );
    assert_eq!(balance(&b, "c", T0 + 2_999), 999);
}

#[test]
fn a_soft_limit_is_debited_into_debt_and_never_refuses() {
    let limits = canonical(vec![
        Limit::per_minute("rpm", 10).unwrap().with_soft(true),
        Limit::per_minute("tpm", 100).unwrap(),
    ])
    .unwrap();
    let ask = |rpm, tpm| vec![(name("rpm"), rpm * MILLI), (name("tpm"), tpm * MILLI)];
    let mut b = None;
    for i in 0..15 {
        let Plan::Admit { write, expected } = plan(b.as_ref(), &limits, &ask(1, 1), T0) else {
            panic!("request {i}: a soft limit never refuses");
        };
        match write {
            Write::Create(c) => b = Some(c),
            Write::Change(c) => b.as_mut().unwrap().apply(&c).unwrap(),
        }
        assert_eq!(b.as_ref(), Some(&expected));
    }
    assert_eq!(balance(&b, "rpm", T0), -5 * MILLI);
    assert_eq!(
        b.as_ref().unwrap().limits[0].consumed,
        15 * i128::from(MILLI)
    );
    // Overdrawn from the eleventh request on: its status says so and still allows.
    let Admission::Admitted { statuses, .. } = admit(b.as_ref(), &limits, &ask(1, 1), T0) else {
        panic!("admitted");
    };
    assert!(statuses[0].allowed() && statuses[0].overdrawn());
    assert!(statuses[1].allowed() && !statuses[1].overdrawn());
    // The hard limit still refuses the whole request; the soft one's status is still allowed.
    let r = rejection(b.as_ref(), &limits, &ask(1, 86), T0);
    assert_eq!(r.violated().count(), 1);
    assert_eq!(r.violated().next().unwrap().limit.name().as_str(), "tpm");
    assert_eq!(r.retry_after_ms(), Some(600));
    // Debt refills as for any limit: 5 tokens owed, one every 6 s.
    assert_eq!(balance(&b, "rpm", T0 + 36_000), MILLI);
}

#[test]
fn a_soft_limit_refuses_only_at_the_floor_no_balance_may_pass() {
    let limits = vec![Limit::per_second("s", 1).unwrap().with_soft(true)];
    let mut seen = Bucket::full(limits.clone(), T0);
    seen.limits[0].balance = MIN_BALANCE + 5 * MILLI;
    assert!(matches!(
        plan(Some(&seen), &limits, &tokens("s", 5), T0),
        Plan::Admit { .. }
    ));
    let r = rejection(Some(&seen), &limits, &tokens("s", 6), T0);
    assert_eq!(r.retry_after_ms(), None, "never: it would pass the floor");
}

#[test]
fn soft_consumptions_commute_with_other_writers_even_in_debt() {
    let limits = vec![Limit::per_minute("rpm", 10).unwrap().with_soft(true)];
    let mut seen = Bucket::full(limits.clone(), T0);
    seen.limits[0].balance = -3 * MILLI;
    // Two daemons plan from the same state, within the same millisecond.
    let writes: Vec<Change> = (0..2)
        .map(
            |_| match plan(Some(&seen), &limits, &tokens("rpm", 2), T0) {
                Plan::Admit {
                    write: Write::Change(c),
                    ..
                } => c,
                other => panic!("a soft limit admits: {other:?}"),
            },
        )
        .collect();
    assert!(writes.iter().all(|c| c.refill.is_none()));
    let mut stored = seen.clone();
    for c in &writes {
        stored.apply(c).expect("plain consumptions commute");
    }
    assert_eq!(stored.limits[0].balance, -7 * MILLI);
}

prop_compose! {
    fn any_limit()(capacity in 1u64..10_000, amount in 1u64..10_000, period in 1u64..120_000) -> Limit {
        Limit::custom("l", capacity, amount, Duration::from_millis(period)).unwrap()
    }
}

proptest! {
    /// Refilling in many steps credits exactly what one step would (no drift).
    #[test]
    fn refill_is_drift_free(limit in any_limit(), steps in prop::collection::vec(0i64..5_000, 1..50)) {
        let limit = limit.with_burst(MAX_TOKENS).unwrap();
        let mut stepwise = Bucket::full(vec![limit.clone()], T0);
        stepwise.limits[0].balance = 0;
        let at_once = stepwise.clone();
        let mut now = T0;
        for dt in &steps {
            now += dt;
            stepwise = stepwise.at(now);
        }
        prop_assert_eq!(stepwise.at(now).limits[0].balance, at_once.at(now).limits[0].balance);
    }

    /// Over any interval, admitted <= capacity + what the refill rate allows; tokens never exceed
    /// capacity after a refill.
    #[test]
    fn admitted_never_exceeds_capacity_plus_refill(
        limit in any_limit(),
        requests in prop::collection::vec((0i64..2_000, 1i64..3_000), 1..200),
    ) {
        let limits = vec![limit.clone()];
        let mut b = None;
        let mut now = T0;
        let mut admitted = 0i64;
        for (dt, milli) in requests {
            now += dt;
            let amounts = vec![(limit.name().clone(), milli)];
            if acquire(&mut b, &limits, &amounts, now) {
                admitted += milli;
            }
            if let Some(bucket) = &b {
                prop_assert!(bucket.at(now).limits[0].balance <= limit.capacity());
            }
        }
        let refill = i128::from(now - T0) * i128::from(limit.refill_amount()) / i128::from(limit.refill_period_ms());
        prop_assert!(i128::from(admitted) <= i128::from(limit.capacity()) + refill);
        if let Some(bucket) = &b {
            prop_assert_eq!(bucket.limits[0].consumed, i128::from(admitted));
        }
    }

    /// Splitting one acquire into smaller ones at the same instant never admits more.
    #[test]
    fn splitting_a_request_never_admits_more(limit in any_limit(), used in 0i64..10_000, total in 1i64..20_000, parts in 1usize..10) {
        let limits = vec![limit.clone()];
        let mut seen = Bucket::full(limits.clone(), T0);
        seen.limits[0].balance = limit.capacity() - used.min(limit.capacity());
        let whole = plan(Some(&seen), &limits, &[(limit.name().clone(), total)], T0 + 1);
        let whole = matches!(whole, Plan::Admit { .. });
        let mut b = Some(seen);
        let piece = total / parts as i64;
        let mut admitted = 0;
        for _ in 0..parts {
            if acquire(&mut b, &limits, &[(limit.name().clone(), piece)], T0 + 1) {
                admitted += piece;
            }
        }
        prop_assert!(admitted <= total);
        if whole { prop_assert!(admitted == piece * parts as i64); }
        else { prop_assert!(admitted < total); }
    }

    /// Deferring refills (a write refills only when it needs to) admits exactly what refilling at
    /// every write would, on every limit of a bucket: the same decisions, the same balances.
    #[test]
    fn deferred_refills_admit_exactly_what_eager_ones_do(
        first in (1u64..10_000, 1u64..10_000, 1u64..120_000),
        second in (1u64..10_000, 1u64..10_000, 1u64..120_000),
        soft in any::<bool>(),
        requests in prop::collection::vec((0i64..3_000, 0i64..3_000, 0i64..3_000), 1..200),
    ) {
        let limit = |n: &str, (capacity, amount, period): (u64, u64, u64)| {
            Limit::custom(n, capacity, amount, Duration::from_millis(period)).unwrap()
        };
        let limits =
            canonical(vec![limit("a", first), limit("b", second).with_soft(soft)]).unwrap();
        let (mut lazy, mut eager) = (None, None);
        let mut now = T0;
        for (dt, a, b) in requests {
            now += dt;
            let amounts = vec![(name("a"), a), (name("b"), b)];
            // The eager writer stores the refill before every request.
            eager = eager.map(|e: Bucket| e.at(now));
            let admitted = acquire(&mut lazy, &limits, &amounts, now);
            prop_assert_eq!(admitted, acquire(&mut eager, &limits, &amounts, now));
            let (Some(l), Some(e)) = (&lazy, &eager) else {
                continue;
            };
            for (l, e) in l.at(now).limits.iter().zip(&e.at(now).limits) {
                prop_assert_eq!(l.balance, e.balance);
                prop_assert_eq!(l.consumed, e.consumed);
            }
        }
    }

    /// `retry_after` is exact: one millisecond earlier is refused, at it the request fits.
    #[test]
    fn retry_after_is_exact(limit in any_limit(), drained in 1i64..20_000, want in 1i64..10_000, start in 0i64..10_000) {
        let limits = vec![limit.clone()];
        let mut seen = Bucket::full(limits.clone(), T0);
        seen.limits[0].balance = limit.capacity() - drained;
        let amounts = vec![(limit.name().clone(), want)];
        let now = T0 + start;
        if let Plan::Reject(r) = plan(Some(&seen), &limits, &amounts, now) {
            match r.retry_after_ms() {
                None => prop_assert!(want > limit.capacity()),
                Some(wait) => {
                    prop_assert!(wait > 0);
                    let wait = wait as i64;
                    let early = plan(Some(&seen), &limits, &amounts, now + wait - 1);
                    prop_assert!(matches!(early, Plan::Reject(_)), "refused one millisecond early");
                    let on_time = plan(Some(&seen), &limits, &amounts, now + wait);
                    prop_assert!(matches!(on_time, Plan::Admit { .. }), "admitted on time");
                }
            }
        }
    }
}

fn operated(seen: &Bucket, op: &Operation, now: i64) -> (Bucket, Vec<(LimitName, i64)>) {
    let (write, gained) = plan_operation(seen, op, now);
    let mut after = seen.clone();
    if let Some(Write::Change(c)) = write {
        after.apply(&c).unwrap();
    }
    (after, gained)
}

#[test]
fn a_reset_fills_the_named_limits_and_forgives_debt() {
    let limits = canonical(vec![
        Limit::per_minute("rpm", 10).unwrap(),
        Limit::per_minute("tpm", 100).unwrap(),
    ])
    .unwrap();
    let mut b = Some(Bucket::full(limits.clone(), T0));
    b.as_mut()
        .unwrap()
        .adjust(&[(name("rpm"), 4 * MILLI), (name("tpm"), 130 * MILLI)])
        .unwrap();
    let seen = b.unwrap();
    // 6 s later: rpm has refilled 1 token (6 of 10), tpm 10 (-30 + 10 = -20).
    let now = T0 + 6_000;
    let (after, gained) = operated(&seen, &Operation::Reset(Some(vec![name("tpm")])), now);
    assert_eq!(gained, vec![(name("tpm"), 120 * MILLI)]);
    assert_eq!(after.limit(&name("tpm")).unwrap().balance, 100 * MILLI);
    assert_eq!(after.limit(&name("rpm")).unwrap().balance, 7 * MILLI);
    assert_eq!(after.refilled_at, now);
    assert_eq!(
        after.limit(&name("tpm")).unwrap().consumed,
        130 * i128::from(MILLI),
        "the consumption counter is untouched"
    );
    let (all, gained) = operated(&after, &Operation::Reset(None), now);
    assert_eq!(gained, vec![(name("rpm"), 3 * MILLI), (name("tpm"), 0)]);
    assert!(all.limits.iter().all(|l| l.balance == l.limit.capacity()));
    let (write, gained) = plan_operation(&all, &Operation::Reset(None), now);
    assert_eq!(write, None, "a full bucket needs no write");
    assert!(gained.iter().all(|(_, g)| *g == 0));
}

#[test]
fn a_top_up_gives_at_most_the_room_below_capacity() {
    let limits = vec![Limit::per_minute("tpm", 100).unwrap()];
    let mut seen = Bucket::full(limits, T0);
    seen.adjust(&tokens("tpm", 150)).unwrap();
    let top_up = |n: i64| Operation::TopUp(tokens("tpm", n));
    let (after, gained) = operated(&seen, &top_up(30), T0);
    assert_eq!(gained, tokens("tpm", 30));
    assert_eq!(after.limits[0].balance, -20 * MILLI);
    let (after, gained) = operated(&after, &top_up(500), T0);
    assert_eq!(gained, tokens("tpm", 120), "the room below capacity");
    assert_eq!(after.limits[0].balance, 100 * MILLI);
    assert_eq!(plan_operation(&after, &top_up(1), T0).0, None);
}

proptest! {
    /// A reset or top-up planned on a seen state, with another writer's consumption landing
    /// before it: the operation's write either applies and the result is exactly the operation
    /// followed by that consumption, or it conflicts (and is re-planned); never a blind overwrite.
    #[test]
    fn an_operation_is_exact_against_a_concurrent_consumption(
        limit in any_limit(),
        used in 0i64..20_000,
        dt in 0i64..100_000,
        other in 0i64..5_000,
        top_up in prop::option::of(1i64..20_000),
    ) {
        let limits = vec![limit.clone()];
        let mut seen = Bucket::full(limits.clone(), T0);
        seen.adjust(&[(limit.name().clone(), used)]).unwrap();
        let now = T0 + dt;
        let op = match top_up {
            Some(n) => Operation::TopUp(vec![(limit.name().clone(), n)]),
            None => Operation::Reset(None),
        };
        let (write, gained) = plan_operation(&seen, &op, now);
        let gain = gained[0].1;
        prop_assert!(gain >= 0);
        let refilled = seen.at(now).limits[0].balance;
        prop_assert!(refilled + gain <= limit.capacity());
        if let Some(n) = top_up {
            prop_assert!(gain <= n);
        }
        let Some(Write::Change(change)) = write else {
            prop_assert_eq!(gain, 0);
            return Ok(());
        };
        // Another daemon's consumption lands first.
        let mut stored = seen.clone();
        let amounts = vec![(limit.name().clone(), other)];
        if let Plan::Admit { write: Write::Change(c), .. } = plan(Some(&stored), &limits, &amounts, now) {
            stored.apply(&c).unwrap();
        } else {
            return Ok(());
        }
        let before = stored.clone();
        if stored.apply(&change).is_ok() {
            // What the ledger says now: the operation's state, less the other consumption.
            let (alone, _) = operated(&seen, &op, now);
            let spent = before.limits[0].consumed - seen.limits[0].consumed;
            prop_assert_eq!(
                i128::from(stored.at(now).limits[0].balance),
                i128::from(alone.limits[0].balance) - spent
            );
        }
    }
}

fn monthly(amount: u64) -> Limit {
    use crate::domain::calendar::Calendar;
    Limit::quota("month", amount, Calendar::new("0 0 1 * *", "UTC").unwrap()).unwrap()
}

/// 2026-01-31T00:00:00Z and the next edge, 2026-02-01T00:00:00Z.
const JAN_31: i64 = 1_769_817_600_000;
const FEB_1: i64 = JAN_31 + 86_400_000;

#[test]
fn a_quota_refuses_until_its_next_edge_then_is_whole_again() {
    let limits = vec![monthly(100)];
    let mut b = None;
    assert!(acquire(&mut b, &limits, &tokens("month", 60), JAN_31));
    assert!(acquire(
        &mut b,
        &limits,
        &tokens("month", 40),
        JAN_31 + 1_000
    ));
    let later = JAN_31 + 3_600_000;
    assert_eq!(balance(&b, "month", later), 0, "no drip");
    let r = rejection(b.as_ref(), &limits, &tokens("month", 1), later);
    assert_eq!(
        r.retry_after_ms(),
        Some((FEB_1 - later) as u64),
        "until the edge"
    );
    let never = rejection(b.as_ref(), &limits, &tokens("month", 101), later);
    assert_eq!(
        never.retry_after_ms(),
        None,
        "more than the amount never fits"
    );
    // Debt from an adjustment is forgiven at the edge.
    b.as_mut().unwrap().adjust(&tokens("month", 30)).unwrap();
    assert!(!acquire(&mut b, &limits, &tokens("month", 1), FEB_1 - 1));
    assert!(acquire(&mut b, &limits, &tokens("month", 100), FEB_1));
    assert!(!acquire(&mut b, &limits, &tokens("month", 1), FEB_1 + 1));
    // Months missed while idle reset it once.
    let may = 1_777_593_600_000; // 2026-05-01T00:00:00Z
    assert!(acquire(&mut b, &limits, &tokens("month", 100), may + 5));
    assert!(!acquire(&mut b, &limits, &tokens("month", 1), may + 6));
}

#[test]
fn a_write_after_an_edge_moves_the_refill_time_past_it() {
    let limits = canonical(vec![monthly(100), Limit::per_second("rps", 1_000).unwrap()]).unwrap();
    let mut seen = Bucket::full(limits.clone(), FEB_1 - 5);
    seen.adjust(&[(name("month"), 100 * MILLI), (name("rps"), 500 * MILLI)])
        .unwrap();
    // Only rps is asked for, and its stored balance covers it: without the edge this write
    // would be a plain subtraction, its refill deferred.
    let Plan::Admit {
        write: Write::Change(c),
        expected,
    } = plan(Some(&seen), &limits, &tokens("rps", 1), FEB_1 + 10)
    else {
        panic!("admitted");
    };
    assert!(c.refill.is_some(), "guarded: the edge is written");
    assert_eq!(expected.refilled_at, FEB_1 + 10);
    assert_eq!(expected.limit(&name("month")).unwrap().balance, 100 * MILLI);
    // A settlement after the edge is planned on the reset balance, never erased by it.
    let (write, after) = plan_settle(&seen, &tokens("month", 7), FEB_1 + 10)
        .unwrap()
        .unwrap();
    assert!(matches!(&write, Write::Change(c) if c.refill.is_some()));
    assert_eq!(after.limit(&name("month")).unwrap().balance, 93 * MILLI);
    assert_eq!(
        after.at(FEB_1 + 20).limit(&name("month")).unwrap().balance,
        93 * MILLI
    );
}

#[test]
fn quotas_round_trip_through_the_stored_form() {
    use crate::domain::calendar::Calendar;
    use crate::domain::limit::{decode, encode};
    let office = Calendar::new("0 9,17 * * 1-5", "America/New_York").unwrap();
    let limits = canonical(vec![
        monthly(100),
        Limit::quota("shift", 5, office).unwrap().with_soft(true),
        Limit::per_minute("rpm", 10).unwrap(),
    ])
    .unwrap();
    let text = encode(&limits);
    assert!(
        text.contains("shift:5000:0:0:cron=0%209%2C17%20*%20*%201-5@America/New_York:soft"),
        "{text}"
    );
    assert_eq!(decode(&text).unwrap(), limits);
    for bad in [
        "month:1000:0:0:cron=*%20*%20*%20*%20*@UTC",
        "month:1000:0:0:cron=0%200%201%20*%20*@Nowhere",
        "month:1000:5:0:cron=0%200%201%20*%20*@UTC",
        "month:1000:0:0:cron=0%200%201%20*%20*",
        "month:0:0:0:cron=0%200%201%20*%20*@UTC",
        "month:1000:0:0:soft:cron=0%200%201%20*%20*@UTC",
    ] {
        assert!(decode(bad).is_err(), "{bad}");
    }
}

proptest! {
    /// Two daemons deciding on one quota from their own, possibly stale, views of the stored
    /// bucket (a lost race re-plans from the stored one), over several edges: what they admit
    /// within one period never exceeds the amount.
    #[test]
    fn two_writers_never_admit_more_than_a_quota_s_amount_per_period(
        steps in prop::collection::vec((0i64..30_000_000, 1i64..40, any::<bool>()), 1..120),
    ) {
        let limits = vec![monthly(100)];
        let start = JAN_31 - 40_000_000;
        let mut stored = Bucket::full(limits.clone(), start);
        let mut views = [stored.clone(), stored.clone()];
        let mut now = start;
        let mut periods: std::collections::BTreeMap<i64, i64> = Default::default();
        let calendar = limits[0].calendar().unwrap().clone();
        for (dt, n, second) in steps {
            now += dt;
            let w = usize::from(second);
            for _ in 0..2 {
                let Plan::Admit { write: Write::Change(c), .. } =
                    plan(Some(&views[w]), &limits, &tokens("month", n), now)
                else {
                    break;
                };
                if stored.apply(&c).is_ok() {
                    // The period is named by its next edge.
                    let period = calendar.next_edge(now).unwrap();
                    *periods.entry(period).or_default() += n;
                    views[w] = stored.clone();
                    break;
                }
                views[w] = stored.clone();
            }
        }
        for (period, admitted) in periods {
            prop_assert!(admitted <= 100, "{admitted} tokens admitted in the period ending {period}");
        }
    }
}

fn session(amount: u64, window_s: u64) -> Limit {
    Limit::session_quota("session", amount, Duration::from_secs(window_s)).unwrap()
}

#[test]
fn a_session_opens_at_first_use_and_gives_its_amount_back_at_its_end() {
    let limits = vec![session(10, 3_600)];
    let mut b = None;
    // Created full, no window yet: the first use opens one.
    assert!(acquire(&mut b, &limits, &tokens("session", 4), T0));
    let window_end = T0 + 3_600_000;
    assert_eq!(b.as_ref().unwrap().limits[0].carry, window_end);
    assert!(acquire(&mut b, &limits, &tokens("session", 6), T0 + 60_000));
    assert_eq!(
        b.as_ref().unwrap().limits[0].carry,
        window_end,
        "the window stays"
    );
    let r = rejection(b.as_ref(), &limits, &tokens("session", 1), T0 + 600_000);
    assert_eq!(r.retry_after_ms(), Some((window_end - T0 - 600_000) as u64));
    assert!(!acquire(
        &mut b,
        &limits,
        &tokens("session", 1),
        window_end - 1
    ));
    // Idle well past its end: the next use opens a new window there.
    let later = window_end + 7_200_000;
    assert_eq!(balance(&b, "session", later), 10 * MILLI);
    assert!(acquire(&mut b, &limits, &tokens("session", 10), later));
    assert_eq!(b.as_ref().unwrap().limits[0].carry, later + 3_600_000);
    // A lease's charge with no window open opens one too.
    let mut seen = b.unwrap().at(later + 3_600_000);
    assert_eq!(seen.limits[0].carry, 0, "ended");
    let (write, after) = plan_settle(&seen, &tokens("session", 3), later + 3_700_000)
        .unwrap()
        .unwrap();
    let Write::Change(c) = write else {
        panic!("a change")
    };
    seen.apply(&c).unwrap();
    assert_eq!(seen, after);
    assert_eq!(seen.limits[0].carry, later + 3_700_000 + 3_600_000);
    assert_eq!(seen.limits[0].balance, 7 * MILLI);
}

#[test]
fn two_daemons_opening_one_window_at_once_share_one_allowance() {
    let limits = canonical(vec![
        session(10, 60),
        Limit::per_second("rps", 100).unwrap(),
    ])
    .unwrap();
    let mut stored = Bucket::full(limits.clone(), T0);
    let seen = stored.clone();
    let plan_at = |seen: &Bucket, n: i64, now: i64| match plan(
        Some(seen),
        &limits,
        &tokens("session", n),
        now,
    ) {
        Plan::Admit {
            write: Write::Change(c),
            ..
        } => c,
        other => panic!("{other:?}"),
    };
    let first = plan_at(&seen, 10, T0 + 5);
    let second = plan_at(&seen, 10, T0 + 7);
    stored.apply(&first).unwrap();
    assert!(
        stored.apply(&second).is_err(),
        "the second opener lost the refill"
    );
    // Re-planned inside the first's window: refused, the window's end unchanged.
    let r = rejection(Some(&stored), &limits, &tokens("session", 1), T0 + 7);
    assert_eq!(r.retry_after_ms(), Some(60_000 - 2));
    assert_eq!(
        stored.limit(&name("session")).unwrap().carry,
        T0 + 5 + 60_000
    );
}

#[test]
fn session_quotas_round_trip_and_parse() {
    use crate::domain::limit::{decode, encode};
    let limits = canonical(vec![session(10, 18_000), monthly(5)]).unwrap();
    let text = encode(&limits);
    assert!(
        text.contains("session:10000:0:0:session=18000000"),
        "{text}"
    );
    assert_eq!(decode(&text).unwrap(), limits);
    let parsed: Limit = "session=10/session(5h)".parse().unwrap();
    assert_eq!(parsed, session(10, 18_000));
    assert_eq!(parsed.describe(), "session 10/session(5h)");
    assert!("s=10/session(5h),soft".parse::<Limit>().unwrap().is_soft());
    for bad in [
        "s=10/session(0s)",
        "s=10/session(1500ms)",
        "s=10/session(400d)",
        "s=10/session(5h",
        "s=10/session(5x)",
    ] {
        assert!(bad.parse::<Limit>().is_err(), "{bad}");
    }
    assert!(decode("s:1000:0:0:session=999").is_err());
    assert!(decode("s:1000:0:0:session=1000:cron=0%200%201%20*%20*@UTC").is_err());
}

proptest! {
    /// Two daemons with stale views take a session quota: every admission falls in a window
    /// opened by the first admission after the previous one ended, and no window admits more
    /// than the amount.
    #[test]
    fn two_writers_never_admit_more_than_a_session_s_amount_per_window(
        steps in prop::collection::vec((0i64..40_000, 1i64..6, any::<bool>()), 1..150),
    ) {
        let limits = vec![session(10, 60)];
        let mut stored = Bucket::full(limits.clone(), T0);
        let mut views = [stored.clone(), stored.clone()];
        let mut now = T0;
        let mut windows: std::collections::BTreeMap<i64, i64> = Default::default();
        for (dt, n, second) in steps {
            now += dt;
            let w = usize::from(second);
            for _ in 0..2 {
                let Plan::Admit { write: Write::Change(c), .. } =
                    plan(Some(&views[w]), &limits, &tokens("session", n), now)
                else {
                    break;
                };
                if stored.apply(&c).is_ok() {
                    let end = stored.limits[0].carry;
                    prop_assert!(end > now && end <= now + 60_000, "admitted outside a window");
                    *windows.entry(end).or_default() += n;
                    views[w] = stored.clone();
                    break;
                }
                views[w] = stored.clone();
            }
        }
        for (end, admitted) in windows {
            prop_assert!(admitted <= 10, "{admitted} tokens in the window ending {end}");
        }
    }
}

#[test]
fn a_calendar_quota_topped_up_gains_exactly_that_for_the_period() {
    let limits = vec![monthly(100)];
    let mut seen = Bucket::full(limits.clone(), JAN_31);
    seen.adjust(&tokens("month", 30)).unwrap();
    let top_up = Operation::TopUp(tokens("month", 50));
    let (after, gained) = operated(&seen, &top_up, JAN_31 + 1_000);
    assert_eq!(gained, tokens("month", 50), "exactly, past the amount");
    let month = |b: &Bucket, now: i64| b.at(now).limit(&name("month")).unwrap().balance;
    assert_eq!(month(&after, JAN_31 + 2_000), 120 * MILLI, "kept by reads");
    // Spent and given back within the period: the raised ceiling holds the refund.
    let mut b = Some(after);
    assert!(acquire(
        &mut b,
        &limits,
        &tokens("month", 120),
        JAN_31 + 3_000
    ));
    let stored = b.clone().unwrap();
    let (write, refunded) = plan_settle(&stored, &tokens("month", -120), JAN_31 + 4_000)
        .unwrap()
        .unwrap();
    let Write::Change(c) = write else {
        panic!("a change")
    };
    let mut applied = stored.clone();
    applied.apply(&c).unwrap();
    assert_eq!(applied, refunded);
    assert_eq!(month(&applied, JAN_31 + 5_000), 120 * MILLI);
    // The edge takes the top-up back with the period.
    assert_eq!(month(&applied, FEB_1), 100 * MILLI);
    assert!(!acquire(
        &mut Some(applied),
        &limits,
        &tokens("month", 101),
        FEB_1
    ));
    // A reset starts a new period: the top-up goes too.
    let (reset, _) = operated(&seen, &top_up, JAN_31);
    let (reset, _) = operated(&reset, &Operation::Reset(None), JAN_31 + 10);
    assert_eq!(month(&reset, JAN_31 + 20), 100 * MILLI);
}

#[test]
fn a_quota_s_status_says_when_its_amount_comes_back() {
    let limits = vec![monthly(10)];
    let r = rejection(None, &limits, &tokens("month", 11), JAN_31);
    assert_eq!(r.statuses[0].resets_at_ms, Some(FEB_1));
    let limits = vec![session(10, 60)];
    let Admission::Admitted { statuses, .. } = admit(None, &limits, &tokens("session", 1), T0)
    else {
        panic!("admitted");
    };
    assert_eq!(
        statuses[0].resets_at_ms,
        Some(T0 + 60_000),
        "the window it opened"
    );
    let drip = vec![Limit::per_second("rps", 1).unwrap()];
    let r = rejection(None, &drip, &tokens("rps", 2), T0);
    assert_eq!(r.statuses[0].resets_at_ms, None);
}

/// `per_minute` tokens a minute, scaled by `permille` while `pattern` matches (UTC).
fn scheduled(per_minute: u64, pattern: &str, change: crate::domain::schedule::Change) -> Limit {
    use crate::domain::schedule::Schedule;
    let schedule = Schedule::new(&[(pattern.to_owned(), change)], "UTC").unwrap();
    Limit::per_minute("rpm", per_minute)
        .unwrap()
        .with_schedule(schedule)
        .unwrap()
}

/// 2026-03-02T09:00:00Z, a Monday: business hours begin.
const MON_9: i64 = 1_772_442_000_000;

#[test]
fn a_schedule_refills_each_span_at_its_own_rate_and_clamps_at_a_boundary() {
    use crate::domain::schedule::Change;
    // 1,000 a minute outside business hours, 500 (capacity too) inside.
    let limits = vec![scheduled(1_000, "* 9-17 * * 1-5", Change::Scale(500))];
    let mut b = Some(Bucket::full(limits.clone(), MON_9 - 60_000));
    assert_eq!(balance(&b, "rpm", MON_9 - 60_000), 1_000 * MILLI);
    // Full at the base capacity before nine; clamped to the scaled one at nine.
    assert_eq!(balance(&b, "rpm", MON_9 - 1), 1_000 * MILLI);
    assert_eq!(balance(&b, "rpm", MON_9), 500 * MILLI);
    assert!(!acquire(&mut b, &limits, &tokens("rpm", 501), MON_9 + 1));
    assert!(acquire(&mut b, &limits, &tokens("rpm", 500), MON_9 + 1));
    // Inside, it drips at 500 a minute.
    assert_eq!(balance(&b, "rpm", MON_9 + 1 + 6_000), 50 * MILLI);
    // Emptied ten seconds before six, it gets 83.333 by six, then 1,000 a minute.
    let six = MON_9 + 9 * 3_600_000;
    let _ = acquire(&mut b, &limits, &tokens("rpm", 500), six - 10_000);
    assert_eq!(balance(&b, "rpm", six - 10_000), 0);
    assert_eq!(balance(&b, "rpm", six), 83_333);
    assert_eq!(balance(&b, "rpm", six + 6_000), 183_333);
    // The status tells the limit in force.
    let r = rejection(b.as_ref(), &limits, &tokens("rpm", 900), six - 10_000);
    assert_eq!(r.statuses[0].current().capacity(), 500 * MILLI);
    assert_eq!(r.statuses[0].limit.capacity(), 1_000 * MILLI);
}

#[test]
fn retry_after_walks_across_a_boundary() {
    use crate::domain::schedule::Change;
    // The Python zae-limiter's example: empty, 500 needed, 1,000 a minute now, halved in 10 s:
    // 166.666 in those 10 s, then 333.334 at 500 a minute (40.0008 s).
    let limits = vec![scheduled(1_000, "* 9-17 * * 1-5", Change::Scale(500))];
    let start = MON_9 - 10_000;
    let mut b = Some(Bucket::full(limits.clone(), start));
    assert!(acquire(&mut b, &limits, &tokens("rpm", 1_000), start));
    let r = rejection(b.as_ref(), &limits, &tokens("rpm", 500), start);
    let wait = r.retry_after_ms().unwrap();
    assert_eq!(wait, 50_000, "the carry of the first span is kept");
    assert!(!acquire(
        &mut b,
        &limits,
        &tokens("rpm", 500),
        start + wait as i64 - 1
    ));
    assert!(acquire(
        &mut b,
        &limits,
        &tokens("rpm", 500),
        start + wait as i64
    ));
    // More than any capacity in force never fits; more than now's waits for a larger one.
    let r = rejection(b.as_ref(), &limits, &tokens("rpm", 1_001), start + 60_000);
    assert_eq!(r.retry_after_ms(), None);
    let r = rejection(b.as_ref(), &limits, &tokens("rpm", 600), MON_9 + 3_600_000);
    let six = MON_9 + 9 * 3_600_000;
    assert!(r.retry_after_ms().unwrap() >= (six - MON_9 - 3_600_000) as u64);
}

#[test]
fn a_write_after_a_boundary_moves_the_refill_time_past_it() {
    use crate::domain::schedule::Change;
    // 200 a minute (capacity too) before nine, 1,000 from nine.
    let limits = vec![scheduled(1_000, "* 0-8 * * *", Change::Scale(200))];
    let mut seen = Bucket::full(limits.clone(), MON_9 - 20_000);
    seen.adjust(&tokens("rpm", 10)).unwrap();
    // By nine the balance is back at 200 (the capacity then), by 09:00:10 at 366.666. The
    // request fits the stored 190 and nothing reaches the capacity in force now, so without
    // the boundary a plain subtraction would do; but one from the old refill time would credit
    // the first span's refill above what its capacity let the bucket hold.
    let Plan::Admit {
        write: Write::Change(c),
        expected,
    } = plan(Some(&seen), &limits, &tokens("rpm", 100), MON_9 + 10_000)
    else {
        panic!("admitted");
    };
    assert!(c.refill.is_some(), "guarded: the boundary is written");
    assert_eq!(expected.limit(&name("rpm")).unwrap().balance, 266_666);
    let mut stored = seen.clone();
    stored.apply(&c).unwrap();
    assert_eq!(stored.at(MON_9 + 10_000).limits[0].balance, 266_666);
}

proptest! {
    /// Refilling across boundaries in many steps credits exactly what one step does.
    #[test]
    fn a_scheduled_refill_is_drift_free(
        steps in prop::collection::vec(0i64..400_000, 1..40),
        scale in 1u64..3_000,
        drained in 0i64..1_000,
    ) {
        use crate::domain::schedule::Change;
        let limits = vec![scheduled(1_000, "*/7 * * * *", Change::Scale(scale))];
        let mut one = Bucket::full(limits.clone(), MON_9);
        one.adjust(&tokens("rpm", drained)).unwrap();
        let mut stepped = one.clone();
        let mut now = MON_9;
        for dt in steps {
            now += dt;
            stepped = stepped.at(now);
        }
        prop_assert_eq!(one.at(now).limits, stepped.limits);
    }

    /// Two daemons deciding on one scheduled limit from their own, possibly stale, views (a
    /// lost race re-plans from the stored bucket), across boundaries that lower and raise its
    /// capacity: every admitted request is one a single up-to-date bucket admits, the stored
    /// balance is never above that bucket's (a refill planned on a stale view may credit less:
    /// it clamps what it saw) and the stored total consumed is exactly what was admitted.
    #[test]
    fn two_writers_across_boundaries_admit_what_one_exact_bucket_does(
        steps in prop::collection::vec((0i64..50_000, 1i64..200, any::<bool>()), 1..150),
    ) {
        use crate::domain::schedule::Change;
        // 1,000 a minute, a fifth of it in every other minute.
        let limits = vec![scheduled(1_000, "*/2 * * * *", Change::Scale(200))];
        let start = MON_9 + 30_000;
        let mut stored = Bucket::full(limits.clone(), start);
        let mut ideal = stored.clone();
        let mut views = [stored.clone(), stored.clone()];
        let mut now = start;
        for (dt, n, second) in steps {
            now += dt;
            let w = usize::from(second);
            for _ in 0..2 {
                let Plan::Admit { write: Write::Change(c), .. } =
                    plan(Some(&views[w]), &limits, &tokens("rpm", n), now)
                else {
                    break;
                };
                if stored.apply(&c).is_ok() {
                    let Plan::Admit { write: Write::Change(exact), .. } =
                        plan(Some(&ideal), &limits, &tokens("rpm", n), now)
                    else {
                        return Err(TestCaseError::fail(format!("{n} admitted at {now}, over the exact bucket")));
                    };
                    ideal.apply(&exact).unwrap();
                    let (s, i) = (stored.at(now), ideal.at(now));
                    prop_assert!(
                        s.limits[0].balance <= i.limits[0].balance,
                        "stored {} above the exact bucket's {} at {}", s.limits[0].balance,
                        i.limits[0].balance, now
                    );
                    prop_assert_eq!(s.limits[0].consumed, i.limits[0].consumed);
                    views[w] = stored.clone();
                    break;
                }
                views[w] = stored.clone();
            }
        }
    }
}

#[test]
fn scheduled_limits_round_trip_and_parse() {
    use crate::domain::limit::{decode, encode};
    let l: Limit = "rpm=100/1m,burst=150,when(* 9-17 * * 1-5)=x2,when(* 0-6 * * 6,0)=capacity:20+refill:10+period:30s,tz=Europe/Berlin,soft"
        .parse()
        .unwrap();
    assert!(l.is_soft());
    let s = l.schedule().unwrap();
    assert_eq!(s.tz(), "Europe/Berlin");
    assert_eq!(s.entries().count(), 2);
    assert_eq!(
        l.describe(),
        "rpm 100/1m, burst 150, when(* 9-17 * * 1-5) x2, when(* 0-6 * * 6,0) \
         capacity:20+refill:10+period:30s, tz Europe/Berlin, soft"
    );
    let text = encode(std::slice::from_ref(&l));
    assert_eq!(decode(&text).unwrap(), vec![l.clone()]);
    let half: Limit = "r=10/1s,when(* * * * *)=x0.5".parse().unwrap();
    assert_eq!(half.params_at(MON_9).capacity, 5 * MILLI);
    for bad in [
        "r=10/1s,tz=UTC",
        "r=10/1s,when(* * * * *)=x",
        "r=10/1s,when(* * * * *)=x0.0005",
        "r=10/1s,when(* * * * *)=capacity:0",
        "r=10/1s,when(* * * * *)=speed:3",
        "r=10/1s,when(* * * *)=x2",
        "r=10/1s,when(* * * * *)=x2000000",
        "q=10/cron(0 0 1 * *),when(* * * * *)=x2",
    ] {
        assert!(bad.parse::<Limit>().is_err(), "{bad}");
    }
}

#[test]
fn a_session_quota_topped_up_gains_exactly_that_for_its_window() {
    let limits = vec![session(10, 3_600)];
    let mut b = None;
    assert!(acquire(&mut b, &limits, &tokens("session", 8), T0));
    let window_end = T0 + 3_600_000;
    let seen = b.clone().unwrap();
    let (write, gained) =
        plan_operation(&seen, &Operation::TopUp(tokens("session", 25)), T0 + 1_000);
    assert_eq!(gained, tokens("session", 25), "past the amount: a purchase");
    let Some(Write::Change(c)) = write else {
        panic!("a change")
    };
    b.as_mut().unwrap().apply(&c).unwrap();
    let after = b.as_ref().unwrap().at(T0 + 2_000);
    assert_eq!(after.limits[0].balance, 27 * MILLI, "kept above the amount");
    assert_eq!(after.limits[0].carry, window_end, "the window stays");
    assert!(acquire(&mut b, &limits, &tokens("session", 27), T0 + 3_000));
    assert!(!acquire(&mut b, &limits, &tokens("session", 1), T0 + 4_000));
    // A refund keeps the raised ceiling, and a full balance keeps the window open.
    let seen = b.clone().unwrap().at(T0 + 5_000);
    let (write, refunded) = plan_settle(&seen, &tokens("session", -40), T0 + 5_000)
        .unwrap()
        .unwrap();
    assert_eq!(
        refunded.limits[0].balance,
        35 * MILLI,
        "at most the ceiling"
    );
    assert_eq!(refunded.limits[0].carry, window_end);
    let Write::Change(c) = write else {
        panic!("a change")
    };
    b.as_mut().unwrap().apply(&c).unwrap();
    // The window's end takes the top-up back: the amount, and the ceiling, are 10 again.
    let next = b.as_ref().unwrap().at(window_end);
    assert_eq!(
        (next.limits[0].balance, next.limits[0].topped_up),
        (10 * MILLI, 0)
    );
    // A reset takes it back at once.
    let seen = b.clone().unwrap();
    let (write, _) = plan_operation(&seen, &Operation::TopUp(tokens("session", 5)), T0 + 6_000);
    let Some(Write::Change(c)) = write else {
        panic!("a change")
    };
    b.as_mut().unwrap().apply(&c).unwrap();
    let (write, gained) = plan_operation(b.as_ref().unwrap(), &Operation::Reset(None), T0 + 7_000);
    assert_eq!(gained, tokens("session", -30));
    let Some(Write::Change(c)) = write else {
        panic!("a change")
    };
    b.as_mut().unwrap().apply(&c).unwrap();
    let reset = b.as_ref().unwrap().at(T0 + 7_000);
    assert_eq!(
        (
            reset.limits[0].balance,
            reset.limits[0].carry,
            reset.limits[0].topped_up
        ),
        (10 * MILLI, 0, 0)
    );
}

#[test]
fn a_burst_given_after_a_schedule_is_checked_against_its_entries() {
    use crate::domain::schedule::{Change, Schedule};
    let big = Schedule::new(&[("* * * * *".to_owned(), Change::Scale(1_000_000))], "UTC").unwrap();
    let scheduled = Limit::per_second("r", 1_000)
        .unwrap()
        .with_schedule(big)
        .unwrap();
    assert!(scheduled.clone().with_burst(2_000).is_ok());
    // A thousandfold of 10^13 tokens is past the largest capacity, as with_schedule refuses.
    let err = scheduled.with_burst(10_000_000_000_000).unwrap_err();
    assert!(
        matches!(
            err,
            crate::domain::limit::LimitError::ScheduledTooLarge { .. }
        ),
        "{err}"
    );
}
#[test]
fn zz_dbg() {
    let limits = vec![session(2, 3_600)];
    let mut b = None;
    assert!(acquire(&mut b, &limits, &tokens("session", 2), T0));
    let seen = b.clone().unwrap();
    let (write, gained) =
        plan_operation(&seen, &Operation::TopUp(tokens("session", 3)), T0 + 1_000);
    eprintln!("ZZ gained {gained:?} write {write:?}");
    let Some(Write::Change(c)) = write else {
        panic!()
    };
    b.as_mut().unwrap().apply(&c).unwrap();
    eprintln!("ZZ stored {:?}", b.as_ref().unwrap().limits[0]);
    eprintln!("ZZ at {:?}", b.as_ref().unwrap().at(T0 + 2_000).limits[0]);
    eprintln!(
        "ZZ plan {:?}",
        plan(b.as_ref(), &limits, &tokens("session", 3), T0 + 2_000)
    );
}
