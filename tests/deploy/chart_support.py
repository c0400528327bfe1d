"""Rendering the Helm chart offline (helm-python-sdk) and reading what it rendered."""

from __future__ import annotations

import copy
import re
import secrets
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "rlhf"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RELEASE, NAMESPACE = "rlhf", "ml"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with schemas.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
# Kinds from CRDs (Prometheus Operator, Kubeflow training operator): kubernetes-validate has no
# schema for them (a PyTorchJob's pod templates are validated on their own, see `invalid`).
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "PyTorchJob"}

# What the defaults lack and an install must give: the Kafka cluster and the keys.
REQUIRED = {
    "externalKafka": {"bootstrapServers": "kafka-0.kafka.svc:9092,kafka-1.kafka.svc:9092"},
    "secrets": {"existingSecret": "rlhf-keys-managed-elsewhere"},
}
ID_KEY = "test-generation-id-key-0123456789"
API_KEY = "tenant-key-0123456789abcdef"
SERVICE_KEY = "service-key-0123456789abcdef"
OPERATOR_KEY = "operator-key-0123456789abcdef"
METRICS_KEY = "metrics-key-0123456789abcdef"
# What an operator's own Secret (secrets.existingSecret) holds, for the renders that use one.
EXISTING_SECRET = {
    "generation-id-key": ID_KEY,
    "feedback-api-keys": f"app={API_KEY}",
    "service-keys": f"trainer={SERVICE_KEY}",
    "client-key": SERVICE_KEY,
    "sim-api-key": API_KEY,
}
INLINE_SECRETS = {
    "secrets": {
        "existingSecret": "",
        "generationIdKey": ID_KEY,
        "feedbackApiKeys": [f"app={API_KEY}", "other=another-key-0123456789"],
        "serviceKey": SERVICE_KEY,
        "operatorKeys": [f"ops={OPERATOR_KEY}"],
        "metricsKey": METRICS_KEY,
        "simulatedUsersApiKey": API_KEY,
    }
}
# The sft phase: supervised fine-tuning (demonstrations from a ConfigMap) before ppo runs; the
# chart refuses both stages at once (both publish policy versions).
SFT_PHASE = {
    "trainer": {
        "stages": {
            "ppo": {"enabled": False},
            "sft": {"enabled": True, "demonstrations": {"configMap": "sft-demos"}},
        }
    }
}
# Every optional part on: monitoring, simulated users, the TGI backend with rollouts, and the sft
# stage (in place of ppo).
EVERYTHING = {
    **SFT_PHASE,
    "simulatedUsers": {"enabled": True},
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
    },
    "generation": {
        "backend": "tgi",
        "tgi": {"url": "http://tgi.serving.svc:80", "deployment": "tgi", "namespace": "serving"},
    },
    "networkPolicy": {
        "clients": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    },
    "checkpoints": {"existingClaim": "shared-checkpoints"},
}


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Values layered like repeated `-f` files: maps merge, everything else is replaced."""
    out: dict[str, Any] = {}
    for layer in layers:
        out = _merge(out, layer)
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def gpu_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values-gpu.yaml").read_text())


def local_values() -> dict[str, Any]:
    """values-local.yaml: one node, the development broker, the image built there."""
    return yaml.safe_load((CHART / "values-local.yaml").read_text())


@dataclass
class Install:
    """A `helm install` command of the README: release, namespace, -f files, --set values."""

    release: str
    namespace: str
    values_files: list[Path]
    sets: list[str]

    def values(self) -> dict[str, Any]:
        """The values Helm would merge: the files in order, then the --set values."""
        out: dict[str, Any] = {}
        for path in self.values_files:
            out = merged(out, yaml.safe_load(path.read_text()))
        for expression in self.sets:
            out = merged(out, helm.parse_set_string(expression))
        return out


def readme_local_install() -> Install:
    """The README's single-node install (the one `helm install` with values-local.yaml), with
    each `$(openssl rand -hex N)` replaced by N random bytes in hex, as the shell would."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy on Kubernetes", 1)[1].split("\n## ", 1)[0]
    commands = [
        c
        for c in re.findall(r"helm install .*?(?=\n\s*```)", section, re.S)
        if "values-local.yaml" in c
    ]
    assert len(commands) == 1, "the README has one helm install with values-local.yaml"
    words = shlex.split(commands[0].replace("\\\n", " "))
    assert words[:2] == ["helm", "install"] and words[3] == "deploy/helm/rlhf", words
    install = Install(release=words[2], namespace="default", values_files=[], sets=[])
    rest = iter(words[4:])
    for word in rest:
        if word == "-n":
            install.namespace = next(rest)
        elif word == "-f":
            install.values_files.append(ROOT / next(rest))
        elif word == "--set":
            install.sets.append(
                re.sub(
                    r"\$\(openssl rand -hex (\d+)\)",
                    lambda m: secrets.token_hex(int(m.group(1))),
                    next(rest),
                )
            )
        elif word != "--create-namespace":
            raise AssertionError(f"the README's install has {word!r}: teach readme_local_install")
    return install


