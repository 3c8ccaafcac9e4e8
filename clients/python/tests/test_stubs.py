"""The committed gRPC stubs are what proto/ generates today."""

from __future__ import annotations

import importlib.util
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def test_the_committed_stubs_match_proto():
    spec = importlib.util.spec_from_file_location(
        "generate_stubs", HERE.parent / "generate_stubs.py"
    )
    generate_stubs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate_stubs)
    for name, text in generate_stubs.generate().items():
        committed = (generate_stubs.TARGET / name).read_text()
        assert committed == text, (
            f"{name} is stale: run `python clients/python/generate_stubs.py` with grpcio-tools "
            "as pinned in clients/python/pyproject.toml"
        )
