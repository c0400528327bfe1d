"""What `make deploy-smoke` hands to `podman kube play`, checked without podman: the README's
single-node install (values-local.yaml) renders, and its manifests become pods with fixed
addresses, Services become host aliases, probes are kept for the smoke run to perform, and what
podman cannot do is refused."""

from __future__ import annotations

import base64
import copy
import json
import re

import pytest

from tests.deploy.chart_support import NAMESPACE, REQUIRED, merged, readme_local_install
from tests.deploy.chart_support import render as render_chart
from tests.deploy.kube_play import PlanError, expand, plan, podman_secret

ADDRESSES = [f"10.77.0.{i}" for i in range(10, 20)]


@pytest.fixture(scope="module")
def install():
    """The README's single-node `helm install`, as `make deploy-smoke` runs it."""
    return readme_local_install()


@pytest.fixture(scope="module")
def local(chart, install):
    return render_chart(chart, install.values(), install.release, install.namespace)


@pytest.fixture(scope="module")
def local_plan(local, install):
    return plan(local.docs, ADDRESSES, install.namespace)


def _deployment(docs, name):
    (found,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    return found


def test_every_deployment_gets_an_address_and_the_rest_is_said(local_plan, install):
    assert list(local_plan.pods) == [
        "rlhf-broker",
        "rlhf-feedback",
        "rlhf-generation",
        "rlhf-reward",
        "rlhf-trainer-ppo",
        "rlhf-trainer-reward",
    ]
    assert list(local_plan.pods.values()) == ADDRESSES[:6]
    assert {d["kind"] for d in local_plan.manifests} == {
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
    }
    notes = "\n".join(local_plan.notes)
    assert "NetworkPolicy/rlhf-broker: left out" in notes
    assert "ServiceAccount/rlhf-workload: left out" in notes
    assert "Secret/rlhf-keys: created with `podman secret create`" in notes
    keys = local_plan.secrets["rlhf-keys"]
    # The README's `$(openssl rand -hex 32)`, filled in as the shell would.
    generated = install.values()["secrets"]["generationIdKey"]
    assert re.fullmatch(r"[0-9a-f]{64}", generated)
    assert keys["generation-id-key"] == generated.encode()


def test_services_become_host_aliases_of_the_pod_they_select(local_plan, install):
    broker_ip = local_plan.pods["rlhf-broker"]
    reward_ip = local_plan.pods["rlhf-reward"]
    assert (
        local_plan.address("rlhf-generation", "grpc")
        == f"{local_plan.pods['rlhf-generation']}:50051"
    )
    assert local_plan.address("rlhf-feedback", "http") == f"{local_plan.pods['rlhf-feedback']}:8081"
    assert local_plan.address("rlhf-broker", "kafka") == f"{broker_ip}:9092"
    for deployment in (d for d in local_plan.manifests if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        aliases = {name: a["ip"] for a in pod["hostAliases"] for name in a["hostnames"]}
        # The names the chart's settings use (RLHF_KAFKA_BOOTSTRAP, RLHF_REWARD_ADDRESS).
        assert aliases[f"rlhf-broker.{install.namespace}.svc"] == broker_ip
        assert aliases[f"rlhf-reward.{install.namespace}.svc"] == reward_ip
        assert aliases["rlhf-reward"] == reward_ip
        for container in pod["containers"]:
            assert "ports" not in container
            assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(container)


def test_the_kubelets_expansions_are_filled_in(local_plan):
    broker = _deployment(local_plan.manifests, "rlhf-broker")
    (container,) = broker["spec"]["template"]["spec"]["containers"]
    ip = local_plan.pods["rlhf-broker"]
    assert container["args"] == ["broker", f"--host={ip}", "--port=9092", "--partitions=3"]
    assert container["env"] == [{"name": "POD_IP", "value": ip}]


def test_probes_are_kept_for_the_smoke_run(local_plan):
    probes = {(p.deployment, p.kind): p for p in local_plan.probes}
    startup = probes[("rlhf-generation", "startup")]
    assert (startup.action, startup.port, startup.budget) == ("grpc", 50051, 600.0)
    assert probes[("rlhf-trainer-ppo", "readiness")].port == 50054
    broker = probes[("rlhf-broker", "readiness")]
    assert (broker.action, broker.port) == ("tcp", 9092)  # a named port, resolved
    assert ("rlhf-broker", "startup") not in probes


def _broken(local, change):
    docs = copy.deepcopy(local.docs)
    change(docs)
    return docs


def test_a_probe_on_a_port_the_container_lacks_is_refused(local):
    def rename(docs):
        broker = _deployment(docs, "rlhf-broker")
        broker["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["tcpSocket"][
            "port"
        ] = "kafak"

    with pytest.raises(PlanError, match="rlhf-broker readinessProbe: container broker has no port"):
        plan(_broken(local, rename), ADDRESSES, "rlhf")


def test_a_service_that_cannot_reach_its_pod_is_refused(local):
    def target(docs):
        (service,) = [
            d for d in docs if d["metadata"]["name"] == "rlhf-reward" and d["kind"] == "Service"
        ]
        service["spec"]["ports"][0]["targetPort"] = "rpc"

    with pytest.raises(PlanError, match="Service/rlhf-reward port grpc: container reward has no"):
        plan(_broken(local, target), ADDRESSES, NAMESPACE)

    def selector(docs):
        (service,) = [
            d for d in docs if d["metadata"]["name"] == "rlhf-reward" and d["kind"] == "Service"
        ]
        service["spec"]["selector"]["app.kubernetes.io/component"] = "rewards"

    with pytest.raises(PlanError, match="Service/rlhf-reward selects 0 Deployments"):
        plan(_broken(local, selector), ADDRESSES, NAMESPACE)

    def remap(docs):
        (service,) = [
            d for d in docs if d["metadata"]["name"] == "rlhf-reward" and d["kind"] == "Service"
        ]
        service["spec"]["ports"][0]["port"] = 80

    with pytest.raises(PlanError, match="maps port 80 to 50053"):
        plan(_broken(local, remap), ADDRESSES, NAMESPACE)


def test_what_podman_cannot_run_is_refused(chart, local):
    def scale(docs):
        _deployment(docs, "rlhf-feedback")["spec"]["replicas"] = 2

    with pytest.raises(PlanError, match="rlhf-feedback has 2 replicas"):
        plan(_broken(local, scale), ADDRESSES, NAMESPACE)
    # The default values' topics Job (a Helm hook) is not silently skipped.
    default = render_chart(chart, merged(REQUIRED))
    with pytest.raises(PlanError, match="Job/rlhf-topics: podman kube play cannot run it"):
        plan(default.docs, ADDRESSES, NAMESPACE)
    with pytest.raises(PlanError, match="6 Deployments but 2 addresses"):
        plan(local.docs, ADDRESSES[:2], NAMESPACE)


def test_expansion_follows_the_kubelet():
    env = {"POD_IP": "10.0.0.3", "PORT": "9092"}
    assert expand("--host=$(POD_IP):$(PORT)", env) == "--host=10.0.0.3:9092"
    assert expand("$(UNKNOWN) stays", env) == "$(UNKNOWN) stays"
    assert expand("$$(POD_IP) is escaped", env) == "$(POD_IP) is escaped"


def test_podman_secrets_are_json_of_base64_values():
    data = {"b": b"\x00binary", "a": b"text=with=equals"}
    decoded = json.loads(podman_secret(data))
    assert {k: base64.b64decode(v) for k, v in decoded.items()} == data
