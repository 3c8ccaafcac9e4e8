//! Criterion benchmarks of the hot pure paths: planning a decision against a cached bucket, and
//! applying the planned change (what the memory store does per write).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use zae_limiter::domain::bucket::{Bucket, Plan, Write, plan};
use zae_limiter::domain::limit::{Limit, LimitName, MILLI, canonical};

const T0: i64 = 1_800_000_000_000;

fn limits() -> Vec<Limit> {
    canonical(vec![
        Limit::per_minute("rpm", 1_000_000).unwrap(),
        Limit::per_minute("tpm", 100_000_000).unwrap(),
    ])
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let limits = limits();
    let amounts = vec![
        (LimitName::new("rpm").unwrap(), MILLI),
        (LimitName::new("tpm").unwrap(), 500 * MILLI),
    ];
    let bucket = Bucket::full(limits.clone(), T0);

    c.bench_function("plan/admit_without_refill", |b| {
        b.iter(|| plan(Some(black_box(&bucket)), &limits, &amounts, T0))
    });
    c.bench_function("plan/admit_with_refill", |b| {
        b.iter(|| plan(Some(black_box(&bucket)), &limits, &amounts, T0 + 1_234))
    });
    let mut empty = bucket.clone();
    for l in &mut empty.limits {
        l.balance = 0;
    }
    c.bench_function("plan/reject_with_retry_after", |b| {
        b.iter(|| plan(Some(black_box(&empty)), &limits, &amounts, T0))
    });
    let Plan::Admit {
        write: Write::Change(change),
        ..
    } = plan(Some(&bucket), &limits, &amounts, T0 + 1_234)
    else {
        unreachable!("a full bucket admits")
    };
    c.bench_function("apply/refill_change", |b| {
        b.iter(|| {
            let mut stored = bucket.clone();
            stored.apply(black_box(&change))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
