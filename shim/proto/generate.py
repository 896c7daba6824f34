"""Regenerate the Python modules in shim/proto/ from the .proto files beside them.

Run from anywhere: ``python -m shim.proto.generate`` (needs grpcio-tools, a dev
dependency). ``generate(out_dir)`` is also what the staleness test calls, so the
checked-in modules and this script cannot drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent.parent


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path = ROOT) -> None:
    """Write ``shim/proto/*_pb2.py`` and their type stubs ``*_pb2.pyi`` (what mypy reads)
    under ``out_dir`` (the project root by default)."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(p.relative_to(ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
