"""The chart's rendered manifests, made runnable by `podman kube play` (podman 4.3, Debian 12).

Podman runs Pods, Deployments, ConfigMaps and PersistentVolumeClaims from Kubernetes YAML. What
a kubelet and the cluster do besides, and podman does not, is done here or left out, and each
change is said in `Plan.notes`:

- Services: no proxy and no cluster DNS. Every Service must select exactly one pod and keep its
  port equal to the container port; its DNS names become `hostAliases` of every pod, pointing
  at that pod's fixed address (`podman kube play --ip`, in the order of `Plan.pods`).
- Probes: podman 4 ignores gRPC probes and turns the others into its own health checks. They are
  removed from the pods and returned as `Plan.probes` for the caller to run, as the kubelet would.
- `containerPort`: podman 4 publishes every one on the host (Kubernetes does not), so two pods
  with a metrics port on 9090 would collide. Ports are removed once the Services' and probes'
  named ports are resolved against them.
- The downward API's `status.podIP` and `$(VAR)` references in `command`/`args`, which the
  kubelet expands, are filled in.
- Secrets: podman reads `secretKeyRef` from its own secret store, as JSON of base64 values:
  `Plan.secrets` holds them for `podman secret create`.
- NetworkPolicies, autoscalers, disruption budgets and ServiceAccounts are left out: a single
  local network has nothing to enforce them with. Any other kind (a Job, a StatefulSet, a custom
  resource) is refused rather than silently not run.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

# Kinds podman does nothing with, and why.
LEFT_OUT = {
    "NetworkPolicy": "podman has no network policies",
    "HorizontalPodAutoscaler": "podman does not scale",
    "PodDisruptionBudget": "podman does not drain nodes",
    "ServiceAccount": "podman has no Kubernetes API (no pod mounts a token)",
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class PlanError(Exception):
    """The manifests need something podman cannot do, or are inconsistent (e.g. a probe or
    Service names a port the container does not have)."""


@dataclass(frozen=True)
class Probe:
    """A container's probe, to be run by the caller: grpc (grpc.health.v1), tcp or http."""

    deployment: str
    container: str
    kind: str  # startup, readiness or liveness
    action: str
    port: int
    path: str
    period: float
    failure_threshold: int
    timeout: float
    initial_delay: float

    @property
    def budget(self) -> float:
        """Seconds the kubelet gives it before acting (restart, or not ready)."""
        return self.initial_delay + self.period * self.failure_threshold


@dataclass(frozen=True)
class Endpoint:
    """Where one Service port lands: the pod's address and the container port."""

    service: str
    name: str
    port: int
    deployment: str
    ip: str
    app_protocol: str


@dataclass
class Plan:
    manifests: list[dict[str, Any]]
    pods: dict[str, str]  # Deployment name -> its pod's address, in kube play's --ip order
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def endpoint(self, service: str, name: str) -> Endpoint:
        for endpoint in self.endpoints:
            if endpoint.service == service and endpoint.name == name:
                return endpoint
        raise KeyError(f"{service}:{name}")

    def address(self, service: str, name: str) -> str:
        endpoint = self.endpoint(service, name)
        return f"{endpoint.ip}:{endpoint.port}"


