"""The Helm chart, rendered offline with Helm's own Go SDK (helm-python-sdk), linted, and every
manifest validated against the Kubernetes schemas of the oldest and newest supported versions
(kubernetes-validate --strict). Then what operators rely on, asserted on the rendered objects."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from rlhf.config import describe, load_config
from services.feedback.config import FeedbackConfig
from services.generation.config import GenerationConfig
from services.reward.config import RewardConfig
from services.simulated_users.config import SimulatedUsersConfig
from services.trainer.config import STAGES, TrainerConfig
from tests.deploy.chart_support import (
    API_KEY,
    CHART,
    CRD_KINDS,
    EVERYTHING,
    ID_KEY,
    INLINE_SECRETS,
    KUBE_VERSIONS,
    METRICS_KEY,
    NAMESPACE,
    OPERATOR_KEY,
    REQUIRED,
    ROOT,
    RULES,
    SERVICE_KEY,
    SFT_PHASE,
    component,
    exported_metrics,
    gpu_values,
    invalid,
    local_values,
    merged,
    render,
    stage,
)

CONFIGS = {
    "generation": GenerationConfig,
    "feedback": FeedbackConfig,
    "reward": RewardConfig,
    "trainer": TrainerConfig,
    "simulated-users": SimulatedUsersConfig,
}
# A series name in PromQL (not a label value such as name="objective/rlhf_reward").
METRIC = r"(?<![\w/])rlhf_[a-z0-9_]+"
VALUE_SETS = {
    "defaults": lambda: merged(REQUIRED),
    "gpu": lambda: merged(gpu_values(), REQUIRED, INLINE_SECRETS),
    "everything": lambda: merged(REQUIRED, INLINE_SECRETS, EVERYTHING),
    "local": lambda: merged(local_values(), INLINE_SECRETS),
    # Canaries: generation serves releases, the release stage decides them.
    "canary": lambda: merged(
        REQUIRED,
        {
            "generation": {"releases": True},
            "trainer": {"stages": {"release": {"enabled": True, "canary": {"share": 0.25}}}},
        },
    ),
}


@pytest.fixture(scope="module")
def renders(chart):
    """Each value set rendered once for the whole module."""
    return {name: render(chart, values()) for name, values in VALUE_SETS.items()}


@pytest.fixture(scope="module")
def default(renders):
    return renders["defaults"]


@pytest.fixture(scope="module")
def gpu(renders):
    return renders["gpu"]


@pytest.fixture(scope="module")
def everything(renders):
    return renders["everything"]


@pytest.fixture(scope="module")
def local(renders):
    return renders["local"]


@pytest.fixture(scope="module")
def canary(renders):
    return renders["canary"]


def test_render_is_fast(chart):
    start = time.perf_counter()
    render(chart, merged(gpu_values(), REQUIRED, INLINE_SECRETS))
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_helm_lint_is_clean(values, kube_version):
    report = helm.lint(
        CHART,
        VALUE_SETS[values](),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{kube_version}",
    )
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 1 is information ("icon is recommended"); warnings and errors are not allowed.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_every_manifest_is_valid_kubernetes(renders, values, kube_version):
    errors, unchecked = invalid(renders[values].docs, kube_version)
    assert errors == []
    assert unchecked <= CRD_KINDS  # only custom resources lack a schema


def test_kubernetes_validate_cli_strict(gpu, tmp_path):
    """The same check through the command operators would run."""
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(yaml.safe_dump_all(gpu.docs))
    for version in KUBE_VERSIONS:
        result = subprocess.run(
            [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
            + ["-k", version, str(manifests)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_one_deployment_per_service_and_stage(default, everything, canary):
    assert default.names("Deployment") == {
        "rlhf-generation",
        "rlhf-feedback",
        "rlhf-reward",
        "rlhf-trainer-ppo",
        "rlhf-trainer-reward",
    }
    # The sft stage replaces ppo (both publish policy versions).
    without_ppo = default.names("Deployment") - {"rlhf-trainer-ppo"}
    added = {"rlhf-trainer-sft", "rlhf-simulated-users"}
    assert everything.names("Deployment") == without_ppo | added
    # A Deployment for every stage the trainer has.
    stages = {stage(d) for r in (default, everything, canary) for d in r.kind("Deployment")}
    assert stages - {None} == set(STAGES)
    images = set()
    for deployment, container in everything.deployments():
        images.add(container["image"])
        assert container["args"][0] == component(deployment)
        if component(deployment) == "trainer":
            assert everything.env(deployment)["RLHF_TRAINER_STAGE"] == stage(deployment)
            assert deployment["spec"]["replicas"] == 1
            assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert images == {"rlhf-platform:0.1.0"}  # one image for every service


def test_probes_use_grpc_health_on_the_grpc_port(everything):
    for deployment, container in everything.deployments():
        if component(deployment) == "simulated-users":
            assert "readinessProbe" not in container  # a client, no server to probe
            continue
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert int(everything.env(deployment)["RLHF_GRPC_PORT"]) == ports["grpc"]
        assert int(everything.env(deployment)["RLHF_METRICS_PORT"]) == ports["metrics"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": ports["grpc"]}, (deployment, probe)
        spec = deployment["spec"]["template"]["spec"]
        grace = float(everything.env(deployment)["RLHF_SHUTDOWN_GRACE_SECONDS"])
        assert spec["terminationGracePeriodSeconds"] > grace


def test_services_have_named_grpc_metrics_and_http_ports(everything):
    expected = {
        "rlhf-generation": {"grpc", "metrics", "http"},
        "rlhf-feedback": {"grpc", "metrics", "http"},
        "rlhf-reward": {"grpc", "metrics"},
        "rlhf-trainer-reward": {"grpc", "metrics"},
        "rlhf-trainer-sft": {"grpc", "metrics"},
    }
    assert everything.names("Service") == set(expected)
    for name, ports in expected.items():
        service = everything.get("Service", name)
        deployment = everything.get("Deployment", name)
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert {p["name"] for p in service["spec"]["ports"]} == ports
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        declared = {p["name"] for p in container["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= declared
    generation = everything.env(everything.get("Deployment", "rlhf-generation"))
    feedback = everything.env(everything.get("Deployment", "rlhf-feedback"))
    assert generation["RLHF_HTTP_PORT"] == "8080"
    assert feedback["RLHF_FEEDBACK_HTTP_PORT"] == "8081"


def test_every_container_has_resources(everything):
    for deployment, container in everything.deployments():
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), deployment["metadata"]["name"]
        assert "memory" in resources["limits"], deployment["metadata"]["name"]
    (job,) = everything.kind("Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]


def test_pods_run_non_root_on_a_read_only_root_filesystem(everything):
    pods = [d["spec"]["template"]["spec"] for d in everything.kind("Deployment")]
    pods += [j["spec"]["template"]["spec"] for j in everything.kind("Job")]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        if container["name"] != "topics":
            assert "emptyDir" in volumes[mounts["/home/rlhf/.cache"]]
    # Only generation with the TGI rollout talks to the Kubernetes API.
    tokens = {
        d["metadata"]["name"]
        for d in everything.kind("Deployment")
        if d["spec"]["template"]["spec"]["automountServiceAccountToken"]
    }
    assert tokens == {"rlhf-generation"}


def test_gpu_values_put_trainer_and_generation_on_gpu_nodes(gpu, default):
    on_gpu = {"rlhf-generation", "rlhf-trainer-ppo", "rlhf-trainer-reward"}
    for deployment, container in gpu.deployments():
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        limits = container["resources"]["limits"]
        if name in on_gpu:
            assert limits["nvidia.com/gpu"] == 1, name
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                "tolerations"
            ]
            assert container["image"] == "rlhf-platform:0.1.0-cuda"
        else:
            assert "nvidia.com/gpu" not in limits, name
            assert pod["nodeSelector"] == {"pool": "cpu"}, name
            assert "tolerations" not in pod
            assert container["image"] == "rlhf-platform:0.1.0"
    for _, container in default.deployments():
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert not container["image"].endswith("-cuda")


def test_topic_job_runs_before_the_services(default):
    job = default.get("Job", "rlhf-topics")
    hooks = job["metadata"]["annotations"]
    assert set(hooks["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in hooks["helm.sh/hook-delete-policy"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == [
        "topics",
        "--partitions=6",
        "--replication-factor=3",
        "--min-insync-replicas=2",
        "--retention-ms=604800000",
        "--dead-letter-retention-ms=2592000000",
        "--timeout=300",
    ]
    assert container["env"] == [
        {"name": "RLHF_KAFKA_BOOTSTRAP", "value": REQUIRED["externalKafka"]["bootstrapServers"]},
        {"name": "RLHF_KAFKA_SECURITY_PROTOCOL", "value": "PLAINTEXT"},
    ]
    # The job's arguments are the CLI's own.
    from rlhf.topics_cli import _parser

    parsed = _parser().parse_args(container["args"][1:])
    assert (parsed.partitions, parsed.replication_factor) == (6, 3)


def test_checkpoint_store_is_a_shared_volume(default, everything):
    (pvc,) = default.kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for rendered, claim in ((default, pvc["metadata"]["name"]), (everything, "shared-checkpoints")):
        for deployment, container in rendered.deployments():
            pod = deployment["spec"]["template"]["spec"]
            volumes = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod["volumes"]
                if "persistentVolumeClaim" in v
            }
            mounts = [m for m in container["volumeMounts"] if m["name"] in volumes]
            kind = component(deployment)
            if kind in ("feedback", "simulated-users"):
                assert not mounts
                continue
            (mount,) = mounts
            assert volumes[mount["name"]] == claim
            assert rendered.env(deployment)["RLHF_CHECKPOINT_DIR"] == mount["mountPath"]
            # Trainers write checkpoints; serving pods only read them.
            assert mount["readOnly"] is (kind != "trainer"), deployment["metadata"]["name"]
    assert not everything.kind("PersistentVolumeClaim")  # existingClaim: none created


def test_keys_come_from_the_secret(default, gpu):
    assert not default.kind("Secret")  # existingSecret: the chart creates none
    secret = gpu.get("Secret", "rlhf-keys")
    assert secret["stringData"]["generation-id-key"] == ID_KEY
    assert secret["stringData"]["feedback-api-keys"].split(",")[0] == f"app={API_KEY}"
    for rendered, name in ((default, REQUIRED["secrets"]["existingSecret"]), (gpu, "rlhf-keys")):
        for deployment, _ in rendered.deployments():
            env = rendered.env(deployment)
            wanted = {"generation": {"RLHF_GENERATION_ID_KEY"}}
            wanted["feedback"] = {"RLHF_GENERATION_ID_KEY", "RLHF_FEEDBACK_API_KEYS"}
            for variable in wanted.get(component(deployment), ()):
                assert env[variable]["secretKeyRef"]["name"] == name
    # No key ends up in a ConfigMap.
    for config_map in gpu.kind("ConfigMap"):
        text = json.dumps(config_map)
        assert ID_KEY not in text and API_KEY not in text


SERVERS = ("generation", "feedback", "reward", "trainer")


def test_secure_by_default(default, everything):
    """Every server binds the pod's interfaces and accepts the service, operator and reader
    keys; generation needs an app key; /metrics needs a reader key, which the ServiceMonitor
    presents; the trainer presents the service key; keys only ever come from the Secret."""
    for rendered in (default, everything):
        for deployment, _ in rendered.deployments():
            env = rendered.env(deployment)
            if component(deployment) not in SERVERS:
                assert "RLHF_GRPC_HOST" not in env
                continue
            assert env["RLHF_GRPC_HOST"] == "0.0.0.0" and env["RLHF_METRICS_OPEN"] == "false"
            for variable, key in (
                ("RLHF_SERVICE_KEYS", "service-keys"),
                ("RLHF_OPERATOR_KEYS", "operator-keys"),
                ("RLHF_READER_KEYS", "reader-keys"),
            ):
                assert env[variable]["secretKeyRef"]["key"] == key
            if component(deployment) == "generation":
                assert env["RLHF_GENERATION_OPEN"] == "false"
                assert env["RLHF_GENERATION_RELEASES"] == "false"
                assert env["RLHF_GENERATION_API_KEYS"]["secretKeyRef"]["key"] == (
                    "feedback-api-keys"
                )
            if component(deployment) == "trainer":
                assert env["RLHF_CLIENT_KEY"]["secretKeyRef"]["key"] == "client-key"
    # A Secret of the operator's own may leave out the optional lists.
    generation = default.env(default.get("Deployment", "rlhf-generation"))
    assert generation["RLHF_OPERATOR_KEYS"]["secretKeyRef"]["optional"] is True
    assert "optional" not in generation["RLHF_SERVICE_KEYS"]["secretKeyRef"]
    stored = everything.get("Secret", "rlhf-keys")["stringData"]
    assert stored["service-keys"] == f"trainer={SERVICE_KEY}" == f"trainer={stored['client-key']}"
    assert stored["reader-keys"] == f"prometheus={METRICS_KEY}"
    assert stored["operator-keys"] == f"ops={OPERATOR_KEY}"
    (endpoint,) = everything.get("ServiceMonitor", "rlhf")["spec"]["endpoints"]
    assert endpoint["authorization"]["credentials"] == {"name": "rlhf-keys", "key": "metrics-key"}
    assert stored["metrics-key"] == METRICS_KEY and "scheme" not in endpoint


TLS = {"tls": {"enabled": True, "secretName": "rlhf-tls", "serverName": "rlhf.internal"}}
KAFKA_SASL_SSL = {
    "externalKafka": {
        "securityProtocol": "SASL_SSL",
        "sasl": {"username": "rlhf", "passwordSecret": {"name": "kafka-user", "key": "password"}},
        "ssl": {"caSecret": {"name": "kafka-ca"}, "clientCertSecret": "kafka-client"},
    }
}


def test_tls_turns_on_mutual_tls_everywhere_with_plaintext_health_probes(chart):
    rendered = render(chart, merged(REQUIRED, INLINE_SECRETS, EVERYTHING, TLS))
    for deployment, container in rendered.deployments():
        env = rendered.env(deployment)
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert volumes["tls"]["secret"] == {"secretName": "rlhf-tls"}
        assert mounts["tls"]["readOnly"] is True
        assert env["RLHF_TLS_CA_FILE"] == mounts["tls"]["mountPath"] + "/ca.crt"
        assert env["RLHF_TLS_CERT_FILE"].endswith("tls.crt")
        assert env["RLHF_TLS_CLIENT_AUTH"] == "true"
        assert env["RLHF_TLS_SERVER_NAME"] == "rlhf.internal"
        if component(deployment) == "simulated-users":  # a client: certificate and CA only
            assert "RLHF_HEALTH_PORT" not in env
            load_config(SimulatedUsersConfig, rendered.environ(deployment["spec"]["template"]))
            continue
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert int(env["RLHF_HEALTH_PORT"]) == ports["health"] == 8086
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": ports["health"]}
    (endpoint,) = rendered.get("ServiceMonitor", "rlhf")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["cert"]["secret"] == {"name": "rlhf-tls", "key": "tls.crt"}
    assert endpoint["tlsConfig"]["serverName"] == "rlhf.internal"
    for kube_version in KUBE_VERSIONS:
        assert invalid(rendered.docs, kube_version)[0] == []


def test_kafka_sasl_and_tls_reach_every_kafka_client(chart):
    rendered = render(chart, merged(REQUIRED, INLINE_SECRETS, KAFKA_SASL_SSL))
    job = rendered.get("Job", "rlhf-topics")
    templates = [job["spec"]["template"]] + [
        d["spec"]["template"] for d, _ in rendered.deployments()
    ]
    for template in templates:
        (container,) = template["spec"]["containers"]
        env = rendered.pod_env(template)
        assert env["RLHF_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert env["RLHF_KAFKA_SASL_USERNAME"] == "rlhf"
        assert env["RLHF_KAFKA_SASL_PASSWORD"]["secretKeyRef"] == {
            "name": "kafka-user",
            "key": "password",
        }
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["RLHF_KAFKA_SSL_CA_FILE"] == mounts["kafka-ca"] + "/ca.crt"
        assert env["RLHF_KAFKA_SSL_CERT_FILE"] == mounts["kafka-client"] + "/tls.crt"
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["kafka-ca"]["secret"]["secretName"] == "kafka-ca"
    # What the services make of it (the files exist only in a pod: checked up to them).
    from rlhf.config import KafkaSettings

    settings = KafkaSettings(
        security_protocol="SASL_SSL", sasl_username="rlhf", sasl_password="secret"
    )
    settings.validate()
    assert settings.client_options()["sasl_plain_username"] == "rlhf"
    for kube_version in KUBE_VERSIONS:
        assert invalid(rendered.docs, kube_version)[0] == []


def _environ(rendered, deployment):
    """What the container's process would see, secrets resolved."""
    return rendered.environ(deployment["spec"]["template"])


