"""The PPO trainer on several pods (trainer.stages.ppo.distributed), in both modes: two
StatefulSets, or a Kubeflow PyTorchJob. Rendered, linted and validated like the rest of the chart
(kubernetes-validate cannot know the PyTorchJob CRD: its pod templates are validated, its
structure asserted), then the torchrun command run through torch's own parser and a real c10d
rendezvous, to show the pod the control-plane Service selects is rank 0."""

from __future__ import annotations

import importlib.util
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import helm_python as helm
import pytest
from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
    RendezvousTimeout,
)
from torch.distributed.run import config_from_args, get_args_parser

from rlhf.config import describe, load_config
from services.trainer.config import TrainerConfig
from tests.deploy.chart_support import (
    CHART,
    INLINE_SECRETS,
    KUBE_VERSIONS,
    NAMESPACE,
    REQUIRED,
    ROOT,
    Rendered,
    gpu_values,
    invalid,
    merged,
    pod_templates,
    render,
)

NAME = "rlhf-trainer-ppo"
RENDEZVOUS = f"{NAME}-rdzv"
PORT = 29400
MODES = ("statefulset", "pytorchjob")
STS_POD_NAME = "statefulset.kubernetes.io/pod-name"
KUBEFLOW = "training.kubeflow.org"


def distributed(mode: str, **settings: Any) -> dict[str, Any]:
    ppo = {"distributed": {"enabled": True, "mode": mode, **settings}}
    return {"trainer": {"stages": {"ppo": ppo}}}


def batches_for(ranks: int) -> dict[str, Any]:
    """PPO batch sizes that split over `ranks` (the trainer and the chart refuse others)."""
    env = {"RLHF_PPO_BATCH_SIZE": str(2 * ranks), "RLHF_PPO_MINIBATCH_SIZE": str(ranks)}
    return {"trainer": {"stages": {"ppo": {"env": env}}}}


VALUE_SETS = {
    "statefulset": lambda: merged(REQUIRED, distributed("statefulset")),
    "statefulset-gpu": lambda: merged(
        gpu_values(), REQUIRED, INLINE_SECRETS, distributed("statefulset")
    ),
    "pytorchjob": lambda: merged(REQUIRED, distributed("pytorchjob")),
    "pytorchjob-gpu": lambda: merged(
        gpu_values(), REQUIRED, INLINE_SECRETS, distributed("pytorchjob")
    ),
}


@pytest.fixture(scope="module")
def renders(chart):
    return {name: render(chart, values()) for name, values in VALUE_SETS.items()}


@dataclass
class Pod:
    """A pod the StatefulSet controller or the training operator would create from a template,
    with the labels it adds (what Service selectors see)."""

    name: str
    labels: dict[str, str]
    template: dict[str, Any]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.template["spec"]["containers"]
        return container

    @property
    def role(self) -> str:
        return self.labels["rlhf.io/role"]

    def args(self) -> list[str]:
        """The container's args with $(VAR) expanded from its plain and downward-API env, as
        the kubelet does."""
        env = {}
        for entry in self.container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = entry["value"]
            elif entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[entry["name"]] = self.name
        return [
            re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in self.container["args"]
        ]


def ppo_pods(rendered: Rendered) -> list[Pod]:
    """Every pod of the distributed PPO trainer, the rank-0 ("master") pod first."""
    pods = []
    for sts in rendered.kind("StatefulSet"):
        template = sts["spec"]["template"]
        for ordinal in range(sts["spec"]["replicas"]):
            name = f"{sts['metadata']['name']}-{ordinal}"
            labels = {**template["metadata"]["labels"], STS_POD_NAME: name}
            pods.append(Pod(name, labels, template))
    for job in rendered.kind("PyTorchJob"):
        job_name = job["metadata"]["name"]
        for replica_type, template in pod_templates(job).items():
            count = job["spec"]["pytorchReplicaSpecs"][replica_type]["replicas"]
            for index in range(count):
                kind = replica_type.lower()
                operator_labels = {
                    f"{KUBEFLOW}/job-name": job_name,
                    f"{KUBEFLOW}/replica-type": kind,
                    f"{KUBEFLOW}/replica-index": str(index),
                }
                labels = {**template["metadata"]["labels"], **operator_labels}
                pods.append(Pod(f"{job_name}-{kind}-{index}", labels, template))
    return sorted(pods, key=lambda p: (p.role != "master", p.name))


def selected(selector: dict[str, str], pods: list[Pod]) -> list[str]:
    return [p.name for p in pods if selector.items() <= p.labels.items()]


