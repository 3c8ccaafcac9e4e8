//! The `deploy`, `status` and `delete` commands, run as a user runs them, against DynamoDB Local
//! and against a closed port.

mod common;

use std::net::TcpListener;
use std::process::{Command, Output};

fn run(args: &[&str], endpoint: &str, table: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
        .args(args)
        .args(["--table", table, "--endpoint-url", endpoint])
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .env_remove("ZAE_LIMITER_TABLE")
        .output()
        .expect("run zae-limiter")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure is one line on stderr, starting with `error:`, and a non-zero exit; no panic.
fn assert_clear_failure(o: &Output, mentions: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stdout(o)
    );
    assert_eq!(err.lines().count(), 1, "one line, got: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains(mentions),
        "{err:?} should mention {mentions:?}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn deploy_status_delete_against_dynamodb_local() {
    let endpoint = common::endpoint();
    let table = format!("cli-{}", common::unique_namespace());

    let first = run(&["deploy"], &endpoint, &table);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stdout(&first).starts_with("deployed table"),
        "{}",
        stdout(&first)
    );

    let second = run(&["deploy"], &endpoint, &table);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stdout(&second).starts_with("already deployed"),
        "{}",
        stdout(&second)
    );

    let status = run(&["status"], &endpoint, &table);
    assert!(status.status.success(), "{}", stderr(&status));
    let report = stdout(&status);
    for line in [
        "status:         ACTIVE",
        "parent index:   present",
        "ttl:            ENABLED",
        "schema version: 1",
    ] {
        assert!(report.contains(line), "{line:?} missing from:\n{report}");
    }
    assert!(report.contains("items:"), "{report}");

    let refused = run(&["delete"], &endpoint, &table);
    assert_clear_failure(&refused, "without --yes");
    assert!(
        run(&["status"], &endpoint, &table).status.success(),
        "still there"
    );

    let deleted = run(&["delete", "--yes"], &endpoint, &table);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    assert!(stdout(&deleted).starts_with("deleted table"));

    assert_clear_failure(&run(&["status"], &endpoint, &table), "does not exist");
    assert_clear_failure(
        &run(&["delete", "--yes"], &endpoint, &table),
        "does not exist",
    );
}

#[test]
fn a_closed_port_gets_one_clear_line_and_a_failure_exit() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    for args in [&["deploy"][..], &["status"], &["delete", "--yes"]] {
        assert_clear_failure(
            &run(args, &endpoint, "zae-limiter"),
            "cannot reach DynamoDB",
        );
    }
}

#[test]
fn bad_table_names_are_reported_not_panicked_on() {
    let o = run(&["status"], &common::endpoint(), "x");
    assert_clear_failure(&o, "ValidationException");
}

#[test]
fn settings_come_from_the_config_file_unless_flags_override() {
    let dir = tempfile::tempdir().unwrap();
    let table = format!("cfg-{}", common::unique_namespace());
    let path = dir.path().join("zae-limiter.toml");
    std::fs::write(
        &path,
        format!(
            "[dynamodb]\ntable = \"{table}\"\nendpoint_url = \"{}\"\n",
            common::endpoint()
        ),
    )
    .unwrap();
    let cmd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
            .args(args)
            .arg("--config")
            .arg(&path)
            .env("AWS_ACCESS_KEY_ID", "local")
            .env("AWS_SECRET_ACCESS_KEY", "local")
            .env_remove("ZAE_LIMITER_TABLE")
            .env_remove("ZAE_LIMITER_ENDPOINT_URL")
            .output()
            .unwrap()
    };
    let deployed = cmd(&["deploy"]);
    assert!(deployed.status.success(), "{}", stderr(&deployed));
    assert!(stdout(&deployed).contains(&table), "{}", stdout(&deployed));
    // A flag wins over the file.
    let other = cmd(&["status", "--table", "not-deployed-here"]);
    assert_clear_failure(&other, "\"not-deployed-here\" does not exist");
    assert!(cmd(&["delete", "--yes"]).status.success());

    std::fs::write(&path, "[dynamodb]\ntabel = \"typo\"\n").unwrap();
    assert_clear_failure(&cmd(&["status"]), "tabel");
}
