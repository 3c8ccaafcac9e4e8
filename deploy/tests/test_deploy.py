"""The operator kit (deploy/) against the real daemon: every metric the dashboard and the alert
rules read is exported by a running daemon from start-up, the rules file is well formed, the
shipped configurations start a daemon, and the systemd unit passes `systemd-analyze verify`
where systemd is installed.

Run by scripts/test.sh with ZAE_LIMITER_BIN set to the binary just built.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parents[1]
METRIC = re.compile(r"\b((?:zae_limiter|process)_[a-z_]+)")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def binary() -> str:
    path = os.environ.get("ZAE_LIMITER_BIN") or str(DEPLOY.parent / "target" / "debug" / "zae-limiter")
    if not os.path.exists(path):
        pytest.fail(f"no daemon binary at {path}: build it (cargo build) or set ZAE_LIMITER_BIN")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Daemon:
    def __init__(self, config: pathlib.Path | None = None) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="zl-deploy-")
        self.port = free_port()
        args = [binary(), "serve", "--socket", os.path.join(self.dir.name, "zl.sock")]
        args += ["--metrics-addr", f"127.0.0.1:{self.port}"]
        if config is not None:
            args += ["--config", str(config)]
        self.log = open(os.path.join(self.dir.name, "log"), "w+")
        self.proc = subprocess.Popen(args, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                pytest.fail(f"the daemon exited: {self.log.read()}")
            try:
                if get(self.port, "/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        pytest.fail("the daemon did not become ready within 30 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()
        self.dir.cleanup()


@pytest.fixture(scope="module")
def exported() -> set[str]:
    daemon = Daemon()
    try:
        status, text = get(daemon.port, "/metrics")
        assert status == 200
    finally:
        daemon.stop()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def used_by(texts: list[str]) -> set[str]:
    return {m for t in texts for m in METRIC.findall(t)}


def rule_exprs() -> list[dict]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in rules["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "zae-limiter.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_metric_of_the_dashboard_and_the_alerts_is_exported_from_start_up(exported):
    used = used_by(dashboard_exprs() + [r["expr"] for r in rule_exprs()])
    assert len(used) >= 12, used
    missing = sorted(
        m
        for m in used
        if m not in exported
        and not (m.endswith(HISTOGRAM_SERIES) and m in {e for e in exported if e.endswith(HISTOGRAM_SERIES)})
    )
    assert not missing, f"used but not exported by a fresh daemon: {missing}"


def test_the_alert_rules_are_well_formed():
    rules = rule_exprs()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), names
    for wanted in ("StoreUnavailable", "FailedOpen", "FailedClosed", "Shedding", "SlowDecisions", "Conflicts"):
        assert any(wanted in n for n in names), wanted
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, r
        assert r["annotations"]["summary"], r
        assert r["expr"].count("(") == r["expr"].count(")"), r["expr"]
        if "for" in r:
            assert re.fullmatch(r"\d+[smh]", r["for"]), r


def test_the_container_and_kubernetes_configurations_start_a_daemon():
    container = DEPLOY / "container.toml"
    Daemon(container).stop()
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"} <= set(kinds)
    pod = kinds["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["socket"]["hostPath"]["path"] == "/run/zae-limiter"
    probe = pod["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready"
    config = kinds["ConfigMap"]["data"]["zae-limiter.toml"]
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "k8s.toml"
        # The socket's group 2000 exists only in the cluster; here the daemon's own group.
        path.write_text(config.replace('socket_group = "2000"\n', ""))
        Daemon(path).stop()


def test_the_dockerfile_builds_the_dist_profile_as_non_root():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+(?: AS (\w+))?", text, re.M)
    assert len(stages) >= 2, "multi-stage"
    assert "--profile dist" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), user
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in source.split():
            assert (DEPLOY.parent / path).exists(), f"COPY {path}: no such path in the repository"


def test_the_systemd_unit_verifies():
    unit = (DEPLOY / "systemd" / "zae-limiter.service").read_text()
    for wanted in ("RuntimeDirectory=zae-limiter", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes"):
        assert wanted in unit, wanted
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "zae-limiter.service"
        path.write_text(unit.replace("/usr/local/bin/zae-limiter", binary()))
        out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "zae-limiter.service" not in out.stderr, out.stderr