def master_pod_name(mode: str) -> str:
    return f"{NAME}-0" if mode == "statefulset" else f"{NAME}-master-0"


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
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_every_manifest_is_valid_kubernetes(renders, values, kube_version):
    errors, unchecked = invalid(renders[values].docs, kube_version)
    assert errors == []
    # Everything is checked against the schemas, the PyTorchJob through its pod templates.
    assert unchecked == ({"PyTorchJob"} if values.startswith("pytorchjob") else set())


def test_defaults_run_ppo_as_one_pod(chart):
    rendered = render(chart, merged(REQUIRED))
    assert not rendered.kind("StatefulSet") and not rendered.kind("PyTorchJob")
    assert RENDEZVOUS not in rendered.names("Service")
    assert f"{NAME}-ranks" not in rendered.names("NetworkPolicy")
    deployment = rendered.get("Deployment", NAME)
    assert deployment["spec"]["replicas"] == 1
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "command" not in container and container["args"] == ["trainer"]


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_the_ranks_replace_the_ppo_deployment(renders, values):
    rendered = renders[values]
    assert NAME not in rendered.names("Deployment")
    assert "rlhf-trainer-reward" in rendered.names("Deployment")  # other stages stay as they are
    pods = ppo_pods(rendered)
    assert [p.role for p in pods] == ["master", "worker"]  # nodes: 2
    if values.startswith("statefulset"):
        assert not rendered.kind("PyTorchJob")
        sets = {s["metadata"]["name"]: s["spec"] for s in rendered.kind("StatefulSet")}
        assert {name: spec["replicas"] for name, spec in sets.items()} == {
            NAME: 1,
            f"{NAME}-worker": 1,
        }
        for spec in sets.values():
            assert spec["serviceName"] == RENDEZVOUS  # pods get DNS names under it
            assert spec["podManagementPolicy"] == "Parallel"  # rendezvous needs them all at once
        # Each StatefulSet owns its own pods only.
        for name, spec in sets.items():
            mine = selected(spec["selector"]["matchLabels"], pods)
            assert mine == [p.name for p in pods if p.name.rsplit("-", 1)[0] == name]
    else:
        assert not rendered.kind("StatefulSet")
        (job,) = rendered.kind("PyTorchJob")
        assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
        replicas = job["spec"]["pytorchReplicaSpecs"]
        assert {role: r["replicas"] for role, r in replicas.items()} == {"Master": 1, "Worker": 1}
        # Always: a master exiting 0 on SIGTERM must not end the job (the trainer never finishes).
        assert {r["restartPolicy"] for r in replicas.values()} == {"Always"}
        assert job["spec"]["nprocPerNode"] == "1"  # a string in the CRD
        # The operator injects its settings into the container named "pytorch" and reads the
        # master's port by the name "pytorchjob-port".
        assert {p.container["name"] for p in pods} == {"pytorch"}
        master_ports = {p["name"]: p["containerPort"] for p in pods[0].container["ports"]}
        assert master_ports["pytorchjob-port"] == PORT


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_rendezvous_through_a_headless_service_on_rank_zero(renders, values):
    rendered = renders[values]
    pods = ppo_pods(rendered)
    service = rendered.get("Service", RENDEZVOUS)
    assert service["spec"]["clusterIP"] == "None"
    # DNS must list the master before it is ready: it becomes ready only after the rendezvous.
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert selected(service["spec"]["selector"], pods) == [pods[0].name]
    (port,) = service["spec"]["ports"]
    declared = {p["containerPort"] for p in pods[0].container.get("ports", [])}
    assert port["port"] == port["targetPort"] == PORT and PORT in declared
    endpoint = f"--rdzv-endpoint={RENDEZVOUS}.{NAMESPACE}.svc:{PORT}"
    for pod in pods:
        assert pod.container["command"] == ["torchrun"]
        args = pod.args()
        assert endpoint in args and "--rdzv-backend=c10d" in args
        assert f"--rdzv-id={NAME}" in args
        assert args[-2:] == ["-m", "services.trainer"]