def test_the_release_stage_decides_what_generation_serves(canary):
    release = canary.env(canary.get("Deployment", "rlhf-trainer-release"))
    assert release["RLHF_TRAINER_STAGE"] == "release"
    assert float(release["RLHF_CANARY_SHARE"]) == 0.25
    assert int(release["RLHF_RELEASE_MIN_THUMBS"]) == 100
    # The gate scores on the reward service with the service key, against the ppo reference.
    assert release["RLHF_RELEASE_GATE"] == "true"
    assert float(release["RLHF_RELEASE_GATE_REPETITION_TOLERANCE"]) == 0.1
    assert float(release["RLHF_RELEASE_GATE_MAX_KL"]) == 0.0
    assert release["RLHF_REWARD_ADDRESS"].endswith(":50053") and release["RLHF_CLIENT_KEY"]
    generation = canary.env(canary.get("Deployment", "rlhf-generation"))
    assert generation["RLHF_GENERATION_RELEASES"] == "true"


@pytest.mark.parametrize("values", ["gpu", "everything", "local", "canary"])
def test_services_accept_the_environment_the_chart_gives_them(renders, values):
    """Every RLHF_* variable is a real setting of that service, secret settings come from the
    Secret, and the service's own config validation accepts the values."""
    rendered = renders[values]
    for deployment, _ in rendered.deployments():
        if component(deployment) == "broker":  # command-line flags, no settings (below)
            continue
        cls = CONFIGS[component(deployment)]
        settings = {row[0]: row for row in describe(cls)}
        secret = {env for env, _, shown, _ in settings.values() if shown == "(secret)"}
        env = rendered.env(deployment)
        for variable, value in env.items():
            if variable.startswith("RLHF_"):
                assert variable in settings, f"{deployment['metadata']['name']}: {variable}"
            if variable in secret:
                assert isinstance(value, dict) and "secretKeyRef" in value, variable
        load_config(cls, _environ(rendered, deployment))  # raises ConfigError if refused


