//! `limits plan|diff|apply FILE` as a user runs them, against a running daemon (either store).

use super::daemon::Daemon;

/// Runs the CLI in namespace `ns`: exit status, stdout, stderr.
fn cli(daemon: &Daemon, ns: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
        .args(args)
        .args([
            "--socket",
            daemon.socket.to_str().unwrap(),
            "--namespace",
            ns,
        ])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const MANIFEST: &str = r#"namespace: NS
system:
  on_unavailable: block
  limits:
    rpm: {capacity: 100}
resources:
  gpt-4:
    cascade: true
    limits:
      tpm: {capacity: 10000, refill_period: 60, soft: true}
      monthly:
        capacity: 500000
        reset_schedule: [{cron: "0 0 1 * *", tz: UTC}]
entities:
  user-1:
    resources:
      gpt-4:
        disabled: false
        limits:
          tpm:
            capacity: 500
            schedule:
              - {cron: "* 9-17 * * 1-5", tz: America/New_York, scale: 0.5}
          session: {capacity: 50, reset_after_seconds: 3600}
"#;

pub async fn scenario(daemon: &Daemon, ns: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("limits.yaml");
    let write = |text: &str| std::fs::write(&file, text.replace("NS", ns)).unwrap();
    let path = file.to_str().unwrap();
    let run = |args: &[&str]| cli(daemon, ns, args);
    let stored = |scope: &[&str]| {
        let mut args = vec!["limits", "get", "--output", "json"];
        args.extend_from_slice(scope);
        let (code, out, err) = run(&args);
        assert_eq!(code, Some(0), "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };

    write(MANIFEST);
    // Planned: every level, nothing written.
    let (code, plan, err) = run(&["limits", "plan", path]);
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "+ limits system: (none) -> rpm 100/1m cap 100",
        "+ on_unavailable namespace: (none) -> block",
        "+ limits resource gpt-4: (none) -> monthly quota: cron(0 0 1 * *), tz UTC cap 500000; \
         tpm 10000/1m cap 10000, soft",
        "+ cascade resource gpt-4: (none) -> true",
        "+ gate entity user-1 / gpt-4: (none) -> enabled",
        "+ limits entity user-1 / gpt-4: (none) -> session quota: session(1h) cap 50; tpm 500/1m, \
         when(* 9-17 * * 1-5) x0.5, tz America/New_York cap 500",
        "6 changes to apply (3 levels declared)",
    ] {
        assert!(plan.contains(line), "{line:?} not in:\n{plan}");
    }
    assert_eq!(stored(&[]), serde_json::json!([]), "a plan writes nothing");
    let (code, _, _) = run(&["limits", "diff", path]);
    assert_eq!(code, Some(2), "diff exits 2 while the store differs");

    // Applied: each change one audited call; the daemon then holds what the file says.
    let (code, out, err) = run(&["limits", "apply", path, "--principal", "ops"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("6 changes applied"), "{out}");
    let resource = stored(&["--resource", "gpt-4"]);
    let names: Vec<_> = resource
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["name"].as_str().unwrap(), l["soft"].as_bool()))
        .collect();
    assert_eq!(
        names,
        [("monthly", Some(false)), ("tpm", Some(true))],
        "{resource}"
    );
    let entity = stored(&["--entity", "user-1", "--resource", "gpt-4"]);
    assert_eq!(entity.as_array().unwrap().len(), 2, "{entity}");
    let (code, audit, err) = run(&["audit", "#system", "--output", "json"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        audit.contains("\"ops (uid:"),
        "the principal is in the audit: {audit}"
    );
    assert!(
        audit.contains("limits_set") && audit.contains("failure_policy_set"),
        "{audit}"
    );

    // Idempotent: a second apply changes nothing, and diff agrees.
    let (code, out, _) = run(&["limits", "apply", path]);
    assert_eq!(code, Some(0));
    assert!(out.contains("0 changes applied"), "{out}");
    let (code, out, _) = run(&["limits", "diff", path]);
    assert_eq!(
        (code, out.trim()),
        (Some(0), "no changes (3 levels declared)")
    );

    // One value changed in the file: one change planned.
    write(&MANIFEST.replace("capacity: 500\n", "capacity: 600\n"));
    let (_, plan, _) = run(&["limits", "plan", path]);
    assert_eq!(plan.lines().count(), 2, "{plan}");
    assert!(
        plan.starts_with("~ limits entity user-1 / gpt-4: "),
        "{plan}"
    );

    // A bad file is refused whole, naming the line and the key: nothing of it is applied.
    let bad = MANIFEST
        .replace("capacity: 500\n", "capacity: 600\n")
        .replace(
            "      monthly:\n",
            "      monthly:\n        refil_amount: 5\n",
        );
    write(&bad);
    let (code, out, err) = run(&["limits", "apply", path]);
    assert_eq!(code, Some(1), "refused: {out}{err}");
    assert!(
        err.contains("line 12: resources.gpt-4.limits.monthly.refil_amount: unknown key"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let entity = stored(&["--entity", "user-1", "--resource", "gpt-4"]);
    let tpm = entity
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "tpm");
    assert_eq!(tpm.unwrap()["capacity"], 500, "unchanged: {entity}");
}