def torchrun(pod: Pod) -> Any:
    """torchrun's own reading of the pod's command line (its launch config, module and args)."""
    return config_from_args(get_args_parser().parse_args(pod.args()))


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_torchrun_runs_the_trainer_on_every_node(renders, values, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # torchrun sets it when unset and nproc > 1
    rendered = renders[values]
    pods = ppo_pods(rendered)
    for pod in pods:
        config, _, module_args = torchrun(pod)
        # The trainer's own check at start: its batches split over the world (2 x 1 ranks).
        trainer = load_config(TrainerConfig, rendered.environ(pod.template))
        world = config.max_nodes * config.nproc_per_node
        assert trainer.ppo.batch_size % world == 0
        assert trainer.ppo.algorithm.minibatch_size % world == 0
        assert (config.min_nodes, config.max_nodes) == (2, 2)  # fixed size: nnodes 2
        assert config.nproc_per_node == 1  # no GPU, or one GPU per pod (values-gpu.yaml)
        assert config.rdzv_backend == "c10d" and config.run_id == NAME
        assert config.max_restarts == 3
        assert module_args == ["-u", "-m", "services.trainer"]
        # Only rank 0's pod hosts the c10d store (no guessing from DNS).
        assert config.rdzv_configs["is_host"] == ("1" if pod.role == "master" else "0")
    assert importlib.util.find_spec("services.trainer.__main__") is not None


def _rendezvous(pods: list[Pod]) -> dict[str, tuple[int, str]]:
    """Join every pod's torchrun agent to one c10d rendezvous (threads on a local store, each
    with the pod's own local address and rendezvous settings): {pod: (node rank, MASTER_ADDR)}."""
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=30)

    def join(pod: Pod) -> tuple[str, int, str]:
        config, _, _ = torchrun(pod)
        store = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timeout)
        handler = DynamicRendezvousHandler.from_backend(
            run_id=config.run_id,
            store=store,
            backend=C10dRendezvousBackend(store, config.run_id),
            min_nodes=config.min_nodes,
            max_nodes=config.max_nodes,
            local_addr=config.local_addr,
            timeout=RendezvousTimeout(join=timeout),
        )
        info = handler.next_rendezvous()
        assert info.world_size == len(pods)
        return pod.name, info.rank, info.bootstrap_store_info.master_addr

    with ThreadPoolExecutor(len(pods)) as pool:
        joined = list(pool.map(join, reversed(pods)))  # the master joins last
    return {name: (rank, master_addr) for name, rank, master_addr in joined}