def test_trainer_reaches_the_reward_service(default):
    env = default.env(default.get("Deployment", "rlhf-trainer-ppo"))
    host, port = env["RLHF_REWARD_ADDRESS"].rsplit(":", 1)
    assert host == f"rlhf-reward.{NAMESPACE}.svc"
    reward = default.get("Service", "rlhf-reward")
    assert int(port) in {p["port"] for p in reward["spec"]["ports"] if p["name"] == "grpc"}


def _trainer_config(rendered, name):
    deployment = rendered.get("Deployment", name)
    return deployment, load_config(TrainerConfig, _environ(rendered, deployment))


def _mount_of(deployment, path):
    """The container's volume mount holding `path`, and the pod volume behind it."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        if path.is_relative_to(mount["mountPath"]):
            return mount, volumes[mount["name"]]
    raise AssertionError(f"{path} is on no volume of {deployment['metadata']['name']}")


def test_sft_demonstrations_from_a_config_map(everything):
    deployment, config = _trainer_config(everything, "rlhf-trainer-sft")
    data = Path(config.sft.data)
    mount, volume = _mount_of(deployment, data)
    assert mount["readOnly"] is True
    assert volume["configMap"] == {
        "name": "sft-demos",
        "items": [{"key": "demonstrations.jsonl", "path": "demonstrations.jsonl"}],
    }
    assert data == Path(mount["mountPath"], "demonstrations.jsonl")


def test_sft_demonstrations_from_the_checkpoint_volume(chart):
    on_volume = {"demonstrations": {"configMap": "", "checkpointPath": "sft/demos.jsonl"}}
    rendered = render(
        chart,
        merged(REQUIRED, SFT_PHASE, {"trainer": {"stages": {"sft": on_volume}}}),
    )
    deployment, config = _trainer_config(rendered, "rlhf-trainer-sft")
    mount, volume = _mount_of(deployment, Path(config.sft.data))
    assert "persistentVolumeClaim" in volume
    assert Path(config.sft.data) == config.checkpoint_dir / "sft" / "demos.jsonl"
    assert mount["mountPath"] == str(config.checkpoint_dir)


def test_sft_without_demonstrations_trains_on_corrections_only(chart):
    corrections_only = {"trainer": {"stages": {"sft": {"demonstrations": {"configMap": ""}}}}}
    rendered = render(chart, merged(REQUIRED, SFT_PHASE, corrections_only))
    deployment, config = _trainer_config(rendered, "rlhf-trainer-sft")
    assert config.sft.data == ""
    pod = deployment["spec"]["template"]["spec"]
    assert "demonstrations" not in {v["name"] for v in pod["volumes"]}


def test_ppo_trains_every_weight_and_logs_metrics_on_the_shared_volume(default, gpu):
    for rendered in (default, gpu):
        deployment, config = _trainer_config(rendered, "rlhf-trainer-ppo")
        assert config.ppo.lora.rank == 0  # full fine-tuning; LoRA is an opt-in for CPU clusters
        # The JSONL metrics log goes to <checkpoint dir>/logs/, on the writable shared volume.
        log = config.metrics_log_path()
        assert log == config.checkpoint_dir / "logs" / "ppo.jsonl"
        mount, volume = _mount_of(deployment, log)
        assert mount["readOnly"] is False and "persistentVolumeClaim" in volume


def test_gpu_values_put_the_sft_stage_on_a_gpu(chart):
    rendered = render(chart, merged(gpu_values(), REQUIRED, SFT_PHASE))
    deployment = rendered.get("Deployment", "rlhf-trainer-sft")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-cuda")
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.present": "true"
    }


def test_autoscaling_and_disruption_budgets(default):
    hpas = {h["metadata"]["name"]: h for h in default.kind("HorizontalPodAutoscaler")}
    assert set(hpas) == {"rlhf-generation", "rlhf-reward", "rlhf-feedback"}
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        # The HPA owns the replica count: the Deployment must not reset it on upgrades.
        assert "replicas" not in default.get("Deployment", name)["spec"]
    pdbs = {p["metadata"]["name"]: p for p in default.kind("PodDisruptionBudget")}
    # Not for reward (minReplicas 1) nor the single-pod trainers: it would block node drains.
    assert set(pdbs) == {"rlhf-generation", "rlhf-feedback"}
    for name, pdb in pdbs.items():
        assert pdb["spec"]["maxUnavailable"] == 1
        selector = default.get("Deployment", name)["spec"]["selector"]
        assert pdb["spec"]["selector"] == selector


def test_network_policies(default, everything):
    policies = {p["metadata"]["name"]: p for p in default.kind("NetworkPolicy")}
    assert set(policies) == {"rlhf-generation", "rlhf-feedback", "rlhf-reward", "rlhf-trainer"}
    reward_grpc = policies["rlhf-reward"]["spec"]["ingress"][0]
    (peer,) = reward_grpc["from"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    trainer_grpc = policies["rlhf-trainer"]["spec"]["ingress"][0]
    assert trainer_grpc["from"][0]["podSelector"]["matchLabels"]["rlhf.io/trainer-client"]
    # Every pod a policy selects exists (selectors match the Deployments' labels).
    for policy in policies.values():
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in default.kind("Deployment")
        )
    # With restricted clients, the simulated users may still call generation.
    generation = {p["metadata"]["name"]: p for p in everything.kind("NetworkPolicy")}
    peers = generation["rlhf-generation"]["spec"]["ingress"][0]["from"]
    components = [p.get("podSelector", {}).get("matchLabels", {}) for p in peers]
    assert {"app.kubernetes.io/component": "simulated-users"}.items() <= components[-1].items()


def test_local_values_run_every_workload_once_on_the_development_broker(local, default):
    """values-local.yaml: what `make deploy-smoke` starts with podman, and what a one-node
    cluster gets from the README's command."""
    names = {"broker", "generation", "feedback", "reward", "trainer-ppo", "trainer-reward"}
    assert local.names("Deployment") == {f"rlhf-{n}" for n in names}
    for deployment, container in local.deployments():
        assert deployment["spec"]["replicas"] == 1
        assert container["image"] == "localhost/rlhf-platform:0.1.0"
        assert container["imagePullPolicy"] == "Never"
    # No autoscaler, no budget on single pods, no topics Job: the broker creates its topics.
    assert not local.kind("HorizontalPodAutoscaler") and not local.kind("PodDisruptionBudget")
    assert not local.kind("Job")
    assert default.names("Deployment").isdisjoint({"rlhf-broker"})
    (pvc,) = local.kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Requests fit a 2-core node.
    millicores = 0
    for _, container in local.deployments():
        cpu = str(container["resources"]["requests"]["cpu"])
        millicores += int(cpu[:-1]) if cpu.endswith("m") else int(float(cpu) * 1000)
    assert millicores <= 1800, millicores

    broker = local.get("Deployment", "rlhf-broker")
    pod = broker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert broker["spec"]["strategy"] == {"type": "Recreate"}
    assert container["args"] == ["broker", "--host=$(POD_IP)", "--port=9092", "--partitions=3"]
    assert container["env"] == [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    ]
    # The arguments are the broker command's own.
    from rlhf.broker import _parse_args

    parsed = _parse_args([a.replace("$(POD_IP)", "10.0.0.7") for a in container["args"][1:]])
    assert (parsed.host, parsed.port, parsed.partitions) == ("10.0.0.7", 9092, 3)
    assert container["readinessProbe"]["tcpSocket"] == {"port": "kafka"}
    assert container["ports"] == [{"name": "kafka", "containerPort": 9092, "protocol": "TCP"}]
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = local.get("Service", "rlhf-broker")
    assert service["spec"]["ports"] == [
        {"name": "kafka", "port": 9092, "targetPort": "kafka", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"].items() <= pod_labels(broker).items()
    for deployment, _ in local.deployments():
        if deployment is not broker:
            env = local.env(deployment)
            assert env["RLHF_KAFKA_BOOTSTRAP"] == f"rlhf-broker.{NAMESPACE}.svc:9092"
    # Only this release's pods reach it.
    policy = local.get("NetworkPolicy", "rlhf-broker")
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "rlhf",
        "app.kubernetes.io/instance": "rlhf",
    }
    assert "on the development broker" in local.notes


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_tgi_backend_gets_exactly_the_rbac_its_rollout_needs(default, everything):
    assert not default.kind("Role") and not default.kind("RoleBinding")
    role = everything.get("Role", "rlhf-generation-tgi-rollout")
    assert role["metadata"]["namespace"] == "serving"
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["tgi"],
            "verbs": ["patch"],
        }
    ]
    binding = everything.get("RoleBinding", "rlhf-generation-tgi-rollout")
    (subject,) = binding["subjects"]
    generation = everything.get("Deployment", "rlhf-generation")
    assert subject["name"] == generation["spec"]["template"]["spec"]["serviceAccountName"]
    assert subject["namespace"] == NAMESPACE
    env = everything.env(generation)
    assert (env["RLHF_TGI_DEPLOYMENT"], env["RLHF_TGI_NAMESPACE"]) == ("tgi", "serving")


