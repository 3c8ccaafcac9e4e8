"""Regenerates the protobuf messages in src/zae_limiter_client/_proto from the repository's proto/.

The package ships only the messages: it calls the daemon by method path, so grpcio's generated
service stubs (``ratelimit_pb2_grpc.py``) are not part of it; the tests generate them with
``service_stubs()`` to speak to the daemon as a stock grpcio client would.

Run with the grpcio-tools version pinned in pyproject.toml (the `test` extra):

    python clients/python/generate_stubs.py

tests/test_stubs.py fails when the committed stubs no longer match what this produces.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = "zae_limiter/v1/ratelimit.proto"
TARGET = HERE / "src" / "zae_limiter_client" / "_proto"
FILES = ("ratelimit_pb2.py",)


def generate() -> dict[str, str]:
    """The package's generated files by name (see ``FILES``)."""
    texts = _protoc()
    return {name: texts[name] for name in FILES}


def service_stubs() -> str:
    """grpcio's service stubs (``ratelimit_pb2_grpc.py``), importing the package's messages."""
    # It imports its messages as `zae_limiter.v1`, which would be the Python zae-limiter's
    # package: import them from this package instead.
    return _protoc()["ratelimit_pb2_grpc.py"].replace(
        "from zae_limiter.v1 import ratelimit_pb2",
        "from zae_limiter_client._proto import ratelimit_pb2",
    )


def _protoc() -> dict[str, str]:
    """Every generated file's text by name, generated from proto/ into a temporary folder."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                PROTO,
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed with status {code}")
        generated = pathlib.Path(out) / "zae_limiter" / "v1"
        texts = {p.name: p.read_text() for p in generated.glob("*.py")}
    return texts


def main() -> int:
    for name, text in generate().items():
        (TARGET / name).write_text(text)
        print(f"wrote {TARGET.relative_to(HERE) / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
