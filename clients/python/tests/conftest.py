"""Starts the real daemon binary on a temporary socket, once with the memory store and once with
DynamoDB Local (started by the repository's scripts/test.sh, which sets ZAE_TEST_DYNAMODB_ENDPOINT).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
TABLE = "zae-limiter-python-tests"


def binary() -> str:
    path = os.environ.get("ZAE_LIMITER_BIN") or str(REPO / "target" / "debug" / "zae-limiter")
    if not os.path.exists(path):
        pytest.fail(f"no daemon binary at {path}: build it (cargo build) or set ZAE_LIMITER_BIN")
    return path


def dynamodb_endpoint() -> str:
    endpoint = os.environ.get("ZAE_TEST_DYNAMODB_ENDPOINT")
    if not endpoint:
        pytest.fail(
            "ZAE_TEST_DYNAMODB_ENDPOINT is not set: run the suite with scripts/test.sh, which "
            "starts DynamoDB Local and sets it"
        )
    return endpoint


class Daemon:
    """A running `zae-limiter serve`; `namespace` is the one its configuration admits."""

    def __init__(
        self,
        backend: str,
        extra: str = "",
        socket_path: str | None = None,
        namespace: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        """``endpoint``: a DynamoDB endpoint of the test's own (nothing is deployed there), for
        a store that cannot be reached."""
        self.backend = backend
        self.dir = tempfile.TemporaryDirectory(prefix="zl-py-")
        self.socket = socket_path or os.path.join(self.dir.name, "zl.sock")
        self.namespace = namespace or "t" + uuid.uuid4().hex[:12]
        env = dict(os.environ, AWS_ACCESS_KEY_ID="local", AWS_SECRET_ACCESS_KEY="local")
        config = (
            f'[limiter]\nbackend = "{backend}"\nnamespaces = ["{self.namespace}"]\n'
            f"usage_flush_ms = 200\n{extra}\n"
        )
        if backend == "dynamodb" and endpoint is not None:
            config += f'[dynamodb]\ntable = "{TABLE}"\nendpoint_url = "{endpoint}"\n'
        elif backend == "dynamodb":
            endpoint = dynamodb_endpoint()
            config += f'[dynamodb]\ntable = "{TABLE}"\nendpoint_url = "{endpoint}"\n'
            subprocess.run(
                [binary(), "deploy", "--table", TABLE, "--endpoint-url", endpoint],
                env=env,
                check=True,
                capture_output=True,
            )
        path = os.path.join(self.dir.name, "zae-limiter.toml")
        with open(path, "w") as f:
            f.write(config)
        self.log = open(os.path.join(self.dir.name, "daemon.log"), "w")
        self.process = subprocess.Popen(
            [
                binary(),
                "serve",
                "--config",
                path,
                "--socket",
                self.socket,
                "--no-metrics",
            ],
            env=dict(env, RUST_LOG="warn"),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_for_socket()
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited at start-up: {self.read_log()}")
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(self.socket)
                return
            except OSError:
                time.sleep(0.02)
            finally:
                probe.close()
        raise RuntimeError("the daemon did not open its socket within 30 s")

    def read_log(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        self.dir.cleanup()


@pytest.fixture(scope="session", params=["memory", "dynamodb"])
def daemon(request: pytest.FixtureRequest):
    d = Daemon(request.param)
    yield d
    d.stop()


@pytest.fixture
def entity() -> str:
    """An entity id no other test uses."""
    return "e-" + uuid.uuid4().hex[:10]


def stock_stubs():
    """grpcio's generated service stubs for the daemon's API (the package ships none), as a
    stock grpcio client would have them."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location(
        "generate_stubs", REPO / "clients" / "python" / "generate_stubs.py"
    )
    generate_stubs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate_stubs)
    module = types.ModuleType("ratelimit_pb2_grpc")
    exec(compile(generate_stubs.service_stubs(), "ratelimit_pb2_grpc.py", "exec"), module.__dict__)
    return module


def run(coro):
    """Runs a coroutine on a fresh event loop (no pytest plugin needed)."""
    return asyncio.run(coro)
