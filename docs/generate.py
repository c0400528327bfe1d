"""`python docs/generate.py` (`make docs`): regenerate the reference parts of docs/operations.md.

The configuration reference comes from the config classes (`rlhf.config.describe`, the same
rows `--help` prints) and the metrics reference from the Prometheus collectors the modules
register, so neither can drift from the code. Everything outside the generated blocks (the
runbook) is written by hand and kept as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import pkgutil
import re
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import rlhf
import services
from rlhf.config import CommonConfig, Row, _default_cache, describe, sections

DOC = Path(__file__).resolve().parent / "operations.md"
BEGIN = "<!-- BEGIN GENERATED {name}: `make docs` rewrites this block from the code -->"
END = "<!-- END GENERATED {name} -->"
# Prometheus' own process and Python collectors: documented upstream, not listed here.
STANDARD_PREFIXES = ("process_", "python_")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "*(empty)*"


def _default(shown: str) -> str:
    """A default as a reader should see it: no home directory of the machine that generated
    the docs (the cache defaults to $XDG_CACHE_HOME/rlhf, else ~/.cache/rlhf)."""
    if shown == "()":  # an empty list setting
        return ""
    return shown.replace(str(_default_cache()), "~/.cache/rlhf")


def _rows(rows: list[Row], skip: set[Row]) -> list[str]:
    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for env, kind, default, help_text in rows:
        if (env, kind, default, help_text) in skip:
            continue
        lines.append(f"| `{env}` | {kind} | {_cell(_default(default))} | {_cell(help_text)} |")
    return lines


def service_configs() -> list[tuple[str, type]]:
    """(service package, config class) for every `services/<name>/config.py`."""
    found = []
    for module in pkgutil.iter_modules(services.__path__):
        try:
            config = importlib.import_module(f"services.{module.name}.config")
        except ModuleNotFoundError:
            continue  # a service without settings of its own (the launcher)
        for value in vars(config).values():
            if (
                isinstance(value, type)
                and dataclasses.is_dataclass(value)
                and value.__module__ == config.__name__
            ):
                found.append((module.name, value))
    return sorted(found, key=lambda item: item[0])


def _scripts() -> dict[str, str]:
    """Console scripts (name -> target): the checkout's pyproject.toml when there is one (an
    editable install's metadata lags behind a script added since), else the installed ones."""
    pyproject = DOC.parents[1] / "pyproject.toml"
    if pyproject.exists():
        return tomllib.loads(pyproject.read_text())["project"]["scripts"]
    return {script.name: script.value for script in entry_points(group="console_scripts")}


def _command(service: str) -> str:
    """How the service is started: its console script."""
    for name, target in _scripts().items():
        if target.startswith(f"services.{service}.main:"):
            return name
    return f"python -m services.{service}"


def configuration() -> str:
    common = set(describe(CommonConfig))
    lines = [
        "Every service reads its settings from environment variables and lists them with "
        "`--help`. Secrets show as *(secret)*. Groups of settings declared beside the code "
        "that reads them (an algorithm's knobs) are listed under their own heading.",
        "",
        "### Every service",
        "",
        *_rows(describe(CommonConfig), set()),
    ]
    for name, cls in service_configs():
        shared = common if issubclass(cls, CommonConfig) else set()
        note = " (and the settings every service has)" if shared else ""
        lines += ["", f"### {name.replace('_', ' ')}: `{_command(name)}`{note}"]
        for title, rows in sections(cls):
            if title:
                lines += ["", f"#### {title}"]
            lines += ["", *_rows(rows, shared)]
    return "\n".join(lines)


def _modules() -> Iterator[ModuleType]:
    """Every module of the platform, imported (that registers their metrics)."""
    for package in (rlhf, services):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith("__main__") or info.name.startswith("rlhf.v1"):
                continue  # __main__ would run the service; v1 is generated stubs
            yield importlib.import_module(info.name)


def _exposed(name: str, kind: str) -> str:
    """The name to query: counters gain `_total`; histograms and summaries keep the family
    name (their series are `_count`, `_sum` and for histograms `_bucket`)."""
    return f"`{name}_total`" if kind == "counter" else f"`{name}`"


def metrics() -> str:
    rows = {}
    for module in _modules():
        source = inspect.getsource(module)
        for value in vars(module).values():
            if not isinstance(value, MetricWrapperBase):
                continue
            [family] = value.describe()
            if f'"{family.name}' not in source:
                continue  # imported here, defined elsewhere
            # Label names have no public accessor; _labelnames is stable across releases.
            labels = ", ".join(f"`{label}`" for label in value._labelnames) or "-"
            rows[family.name] = (family.type, labels, family.documentation, module.__name__)
    registered = {
        family.name
        for family in REGISTRY.collect()
        if not family.name.startswith(STANDARD_PREFIXES)
    }
    missing = registered - set(rows)
    if missing:  # a metric not held by a module global: it would be silently undocumented
        raise RuntimeError(f"metrics registered but not found in any module: {sorted(missing)}")
    lines = [
        "Every service serves these on its metrics port (`/metrics`; `RLHF_METRICS_PORT`), "
        "next to Prometheus' standard `process_*` and `python_*` metrics. A service exposes "
        "the metrics of the modules it runs; `rlhf.server`'s are on every service. Histograms "
        "and summaries are series `_count` and `_sum` (histograms with negative buckets omit "
        "`_sum`) plus, for histograms, `_bucket`.",
        "",
        "| metric | type | labels | meaning | defined in |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(rows):
        kind, labels, help_text, module = rows[name]
        lines.append(
            f"| {_exposed(name, kind)} | {kind} | {labels} | {_cell(help_text)} | `{module}` |"
        )
    return "\n".join(lines)


def render(document: str) -> str:
    """`document` with its generated blocks rewritten from the code."""
    for name, build in (("configuration", configuration), ("metrics", metrics)):
        begin, end = BEGIN.format(name=name), END.format(name=name)
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
        if not pattern.search(document):
            raise ValueError(f"{DOC.name} lacks the markers of the generated {name} block")
        block = f"{begin}\n\n{build()}\n\n{end}"
        document = pattern.sub(lambda _match, block=block: block, document)
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    current = DOC.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print(f"{DOC} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