class _StrictLoader(yaml.SafeLoader):
    """Refuses duplicate keys, which PyYAML would silently collapse and kubectl refuses."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


@dataclass
class Rendered:
    """The manifests of one render, by kind and name."""

    docs: list[dict[str, Any]]
    notes: str = ""
    by_key: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for doc in self.docs:
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in self.by_key, f"{key} rendered twice"
            self.by_key[key] = doc

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return self.by_key[(kind, name)]

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def names(self, kind: str) -> set[str]:
        return {d["metadata"]["name"] for d in self.kind(kind)}

    def deployments(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(Deployment, its one container)."""
        for deployment in self.kind("Deployment"):
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            yield deployment, container

    def env(self, deployment: dict[str, Any]) -> dict[str, Any]:
        """A container's environment: its ConfigMap's data, then its env entries (values or
        secretKeyRef dicts)."""
        return self.pod_env(deployment["spec"]["template"])

    def pod_env(self, template: dict[str, Any]) -> dict[str, Any]:
        """`env` of a pod template's one container (valueFrom entries as dicts)."""
        (container,) = template["spec"]["containers"]
        env: dict[str, Any] = {}
        for source in container.get("envFrom", []):
            env.update(self.get("ConfigMap", source["configMapRef"]["name"])["data"])
        for entry in container.get("env", []):
            env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
        return env

    def environ(self, template: dict[str, Any]) -> dict[str, str]:
        """What the container's process would see: secrets resolved from the rendered Secret
        (or EXISTING_SECRET, for secrets.existingSecret; optional keys it lacks are left unset,
        as Kubernetes does), downward-API fields left out."""
        secrets = {s["metadata"]["name"]: s["stringData"] for s in self.kind("Secret")}
        environ = {}
        for name, value in self.pod_env(template).items():
            if isinstance(value, dict):
                if "secretKeyRef" not in value:
                    continue
                ref = value["secretKeyRef"]
                found = secrets.get(ref["name"], EXISTING_SECRET)
                if ref.get("optional") and ref["key"] not in found:
                    continue
                value = found[ref["key"]]
            environ[name] = value
        return environ


def pod_templates(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod templates of a workload: {"": template} for a Deployment or StatefulSet, one per
    replica type ("Master", "Worker") for a PyTorchJob."""
    if doc["kind"] == "PyTorchJob":
        replicas = doc["spec"]["pytorchReplicaSpecs"]
        return {role: spec["template"] for role, spec in replicas.items()}
    return {"": doc["spec"]["template"]}


def invalid(docs: list[dict[str, Any]], kube_version: str) -> tuple[list[str], set[str]]:
    """Strict kubernetes-validate of every manifest: (errors, kinds it has no schema for). A
    PyTorchJob's pod templates are checked as core/v1 PodTemplates: the CRD is unknown to it,
    the pods it makes are not."""
    errors: list[str] = []
    unchecked: set[str] = set()
    checked = list(docs)
    for doc in docs:
        if doc["kind"] == "PyTorchJob":
            for role, template in pod_templates(doc).items():
                meta = {"name": f"{doc['metadata']['name']}-{role.lower()}"}
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta}
                checked.append({**pod, "template": template})
    for doc in checked:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except SchemaNotFoundError:
            unchecked.add(doc["kind"])
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")
    return errors, unchecked


def render(
    chart: helm.Chart, values: dict[str, Any], release: str = RELEASE, namespace: str = NAMESPACE
) -> Rendered:
    """Render like `helm install` would (schema checked), parse strictly, drop empty files."""
    out = chart.render(values, name=release, namespace=namespace, is_install=True)
    docs, notes = [], ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        assert "/tests/" not in path, "the chart ships no helm test hooks"
        docs.extend(doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc)
    return Rendered(docs, notes)


def component(doc: dict[str, Any]) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def stage(doc: dict[str, Any]) -> str | None:
    return doc["metadata"]["labels"].get("rlhf.io/stage")


_METRIC_DEF = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"")
_SUFFIXES = {
    "Counter": ("_total",),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "Summary": ("_sum", "_count", ""),
}


def exported_metrics() -> set[str]:
    """Every series name the services export, from the metric definitions in libs/ and services/
    (prometheus_client appends _total to counters, and _bucket/_sum/_count to histograms)."""
    names: set[str] = set()
    for folder in ("libs", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            for kind, name in _METRIC_DEF.findall(path.read_text()):
                base = name.removesuffix("_total") if kind == "Counter" else name
                names.update(base + suffix for suffix in _SUFFIXES[kind])
    return names
