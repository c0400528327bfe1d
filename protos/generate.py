"""Build the Python stubs for protos/rlhf/v1 into OUT_DIR (default: libs).

`make protos` runs this into libs/; tests run it into a temporary folder and compare, so stale
stubs fail the build.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE = Path("rlhf") / "v1"


def generate(out_dir: Path) -> list[Path]:
    """Generate messages, type stubs and gRPC stubs for every proto; returns the files written."""
    target = out_dir / PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    (target / "__init__.py").write_text('"""Generated from protos/rlhf/v1 by `make protos`."""\n')
    return sorted(p for p in target.iterdir() if p.is_file())


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent / "libs"
    for path in generate(out):
        print(path)