def podman_secret(data: dict[str, bytes]) -> bytes:
    """A Kubernetes Secret's data as podman's `secretKeyRef` lookup reads it."""
    return json.dumps({k: base64.b64encode(v).decode() for k, v in sorted(data.items())}).encode()


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion: known variables are replaced, unknown ones kept as
    written, and `$$` is a literal `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, text)


def _secret_data(doc: dict[str, Any]) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in (doc.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (doc.get("stringData") or {}).items()})
    return data


def _container_port(container: dict[str, Any], port: int | str, where: str) -> int:
    """A port number, or a name resolved against the container's ports."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    names = [p.get("name") for p in container.get("ports", [])]
    raise PlanError(f"{where}: container {container['name']} has no port named {port!r} ({names})")


def _probe(deployment: str, container: dict[str, Any], key: str) -> Probe:
    spec = container[key]
    where = f"Deployment/{deployment} {key}"
    if "grpc" in spec:
        action, port, path = "grpc", spec["grpc"]["port"], spec["grpc"].get("service", "")
    elif "tcpSocket" in spec:
        action, port, path = "tcp", spec["tcpSocket"]["port"], ""
    elif "httpGet" in spec:
        action, port, path = "http", spec["httpGet"]["port"], spec["httpGet"].get("path", "/")
    else:
        raise PlanError(f"{where}: only grpc, tcpSocket and httpGet probes are run here")
    return Probe(
        deployment=deployment,
        container=container["name"],
        kind=key.removesuffix("Probe"),
        action=action,
        port=_container_port(container, port, where),
        path=path,
        period=float(spec.get("periodSeconds", 10)),
        failure_threshold=int(spec.get("failureThreshold", 3)),
        timeout=float(spec.get("timeoutSeconds", 1)),
        initial_delay=float(spec.get("initialDelaySeconds", 0)),
    )


def _environment(container: dict[str, Any], config_maps: dict[str, dict[str, str]]) -> dict:
    """Plain variables of a container, as `$(VAR)` sees them: envFrom ConfigMaps, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps.get(source.get("configMapRef", {}).get("name"), {}))
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
    return env


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def plan(docs: list[dict[str, Any]], addresses: list[str], namespace: str) -> Plan:
    """Turn rendered manifests into what `podman kube play` runs: Deployments get `addresses` in
    order (pass them as `--ip`, in the order of `Plan.pods`)."""
    deployments = [copy.deepcopy(d) for d in docs if d["kind"] == "Deployment"]
    if len(addresses) < len(deployments):
        raise PlanError(f"{len(deployments)} Deployments but {len(addresses)} addresses")
    config_maps = {
        d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
    }
    out = Plan(manifests=[], pods={})
    services = []
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("ConfigMap", "PersistentVolumeClaim"):
            out.manifests.append(copy.deepcopy(doc))
        elif kind == "Secret":
            out.secrets[name] = _secret_data(doc)
            out.notes.append(f"Secret/{name}: created with `podman secret create`")
        elif kind == "Service":
            services.append(doc)
        elif kind in LEFT_OUT:
            out.notes.append(f"{kind}/{name}: left out, {LEFT_OUT[kind]}")
        elif kind != "Deployment":
            raise PlanError(f"{kind}/{name}: podman kube play cannot run it")

    for deployment, ip in zip(deployments, addresses, strict=False):
        name = deployment["metadata"]["name"]
        replicas = deployment["spec"].get("replicas", 1)
        if replicas != 1:
            raise PlanError(
                f"Deployment/{name} has {replicas} replicas: a Service in front of several pods "
                "needs a load balancer podman does not have (use replicas: 1)"
            )
        out.pods[name] = ip
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for key in PROBES:
                if key in container:
                    out.probes.append(_probe(name, container, key))

    for service in services:
        out.endpoints.extend(_service_endpoints(service, deployments, out.pods))
    aliases = _host_aliases(out.endpoints, namespace)
    if services:
        out.notes.append(
            f"{len(services)} Services: their DNS names are hostAliases of every pod, pointing "
            "at the one pod each selects (no Service proxy in podman)"
        )

    for deployment in deployments:
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        pod["hostAliases"] = pod.get("hostAliases", []) + aliases
        for container in pod["containers"]:
            _as_the_kubelet_would(container, config_maps, out.pods[name], f"Deployment/{name}")
        out.manifests.append(deployment)
    if out.probes:
        out.notes.append(
            f"{len(out.probes)} probes: removed from the pods and run by the caller (podman 4 "
            "ignores gRPC probes)"
        )
    out.notes.append(
        "containerPorts: removed after resolving named ports (podman 4 would publish each on "
        "the host)"
    )
    return out


def _service_endpoints(
    service: dict[str, Any], deployments: list[dict[str, Any]], pods: dict[str, str]
) -> list[Endpoint]:
    name = service["metadata"]["name"]
    selector = service["spec"].get("selector") or {}
    chosen = [
        d
        for d in deployments
        if selector and _labels_match(selector, d["spec"]["template"]["metadata"]["labels"])
    ]
    if len(chosen) != 1:
        found = [d["metadata"]["name"] for d in chosen]
        raise PlanError(f"Service/{name} selects {len(chosen)} Deployments {found}, not one")
    (deployment,) = chosen
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    endpoints = []
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        number = _container_port(container, target, f"Service/{name} port {port.get('name')}")
        if number != port["port"]:
            raise PlanError(
                f"Service/{name} maps port {port['port']} to {number}: without a Service proxy "
                "the run needs the Service port to equal the container port"
            )
        endpoints.append(
            Endpoint(
                service=name,
                name=port.get("name", str(port["port"])),
                port=number,
                deployment=deployment["metadata"]["name"],
                ip=pods[deployment["metadata"]["name"]],
                app_protocol=port.get("appProtocol", ""),
            )
        )
    return endpoints


def _host_aliases(endpoints: list[Endpoint], namespace: str) -> list[dict[str, Any]]:
    by_ip: dict[str, list[str]] = {}
    for endpoint in endpoints:
        names = by_ip.setdefault(endpoint.ip, [])
        for suffix in ("", f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.cluster.local"):
            if endpoint.service + suffix not in names:
                names.append(endpoint.service + suffix)
    return [{"ip": ip, "hostnames": names} for ip, names in by_ip.items()]


def _as_the_kubelet_would(
    container: dict[str, Any], config_maps: dict[str, dict[str, str]], ip: str, where: str
) -> None:
    """Fill in the downward API and `$(VAR)` references; drop probes and ports (see above)."""
    for entry in container.get("env", []):
        field_ref = entry.get("valueFrom", {}).get("fieldRef")
        if field_ref is None:
            continue
        if field_ref["fieldPath"] != "status.podIP":
            raise PlanError(f"{where}: fieldRef {field_ref['fieldPath']} is not supported here")
        entry.pop("valueFrom")
        entry["value"] = ip
    env = _environment(container, config_maps)
    for key in ("command", "args"):
        if key in container:
            container[key] = [expand(str(arg), env) for arg in container[key]]
    for key in PROBES:
        container.pop(key, None)
    container.pop("ports", None)