@pytest.mark.parametrize("mode", MODES)
def test_the_master_pod_is_rank_zero(chart, mode, monkeypatch):
    """c10d numbers nodes by their --local-addr: the master's (the rendezvous Service's DNS
    name) must sort before every worker's pod name, with ordinals of one and two digits."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    # No second TCP store: the agents would dial the master's DNS name, which exists only in
    # the cluster. The ranks come from the rendezvous itself.
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    values = merged(REQUIRED, distributed(mode, nodes=12), batches_for(12))
    pods = ppo_pods(render(chart, values))
    assert len(pods) == 12 and pods[0].name == master_pod_name(mode)
    for pod in pods:
        (name,) = [e for e in pod.container["env"] if e["name"] == "POD_NAME"]
        assert name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    ranks = _rendezvous(pods)
    master_addr = f"{RENDEZVOUS}.{NAMESPACE}.svc"
    assert ranks[pods[0].name] == (0, master_addr)
    assert sorted(rank for rank, _ in ranks.values()) == list(range(12))
    # Every rank reaches rank 0 (MASTER_ADDR of the processes) through the Service's DNS name.
    assert {addr for _, addr in ranks.values()} == {master_addr}


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_control_plane_and_probes_only_on_rank_zero(renders, values):
    rendered = renders[values]
    pods = ppo_pods(rendered)
    master, workers = pods[0], pods[1:]
    service = rendered.get("Service", NAME)
    assert selected(service["spec"]["selector"], pods) == [master.name]
    assert master.name == master_pod_name(values.split("-")[0])
    declared = {p["name"] for p in master.container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"grpc", "metrics"} <= declared
    env = rendered.pod_env(master.template)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert master.container[probe]["grpc"] == {"port": int(env["RLHF_GRPC_PORT"])}
    for worker in workers:
        # Nothing listens on a worker: no ports, no probes (a gRPC probe would never pass).
        assert "ports" not in worker.container
        assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(worker.container)
    # The ranks reach each other on any port (c10d store, gloo, NCCL) through the policies.
    policy = rendered.get("NetworkPolicy", f"{NAME}-ranks")
    assert selected(policy["spec"]["podSelector"]["matchLabels"], pods) == [p.name for p in pods]
    (rule,) = policy["spec"]["ingress"]
    assert "ports" not in rule
    (peer,) = rule["from"]
    assert selected(peer["podSelector"]["matchLabels"], pods) == [p.name for p in pods]


def _pod_spec(template: dict[str, Any]) -> dict[str, Any]:
    """A pod spec without what differs between ranks and from the single-pod Deployment."""
    spec = {**template["spec"]}
    (container,) = spec.pop("containers")
    differs = {"name", "command", "args", "ports", "env"}
    differs |= {"startupProbe", "readinessProbe", "livenessProbe"}
    spec["container"] = {k: v for k, v in container.items() if k not in differs}
    return spec


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_every_rank_runs_the_single_pod_trainers_pod(chart, mode, gpu):
    """One pod template for both modes and the Deployment: same image, resources (GPUs per
    pod), env, volumes (the shared checkpoint claim, read-write), scheduling."""
    base = [gpu_values()] if gpu else []
    single = render(chart, merged(*base, REQUIRED))
    rendered = render(chart, merged(*base, REQUIRED, distributed(mode)))
    expected = _pod_spec(single.get("Deployment", NAME)["spec"]["template"])
    for pod in ppo_pods(rendered):
        assert _pod_spec(pod.template) == expected, pod.name
        env = rendered.pod_env(pod.template)
        assert env["RLHF_TRAINER_STAGE"] == "ppo"
        config = load_config(
            TrainerConfig, rendered.environ(pod.template)
        )  # the trainer accepts what every rank gets
        settings = {row[0] for row in describe(TrainerConfig)}
        assert {k for k in env if k.startswith("RLHF_")} <= settings
        mounts = {m["mountPath"]: m for m in pod.container["volumeMounts"]}
        assert mounts[str(config.checkpoint_dir)]["readOnly"] is False
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod.template["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == ["rlhf-checkpoints"]
        spec = pod.template["spec"]
        if gpu:
            assert pod.container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert pod.container["image"] == "rlhf-platform:0.1.0-cuda"
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            assert toleration in spec["tolerations"]
        else:
            assert "nvidia.com/gpu" not in pod.container["resources"]["limits"]
            assert "nodeSelector" not in spec and "tolerations" not in spec


PROCS = {
    # (gpu.count, procsPerNode) -> torchrun --nproc-per-node
    "cpu default": (0, 0, 1),
    "cpu, three processes": (0, 3, 3),
    "one per gpu": (4, 0, 4),
    "fewer than the gpus": (4, 2, 2),
}


@pytest.mark.parametrize("case", sorted(PROCS))
@pytest.mark.parametrize("mode", MODES)
def test_processes_per_pod_default_to_its_gpus(chart, mode, case, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    gpus, procs, expected = PROCS[case]
    ppo = {"gpu": {"count": gpus}}
    values = merged(
        REQUIRED, distributed(mode, procsPerNode=procs, nodes=3), batches_for(3 * expected)
    )
    rendered = render(chart, merged(values, {"trainer": {"stages": {"ppo": ppo}}}))
    pods = ppo_pods(rendered)
    assert len(pods) == 3
    for pod in pods:
        config, _, _ = torchrun(pod)
        assert config.nproc_per_node == expected
        assert (config.min_nodes, config.max_nodes) == (3, 3)
        assert pod.container["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
    for job in rendered.kind("PyTorchJob"):
        assert job["spec"]["nprocPerNode"] == str(expected)


@pytest.mark.parametrize("mode", MODES)
def test_one_node_is_the_master_alone(chart, mode, monkeypatch):
    """nodes: 1 (several processes on one pod): no worker StatefulSet, no Worker replicas (the
    operator refuses Worker replicas: 0)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    rendered = render(chart, merged(REQUIRED, distributed(mode, nodes=1, procsPerNode=2)))
    (pod,) = ppo_pods(rendered)
    assert pod.name == master_pod_name(mode)
    config, _, _ = torchrun(pod)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 1, 2)
    if mode == "pytorchjob":
        (job,) = rendered.kind("PyTorchJob")
        assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    else:
        assert rendered.names("StatefulSet") == {NAME}


def test_service_monitor_scrapes_rank_zero_only(chart):
    monitoring = {"monitoring": {"serviceMonitor": {"enabled": True}}}
    rendered = render(chart, merged(REQUIRED, distributed("statefulset"), monitoring))
    (monitor,) = rendered.kind("ServiceMonitor")
    selector = monitor["spec"]["selector"]
    (expression,) = selector["matchExpressions"]
    assert expression["operator"] == "DoesNotExist"
    chosen = [
        s
        for s in rendered.kind("Service")
        if selector["matchLabels"].items() <= s["metadata"]["labels"].items()
        and expression["key"] not in s["metadata"]["labels"]
    ]
    names = {s["metadata"]["name"] for s in chosen}
    assert NAME in names and RENDEZVOUS not in names
    assert names == rendered.names("Service") - {RENDEZVOUS}
    # Every chosen Service has a metrics port; the trainer's reaches rank 0 only (see above).
    assert all("metrics" in {p["name"] for p in s["spec"]["ports"]} for s in chosen)


