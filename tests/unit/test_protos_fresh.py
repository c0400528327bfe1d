"""The committed stubs in libs/rlhf/v1 must be exactly what `make protos` builds from protos/."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_fresh(tmp_path):
    written = _generator().generate(tmp_path)
    committed = ROOT / "libs" / "rlhf" / "v1"
    fresh_names = sorted(p.name for p in written)
    assert fresh_names == sorted(p.name for p in committed.iterdir() if p.is_file()), (
        "stub files differ: run `make protos`"
    )
    stale = [p.name for p in written if p.read_bytes() != (committed / p.name).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `make protos`"