def test_prometheus_rule_carries_the_tested_alert_rules(everything):
    chart_copy = CHART / "files" / "rules.yml"
    assert chart_copy.read_bytes() == RULES.read_bytes(), (
        "deploy/helm/rlhf/files/rules.yml must be a copy of deploy/prometheus/rules.yml: "
        "cp deploy/prometheus/rules.yml deploy/helm/rlhf/files/rules.yml"
    )
    (rule,) = everything.kind("PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"RewardLiveMeanShift", "ThumbsUpRateDrop", "RewardHackingSuspected"} <= alerts


def test_service_monitor_scrapes_every_metrics_port(everything):
    (monitor,) = everything.kind("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s for s in everything.kind("Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert {s["metadata"]["name"] for s in selected} == everything.names("Service")
    assert all("metrics" in {p["name"] for p in s["spec"]["ports"]} for s in selected)


def test_grafana_dashboard_uses_metrics_that_exist(default):
    config_map = default.get("ConfigMap", "rlhf-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["rlhf.json"])
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in (
        "Thumbs-up rate by policy version",
        "KL to the reference policy",
        "Reload events",
        "Canary: candidate minus incumbent thumbs-up rate",
        "Release gate: candidates compared before their canary",
    ):
        assert wanted in titles
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    known = exported_metrics()
    used = {m for e in exprs for m in re.findall(METRIC, e)}
    assert used and used <= known, sorted(used - known)
    rules = yaml.safe_load(RULES.read_text())["groups"]
    rules_used = {m for g in rules for r in g["rules"] for m in re.findall(METRIC, r["expr"])}
    assert rules_used <= known, sorted(rules_used - known)
    # Reward, thumbs-up rate per policy version, KL, throughput, latency and reloads are shown.
    for metric in (
        "rlhf_reward_live_sum",
        "rlhf_feedback_thumbs_total",
        "rlhf_release_canary_difference",
        "rlhf_release_gate_refusals_total",
        "rlhf_trainer_stat",
        "rlhf_generation_tokens_total",
        "rlhf_grpc_request_seconds_bucket",
        "rlhf_reward_forward_seconds_bucket",
        "rlhf_checkpoint_reloads_total",
    ):
        assert metric in used


BAD_VALUES = {
    "negative replicas": (
        {"generation": {"replicas": -1}},
        "at '/generation/replicas': minimum: got -1, want 0",
    ),
    "unknown gpu type": (
        {"trainer": {"stages": {"ppo": {"gpu": {"count": 1, "resource": "amd.com/gpu"}}}}},
        "at '/trainer/stages/ppo/gpu/resource': 'amd.com/gpu' does not match pattern",
    ),
    "typo in a key": (
        {"feedback": {"replica": 3}},
        "at '/feedback': additional properties 'replica' not allowed",
    ),
    "bad bootstrap": (
        {"externalKafka": {"bootstrapServers": "kafka"}},
        "at '/externalKafka/bootstrapServers': 'kafka' does not match pattern",
    ),
    "short api key": (
        {"secrets": {"feedbackApiKeys": ["app=short"]}},
        "at '/secrets/feedbackApiKeys/0': 'app=short' does not match pattern",
    ),
    "absolute demonstrations path": (
        {"trainer": {"stages": {"sft": {"demonstrations": {"checkpointPath": "/data/d.jsonl"}}}}},
        "at '/trainer/stages/sft/demonstrations/checkpointPath': '/data/d.jsonl' does not match",
    ),
    "bad cpu quantity": (
        {"reward": {"resources": {"requests": {"cpu": "two"}}}},
        "at '/reward/resources/requests/cpu': 'two' does not match pattern",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_refuses_bad_values_naming_the_key(chart, case):
    override, message = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as refused:
        render(chart, merged(REQUIRED, override))
    assert message in str(refused.value)


REFUSED_BY_TEMPLATES = {
    "no kafka": ({"externalKafka": {"bootstrapServers": ""}}, "externalKafka.bootstrapServers is"),
    "no keys": ({"secrets": {"existingSecret": ""}}, "secrets.generationIdKey is required"),
    "short id key": (
        {"secrets": {"existingSecret": "", "generationIdKey": "too-short", "feedbackApiKeys": []}},
        "secrets.generationIdKey must be at least 16 bytes",
    ),
    "chart-owned setting": (
        {"generation": {"env": {"RLHF_GRPC_PORT": "1"}}},
        "generation.env.RLHF_GRPC_PORT is set by the chart",
    ),
    "secret in plain values": (
        {"feedback": {"env": {"RLHF_FEEDBACK_API_KEYS": "a=b"}}},
        "feedback.env.RLHF_FEEDBACK_API_KEYS is a secret",
    ),
    "no time to drain": (
        {"generation": {"terminationGracePeriodSeconds": 10}},
        "terminationGracePeriodSeconds (10) must exceed",
    ),
    "tgi without url": ({"generation": {"backend": "tgi"}}, "generation.tgi.url is required"),
    "dev broker beside kafka": (
        {"devBroker": {"enabled": True}},
        "devBroker.enabled and externalKafka.bootstrapServers are both set",
    ),
    "tls in plain values": (
        {"feedback": {"env": {"RLHF_TLS_CERT_FILE": "/tls/tls.crt"}}},
        "feedback.env.RLHF_TLS_CERT_FILE is set by the chart from tls.*",
    ),
    "a key in plain values": (
        {"reward": {"env": {"RLHF_OPERATOR_KEYS": "ops=" + "k" * 20}}},
        "reward.env.RLHF_OPERATOR_KEYS is a secret",
    ),
    "no service key": (
        merged(INLINE_SECRETS, {"secrets": {"serviceKey": ""}}),
        "secrets.serviceKey is required",
    ),
    "scraped without a key": (
        merged(
            INLINE_SECRETS,
            {
                "secrets": {"metricsKey": ""},
                "monitoring": {"serviceMonitor": {"enabled": True}},
            },
        ),
        "monitoring.serviceMonitor needs secrets.metricsKey",
    ),
    "tls without a secret": ({"tls": {"enabled": True}}, "tls.enabled needs tls.secretName"),
    "sasl without a user": (
        {"externalKafka": {"securityProtocol": "SASL_SSL"}},
        "needs externalKafka.sasl.username and sasl.passwordSecret.name",
    ),
    "min isr above replication": (
        {"topics": {"replicationFactor": 1}},
        "topics.minInsyncReplicas (2) is above topics.replicationFactor (1)",
    ),
    "ppo without reward": ({"reward": {"enabled": False}}, "enable reward too"),
    "release stage without releases": (
        {"trainer": {"stages": {"release": {"enabled": True}}}},
        "trainer.stages.release decides what generation serves through release events",
    ),
    "releases on tgi": (
        {"generation": {"releases": True, "backend": "tgi", "tgi": {"url": "http://tgi"}}},
        "generation.releases serves an incumbent and a candidate",
    ),
    "sft beside ppo": (
        {"trainer": {"stages": {"sft": {"enabled": True}}}},
        "trainer.stages.sft and trainer.stages.ppo both publish policy versions",
    ),
    "two demonstration sources": (
        merged(
            SFT_PHASE,
            {"trainer": {"stages": {"sft": {"demonstrations": {"checkpointPath": "demos.jsonl"}}}}},
        ),
        "set configMap or checkpointPath, not both",
    ),
    "sft data in env": (
        merged(SFT_PHASE, {"trainer": {"stages": {"sft": {"env": {"RLHF_SFT_DATA": "/x.jsonl"}}}}}),
        "trainer.stages.sft.env.RLHF_SFT_DATA is set by the chart",
    ),
    "hpa bounds": (
        {"feedback": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
        "feedback.autoscaling: minReplicas (5) is above maxReplicas (2)",
    ),
    "simulated users without key": (
        {
            "simulatedUsers": {"enabled": True},
            **merged(INLINE_SECRETS, {"secrets": {"simulatedUsersApiKey": ""}}),
        },
        "simulatedUsers.enabled needs secrets.simulatedUsersApiKey",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BY_TEMPLATES))
def test_inconsistent_values_fail_with_a_clear_message(chart, case):
    override, message = REFUSED_BY_TEMPLATES[case]
    with pytest.raises(helm.HelmError) as refused:
        render(chart, merged(REQUIRED, override))
    assert message in str(refused.value)


def test_schema_file_is_generated_from_make_schema():
    sys.path.insert(0, str(ROOT / "deploy" / "helm"))
    try:
        import make_schema
    finally:
        sys.path.pop(0)
    assert (CHART / "values.schema.json").read_text() == make_schema.render(), (
        "values.schema.json is stale: python deploy/helm/make_schema.py"
    )


def test_chart_version_is_the_project_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart_meta["appVersion"] == project  # the image tag `make images` builds


def test_notes_tell_where_to_connect(default, everything):
    assert f"rlhf-generation.{NAMESPACE}.svc:50051" in default.notes
    assert f"rlhf-feedback.{NAMESPACE}.svc:50052" in default.notes
    # Logs of the trainer stages that run.
    assert "deploy/rlhf-trainer-ppo" in default.notes
    assert "deploy/rlhf-trainer-sft" in everything.notes
    assert "deploy/rlhf-trainer-ppo" not in everything.notes


def test_readme_install_command_renders(chart):
    """The `helm install` of the README's "Deploy on Kubernetes", placeholders filled in."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy on Kubernetes", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"helm install .*?\n```", section, re.S).group(0)
    sets = re.findall(r"--set (.+?)\s*\\?$", command, re.M)
    assert sets, "the README's helm install sets the required values"
    filled = {
        "<your registry>": "registry.example.com/ml",
        "<kafka bootstrap host:port>": "kafka-bootstrap.kafka:9092",
        "<a ReadWriteMany class>": "nfs",
    }
    values: dict = {}
    for expression in sets:
        for placeholder, value in filled.items():
            expression = expression.replace(placeholder, value)
        values = merged(values, helm.parse_set_string(expression))
    rendered = render(chart, values)
    (pvc,) = rendered.kind("PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "nfs"
    for _, container in rendered.deployments():
        assert container["image"].startswith("registry.example.com/ml/rlhf-platform:")


def test_chart_readme_sft_then_ppo_commands_render(chart):
    """The chart README's two `helm upgrade --reuse-values` steps: sft alone, then ppo alone."""
    readme = (ROOT / "deploy" / "helm" / "README.md").read_text()
    commands = re.findall(r"helm upgrade .*?(?=\n\s*(?:#|helm|```))", readme, re.S)
    assert len(commands) == 2
    values = merged(REQUIRED)
    trainers = []
    for command in commands:
        for expression in re.findall(r"--set (\S+)", command):
            values = merged(values, helm.parse_set_string(expression))
        rendered = render(chart, values)
        trainers.append({stage(d) for d in rendered.kind("Deployment") if stage(d)})
    assert trainers == [{"sft", "reward"}, {"ppo", "reward"}]
