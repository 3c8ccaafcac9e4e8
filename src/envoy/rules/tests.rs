use super::*;

fn rules(toml_text: &str) -> Result<Rules, String> {
    let config: EnvoyConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
    Rules::new(&config)
}

const TWO_RULES: &str = r#"
headers = "x-ratelimit"
[[rules]]
name = "chat"
domain = "edge"
entries = [{ key = "api_key" }, { key = "path", value = "/v1/chat" }]
entity = "api_key"
resource = "chat"
limits = ["rpm=10/1m", "tpm=1000/1m,soft"]
hits = ["rpm"]
[[rules]]
name = "by-model"
domain = "edge"
entries = [{ key = "api_key" }, { key = "model" }]
entity = "api_key"
resource_key = "model"
hits = ["requests"]
shadow = true
"#;

#[test]
fn a_descriptor_matches_exactly_its_rule_s_entries_in_order() {
    let r = rules(TWO_RULES).unwrap();
    assert_eq!(r.headers, HeaderStyle::XRatelimit);
    let chat = [("api_key", "k1"), ("path", "/v1/chat")];
    assert_eq!(r.matching("edge", &chat).unwrap().name, "chat");
    // Another value, another order, one entry more or less, another domain: no rule.
    assert!(
        r.matching("edge", &[("api_key", "k1"), ("path", "/v1/other")])
            .is_none()
    );
    assert!(
        r.matching("edge", &[("path", "/v1/chat"), ("api_key", "k1")])
            .is_none()
    );
    assert!(r.matching("edge", &[("api_key", "k1")]).is_none());
    assert!(
        r.matching(
            "edge",
            &[("api_key", "k1"), ("path", "/v1/chat"), ("x", "y")]
        )
        .is_none()
    );
    assert!(r.matching("internal", &chat).is_none());
    // A key without a required value matches any value.
    let model = [("api_key", "k1"), ("model", "gpt-4")];
    assert_eq!(r.matching("edge", &model).unwrap().name, "by-model");
}

#[test]
fn a_plan_names_the_entity_resource_limits_and_amounts() {
    let r = rules(TWO_RULES).unwrap();
    let chat = r
        .plan("edge", &[("api_key", "k1"), ("path", "/v1/chat")], None, 3)
        .unwrap()
        .unwrap();
    assert_eq!(chat.entity.as_str(), "k1");
    assert_eq!(chat.resource.as_str(), "chat");
    let names: Vec<_> = chat
        .limits
        .as_ref()
        .unwrap()
        .iter()
        .map(|l| l.name().to_string())
        .collect();
    assert_eq!(names, ["rpm", "tpm"]);
    let soft: Vec<_> = chat
        .limits
        .as_ref()
        .unwrap()
        .iter()
        .map(Limit::is_soft)
        .collect();
    assert_eq!(soft, [false, true], "a rule's limit may be soft");
    assert_eq!(
        chat.amounts
            .iter()
            .map(|(n, a)| (n.to_string(), a))
            .collect::<Vec<_>>(),
        [("rpm".to_string(), 3_000)]
    );

    let model = r
        .plan("edge", &[("api_key", "k2"), ("model", "gpt-4")], None, 1)
        .unwrap()
        .unwrap();
    assert_eq!(model.resource.as_str(), "gpt-4");
    assert!(model.limits.is_none(), "stored limits");
    assert!(model.rule.shadow);
    assert!(r.plan("edge", &[("nope", "x")], None, 1).unwrap().is_none());
}

#[test]
fn an_override_replaces_the_hit_limits_and_keeps_the_others() {
    let r = rules(TWO_RULES).unwrap();
    let o = Override {
        requests_per_unit: 2,
        period: Duration::from_secs(1),
    };
    let chat = r
        .plan(
            "edge",
            &[("api_key", "k1"), ("path", "/v1/chat")],
            Some(o),
            1,
        )
        .unwrap()
        .unwrap();
    let limits = chat.limits.unwrap();
    let rpm = limits.iter().find(|l| l.name().as_str() == "rpm").unwrap();
    assert_eq!((rpm.capacity(), rpm.refill_period_ms()), (2_000, 1_000));
    assert!(limits.iter().any(|l| l.name().as_str() == "tpm"));
    // With stored limits the override is the whole set.
    let model = r
        .plan("edge", &[("api_key", "k1"), ("model", "m")], Some(o), 1)
        .unwrap()
        .unwrap();
    assert_eq!(model.limits.unwrap().len(), 1);
}

#[test]
fn bad_values_and_amounts_name_the_field() {
    let r = rules(TWO_RULES).unwrap();
    let err = r
        .plan("edge", &[("api_key", ""), ("path", "/v1/chat")], None, 1)
        .unwrap_err();
    assert_eq!(err.field, "entries[0].value");
    assert!(!err.out_of_range);
    let err = r
        .plan(
            "edge",
            &[("api_key", "k"), ("path", "/v1/chat")],
            None,
            MAX_TOKENS + 1,
        )
        .unwrap_err();
    assert_eq!(
        (err.field.as_str(), err.out_of_range),
        ("hits_addend", true)
    );
    let err = r
        .plan("edge", &[("api_key", "k"), ("model", "")], None, 1)
        .unwrap_err();
    assert_eq!(err.field, "entries[1].value");
}

