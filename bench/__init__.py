"""Benchmarks: `make bench` runs every area and writes BENCHMARKS.md.

Each area is a module `bench/<area>.py` with `run(quick: bool) -> str` returning a Markdown
section body (tables with medians over repeats and ratios against an in-run baseline). Results
are kept per area in `bench/results/<area>.md`, so one area can be re-run alone
(`python -m bench <area>`) without losing the others' numbers. A service the benchmark runs as
its own process logs to `bench/logs/<service>.log` (e.g. how long each hot reload spent reading
and verifying against building), kept until the next run.
"""