@pytest.mark.parametrize("mode", MODES)
def test_notes_point_at_rank_zeros_log(chart, mode):
    rendered = render(chart, merged(REQUIRED, distributed(mode)))
    assert f"logs {master_pod_name(mode)} -f" in rendered.notes
    assert f"deploy/{NAME}" not in rendered.notes


BAD_VALUES = {
    "unknown mode": (
        {"mode": "mpi"},
        "at '/trainer/stages/ppo/distributed/mode': value must be one of 'statefulset', "
        "'pytorchjob'",
    ),
    "no nodes": (
        {"nodes": 0},
        "at '/trainer/stages/ppo/distributed/nodes': minimum: got 0, want 1",
    ),
    "negative processes": (
        {"procsPerNode": -1},
        "at '/trainer/stages/ppo/distributed/procsPerNode': minimum: got -1, want 0",
    ),
    "typo": ({"node": 3}, "at '/trainer/stages/ppo/distributed': additional properties 'node'"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_refuses_bad_distributed_values(chart, case):
    settings, message = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as refused:
        render(chart, merged(REQUIRED, distributed(**({"mode": "statefulset"} | settings))))
    assert message in str(refused.value)


def test_only_the_ppo_stage_runs_distributed(chart):
    reward = {"trainer": {"stages": {"reward": {"distributed": {"enabled": True}}}}}
    with pytest.raises(helm.HelmValuesError) as refused:
        render(chart, merged(REQUIRED, reward))
    assert "at '/trainer/stages/reward': additional properties 'distributed'" in str(refused.value)


REFUSED_BY_TEMPLATES = {
    "more processes than gpus": (
        {"trainer": {"stages": {"ppo": {"gpu": {"count": 2}}}}},
        {"procsPerNode": 4},
        "trainer.stages.ppo.distributed.procsPerNode (4) is above gpu.count (2)",
    ),
    "batch does not split over the ranks": (
        {},
        {"nodes": 3},
        "RLHF_PPO_BATCH_SIZE (8) and RLHF_PPO_MINIBATCH_SIZE (4) must split evenly over the 3 "
        "ranks",
    ),
    "minibatch does not split over the ranks": (
        {"trainer": {"stages": {"ppo": {"env": {"RLHF_PPO_MINIBATCH_SIZE": "2"}}}}},
        {"nodes": 4},
        "RLHF_PPO_BATCH_SIZE (8) and RLHF_PPO_MINIBATCH_SIZE (2) must split evenly over the 4 "
        "ranks",
    ),
    "name too long for a statefulset": (
        {"fullnameOverride": "x" * 40},
        {},
        "is too long for a StatefulSet",
    ),
}


def test_chart_checks_batches_against_the_trainers_defaults():
    """_distributed.tpl assumes TrainerConfig's batch defaults when env does not set them."""
    defaults = {row[0]: row[2] for row in describe(TrainerConfig)}
    template = (CHART / "templates" / "_distributed.tpl").read_text()
    for variable in ("RLHF_PPO_BATCH_SIZE", "RLHF_PPO_MINIBATCH_SIZE"):
        assumed = re.search(rf"\.{variable} \| default (\d+)", template)
        assert assumed is not None and assumed.group(1) == defaults[variable], variable


@pytest.mark.parametrize("case", sorted(REFUSED_BY_TEMPLATES))
def test_inconsistent_distributed_values_fail_with_a_clear_message(chart, case):
    values, settings, message = REFUSED_BY_TEMPLATES[case]
    with pytest.raises(helm.HelmError) as refused:
        render(chart, merged(REQUIRED, values, distributed("statefulset", **settings)))
    assert message in str(refused.value)


def test_readme_turns_the_distributed_trainer_on(chart):
    """The README's `helm upgrade` for the distributed trainer renders what it says."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy on Kubernetes", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"helm upgrade .*?distributed.*?\n\s*```", section, re.S).group(0)
    values = merged(REQUIRED)
    for expression in re.findall(r"--set (\S+)", command):
        values = merged(values, helm.parse_set_string(expression))
    pods = ppo_pods(render(chart, values))
    assert len(pods) == 4 and pods[0].name == master_pod_name("statefulset")