#[test]
fn invalid_rules_are_refused_naming_the_rule_and_the_field() {
    let base = |extra: &str| {
        format!("[[rules]]\nname = \"r\"\ndomain = \"d\"\nentries = [{{ key = \"k\" }}]\n{extra}")
    };
    for (extra, expected) in [
        (
            "entity = \"k\"\nresource = \"x\"\nlimits = [\"rpm=1/1m\"]",
            None,
        ),
        (
            "entity = \"user\"\nresource = \"x\"\nlimits = [\"rpm=1/1m\"]",
            Some("entity: \"user\" is not one of its entries"),
        ),
        (
            "entity = \"k\"\nlimits = [\"rpm=1/1m\"]",
            Some("exactly one of resource and resource_key"),
        ),
        (
            "entity = \"k\"\nresource = \"x\"\nresource_key = \"k\"\nlimits = [\"rpm=1/1m\"]",
            Some("exactly one"),
        ),
        (
            "entity = \"k\"\nresource = \"x\"",
            Some("hits: needed with stored limits"),
        ),
        (
            "entity = \"k\"\nresource = \"x\"\nlimits = [\"rpm=1/1m\"]\nhits = [\"tpm\"]",
            Some("hits[0]: \"tpm\" is not one of the rule's limits"),
        ),
        (
            "entity = \"k\"\nresource = \"x\"\nlimits = [\"rpm=1/nope\"]",
            Some("limits[0]"),
        ),
        (
            "entity = \"k\"\nresource = \"x\"\nlimits = [\"rpm=1/1m\", \"rpm=2/1m\"]",
            Some("limits:"),
        ),
        (
            "entity = \"k\"\nresource = \"\"\nlimits = [\"rpm=1/1m\"]",
            Some("resource:"),
        ),
        (
            "entity = \"k\"\nresource = \"x\"\nlimits = [\"rpm=1/1m\"]\nnamespace = \"bad ns!\"",
            Some("namespace:"),
        ),
    ] {
        match (rules(&base(extra)), expected) {
            (Ok(_), None) => {}
            (Err(e), Some(want)) => {
                assert!(e.starts_with("envoy.rules[0] (\"r\"): "), "{e}");
                assert!(e.contains(want), "{e} should say {want}");
            }
            (got, want) => panic!("{extra}: got {got:?}, wanted {want:?}"),
        }
    }
    let twice = format!(
        "{}\n{}",
        base("entity = \"k\"\nresource = \"x\"\nlimits = [\"a=1/1m\"]"),
        base("entity = \"k\"\nresource = \"x\"\nlimits = [\"a=1/1m\"]")
    );
    assert!(
        rules(&twice)
            .unwrap_err()
            .contains("used by an earlier rule")
    );
    assert!(rules("[[rules]]\nname = \"r\"\ndomain = \"d\"\nentries = []\nentity = \"k\"\nresource = \"x\"").unwrap_err().contains("entries: at least one"));
    assert!(rules("bogus = 1").is_err(), "unknown keys are errors");
}

#[test]
fn a_rule_takes_calendar_quotas_and_refuses_a_bad_calendar_by_name() {
    let with_quota = TWO_RULES.replace(
        r#"limits = ["rpm=10/1m", "tpm=1000/1m,soft"]"#,
        r#"limits = ["rpm=10/1m", "day=500/cron(0 0 * * *),tz=Europe/Berlin"]"#,
    );
    let r = rules(&with_quota).unwrap();
    let chat = r
        .plan("edge", &[("api_key", "k1"), ("path", "/v1/chat")], None, 1)
        .unwrap()
        .unwrap();
    let limits = chat.limits.unwrap();
    let day = limits.iter().find(|l| l.name().as_str() == "day").unwrap();
    assert_eq!(day.calendar().map(|c| c.tz()), Some("Europe/Berlin"));
    let bad = TWO_RULES.replace("tpm=1000/1m,soft", "day=5/cron(* * * * *)");
    let err = rules(&bad).unwrap_err();
    assert!(err.contains("never starts matching"), "{err}");
}

#[test]
fn a_rule_takes_scheduled_limits_and_refuses_a_bad_entry_by_name() {
    let scheduled = TWO_RULES.replace(
        r#"limits = ["rpm=10/1m", "tpm=1000/1m,soft"]"#,
        r#"limits = ["rpm=10/1m,when(* 9-17 * * 1-5)=x0.5,tz=Europe/Berlin", "tpm=1000/1m,soft"]"#,
    );
    let r = rules(&scheduled).unwrap();
    let chat = r
        .plan("edge", &[("api_key", "k1"), ("path", "/v1/chat")], None, 1)
        .unwrap()
        .unwrap();
    let limits = chat.limits.unwrap();
    let rpm = limits.iter().find(|l| l.name().as_str() == "rpm").unwrap();
    assert_eq!(rpm.schedule().map(|s| s.tz()), Some("Europe/Berlin"));
    let bad = TWO_RULES.replace("tpm=1000/1m,soft", "tpm=1000/1m,when(* * 31 2 *)=x2");
    let err = rules(&bad).unwrap_err();
    assert!(
        err.contains("limits[1]") && err.contains("entry 0"),
        "{err}"
    );
}
