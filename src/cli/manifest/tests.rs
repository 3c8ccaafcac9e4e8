use super::*;

fn fault_of(text: &str) -> Fault {
    parse(text).expect_err("refused")
}

fn only_limits(text: &str) -> Vec<proto::Limit> {
    let m = parse(text).unwrap();
    m.levels[0]
        .limits
        .as_ref()
        .unwrap()
        .iter()
        .map(proto::Limit::from)
        .collect()
}

#[test]
fn a_limit_takes_the_library_s_defaults() {
    let limits = only_limits("system:\n  limits:\n    rpm: {capacity: 100}\n");
    assert_eq!(
        (
            limits[0].capacity,
            limits[0].refill_amount,
            limits[0].refill_period_ms
        ),
        (100, 100, 60_000),
        "refill_amount defaults to the capacity, refill_period to 60 s"
    );
    let limits = only_limits(
        "system:\n  limits:\n    tpm: {capacity: 10, burst: 50, refill_amount: 5, refill_period: 1}\n",
    );
    assert_eq!(
        (
            limits[0].capacity,
            limits[0].refill_amount,
            limits[0].refill_period_ms
        ),
        (50, 5, 1_000),
        "burst is the capacity, as the library reads it"
    );
    let limits = only_limits(
        "system:\n  limits:\n    s: {capacity: 9, reset_after_seconds: 60}\n    \
         q: {capacity: 7, reset_schedule: [{cron: '0 0 * * *'}]}\n",
    );
    assert_eq!(limits[0].name, "q");
    assert_eq!(
        (limits[0].quota_cron.as_str(), limits[0].quota_tz.as_str()),
        ("0 0 * * *", "UTC")
    );
    assert_eq!(
        (limits[1].name.as_str(), limits[1].quota_reset_after_ms),
        ("s", 60_000)
    );
}

#[test]
fn levels_say_only_what_the_file_names() {
    let m = parse(
        "namespace: prod\nresources:\n  gpt-4:\n    disabled: bypass\nentities:\n  k:\n    \
         resources:\n      gpt-4:\n        cascade: false\n        limits: {}\n",
    )
    .unwrap();
    assert_eq!(m.namespace.as_deref(), Some("prod"));
    let [resource, entity] = &m.levels[..] else {
        panic!("{:?}", m.levels)
    };
    assert_eq!(resource.level, Level::Resource("gpt-4".into()));
    assert!(resource.limits.is_none(), "no limits key: not managed");
    assert_eq!(resource.gate, Some(Gate::Bypass { until_ms: None }));
    assert_eq!(entity.cascade, Some(false));
    assert_eq!(
        entity.limits.as_deref().map(<[Limit]>::len),
        Some(0),
        "limits: {{}} removes them"
    );
    assert_eq!(entity.line, 8);
}

#[test]
fn a_bad_file_is_refused_naming_the_line_and_the_key() {
    let cases = [
        (
            "system:\n  limits:\n    rpm: {capacity: ten}\n",
            3,
            "system.limits.rpm.capacity",
        ),
        (
            "system:\n  limits:\n    rpm: {refill_amount: 5}\n",
            3,
            "system.limits.rpm",
        ),
        (
            "system:\n  on_unavailable: maybe\n",
            2,
            "system.on_unavailable",
        ),
        ("system:\n  cascade: true\n", 2, "system.cascade"),
        (
            "resources:\n  r:\n    cascade: yes\n",
            3,
            "resources.r.cascade",
        ),
        (
            "resources:\n  r:\n    disabled: 1\n",
            3,
            "resources.r.disabled",
        ),
        ("resource:\n  r: {}\n", 1, "resource"),
        (
            "resources:\n  r:\n    limits:\n      t:\n        capacity: 5\n        \
             schedule: [{cron: '* * * * *', scale: 0.5, capacity: 3}]\n",
            6,
            "resources.r.limits.t.schedule[0]",
        ),
        (
            "resources:\n  r:\n    limits:\n      t:\n        capacity: 5\n        schedule:\n          \
             - {cron: '* 1 * * *', scale: 2}\n          - {cron: '* 2 * * *', tz: Europe/Berlin, scale: 2}\n",
            8,
            "resources.r.limits.t.schedule[1].tz",
        ),
        (
            "system:\n  limits:\n    q: {capacity: 5, refill_amount: 5, reset_after_seconds: 9}\n",
            3,
            "system.limits.q.refill_amount",
        ),
        (
            "system:\n  limits:\n    q:\n      capacity: 5\n      reset_schedule: [{cron: '0 * * * *'}, {cron: '30 * * * *'}]\n",
            5,
            "system.limits.q.reset_schedule",
        ),
        (
            "system:\n  limits:\n    'r#m': {capacity: 5}\n",
            3,
            "system.limits.r#m",
        ),
    ];
    for (text, line, key) in cases {
        let f = fault_of(text);
        assert_eq!((f.line, f.key.as_str()), (line, key), "{text}: {f}");
    }
    // YAML that does not parse, and a key given twice: the loader's line.
    let f = fault_of("system:\n  limits:\n    rpm: {capacity: 5\n");
    assert!(f.line >= 3, "{f}");
    let f = fault_of("system:\n  limits: {}\nsystem: {}\n");
    assert!(f.message.contains("Duplicate key"), "{f}");
}
