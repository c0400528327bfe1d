"""`python -m bench [area ...] [--quick]`: run benchmark areas and rebuild BENCHMARKS.md."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from bench.report import AREAS, assemble, like_a_service, machine_speed, write_section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("areas", nargs="*", default=None, help=f"any of {', '.join(AREAS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    args = parser.parse_args(argv)
    like_a_service()
    areas = args.areas or [a for a in AREAS if importlib.util.find_spec(f"bench.{a}")]
    for area in areas:
        if area not in AREAS:
            parser.error(f"unknown area {area!r}")
        module = importlib.import_module(f"bench.{area}")
        print(f"== {area}", flush=True)
        command = "python -m bench " + area + (" --quick" if args.quick else "")
        speed = machine_speed()
        path = write_section(area, module.run(quick=args.quick), command, speed)
        print(path.read_text(), flush=True)
    print(f"wrote {assemble()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
