"""Writes deploy/helm/rlhf/values.schema.json: `python deploy/helm/make_schema.py`.

The schema is generated because six workloads share most of their keys and JSON Schema (draft 7,
which Helm 3 and 4 both read) cannot extend an object that refuses unknown keys. Refusing unknown
keys is the point: a typo such as `replica: 3` fails the install instead of being ignored.
tests/deploy checks that the committed file is what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parent / "rlhf" / "values.schema.json"

Schema = dict[str, Any]


def obj(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    """An object that refuses keys it does not list."""
    schema: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    schema.update(extra)
    return schema


def ref(name: str) -> Schema:
    return {"$ref": f"#/definitions/{name}"}


def integer(minimum: int | None = None, maximum: int | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "integer", **extra}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


STRING: Schema = {"type": "string"}
# A key of 16+ characters (or none), and name=key pairs of them (rlhf.auth.Credentials.parse).
KEY: Schema = {"type": "string", "pattern": r"^$|^[^,\s]{16,}$"}
NAMED_KEYS: Schema = {
    "type": "array",
    "items": {
        "description": "name=key, the key 16+ characters",
        "type": "string",
        "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}=[^,\s]{16,}$",
    },
}
BOOLEAN: Schema = {"type": "boolean"}
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
ANY_OBJECT: Schema = {"type": "object"}
OBJECT_LIST: Schema = {"type": "array", "items": {"type": "object"}}

DEFINITIONS: dict[str, Schema] = {
    "quantity": {
        "description": "A Kubernetes quantity, e.g. 500m, 2, 4Gi",
        "type": ["string", "number"],
        "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$",
    },
    "port": integer(1, 65535),
    "resources": obj(
        {
            "requests": {"type": "object", "additionalProperties": ref("quantity")},
            "limits": {"type": "object", "additionalProperties": ref("quantity")},
        },
        description="Container resources; GPUs are set with gpu.count, not here",
    ),
    "gpu": obj(
        {
            "count": integer(0, 16, description="GPUs per pod; > 0 selects the CUDA image"),
            "resource": {
                "description": "The extended resource: nvidia.com/gpu, or a MIG profile",
                "type": "string",
                "pattern": r"^nvidia\.com/(gpu|mig-[0-9]+g\.[0-9]+gb)$",
            },
        },
        required=["count", "resource"],
    ),
    "env": {
        "description": "Extra environment variables (RLHF_* settings: see rlhf-<service> --help)",
        "type": "object",
        "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "additionalProperties": {"type": ["string", "number", "boolean"]},
    },
    "extraEnv": {
        "description": "Extra EnvVar entries (e.g. valueFrom)",
        "type": "array",
        "items": {"type": "object", "required": ["name"]},
    },
    "tolerations": {
        "type": "array",
        "items": obj(
            {
                "key": STRING,
                "operator": {"enum": ["Exists", "Equal"]},
                "value": STRING,
                "effect": {"enum": ["", "NoSchedule", "PreferNoSchedule", "NoExecute"]},
                "tolerationSeconds": integer(0),
            }
        ),
    },
    "probe": obj(
        {
            "initialDelaySeconds": integer(0),
            "periodSeconds": integer(1),
            "timeoutSeconds": integer(1),
            "failureThreshold": integer(1),
        },
        required=["periodSeconds", "failureThreshold"],
    ),
    "probes": obj(
        {"startup": ref("probe"), "readiness": ref("probe"), "liveness": ref("probe")},
        required=["startup", "readiness", "liveness"],
    ),
    "autoscaling": obj(
        {
            "enabled": BOOLEAN,
            "minReplicas": integer(1),
            "maxReplicas": integer(1),
            "targetCPUUtilizationPercentage": integer(1, 100),
            "metrics": OBJECT_LIST,
            "behavior": ANY_OBJECT,
        },
        required=["enabled", "minReplicas", "maxReplicas"],
    ),
    "pdb": obj(
        {
            "enabled": BOOLEAN,
            "maxUnavailable": {
                "oneOf": [integer(1), {"type": "string", "pattern": "^[0-9]+%$"}],
            },
        },
        required=["enabled", "maxUnavailable"],
    ),
    "service": obj(
        {"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "annotations": STRING_MAP}
    ),
}


def pod_keys() -> dict[str, Schema]:
    """Scheduling and metadata keys every workload has."""
    return {
        "env": ref("env"),
        "extraEnv": ref("extraEnv"),
        "resources": ref("resources"),
        "nodeSelector": STRING_MAP,
        "tolerations": ref("tolerations"),
        "affinity": ANY_OBJECT,
        "podAnnotations": STRING_MAP,
        "podLabels": STRING_MAP,
    }


def server_keys(ports: list[str]) -> dict[str, Schema]:
    """Keys of a workload running a gRPC server (probes, drain, GPUs)."""
    return {
        **pod_keys(),
        "enabled": BOOLEAN,
        "ports": obj({p: ref("port") for p in ports}, required=ports),
        "gpu": ref("gpu"),
        "priorityClassName": STRING,
        "probes": ref("probes"),
        "shutdownGraceSeconds": integer(0),
        "terminationGracePeriodSeconds": integer(1),
    }


def service_keys(ports: list[str]) -> dict[str, Schema]:
    """Keys of generation, feedback and reward: scaled, disrupted and exposed."""
    return {
        **server_keys(ports),
        "replicas": integer(0, description="Pods, when autoscaling is disabled"),
        "service": ref("service"),
        "topologySpreadConstraints": OBJECT_LIST,
        "autoscaling": ref("autoscaling"),
        "pdb": ref("pdb"),
        "preStopSleepSeconds": integer(0),
    }


def distributed() -> Schema:
    """trainer.stages.ppo.distributed: PPO on several pods under torchrun."""
    return obj(
        {
            "enabled": BOOLEAN,
            "mode": {
                "description": "statefulset, or pytorchjob (needs the Kubeflow training operator)",
                "enum": ["statefulset", "pytorchjob"],
            },
            "nodes": integer(1, description="Pods (torchrun --nnodes), 1 or more"),
            "procsPerNode": integer(
                0, 64, description="Processes per pod; 0: one per GPU (gpu.count), or 1 on CPU"
            ),
            "rendezvousPort": ref("port"),
            "maxRestarts": integer(0, description="torchrun --max-restarts"),
        },
        required=["enabled", "mode", "nodes", "procsPerNode", "rendezvousPort", "maxRestarts"],
    )


def build() -> Schema:
    http = {"http": obj({"enabled": BOOLEAN}, required=["enabled"])}
    stage_required = ["enabled", "ports", "gpu", "probes"]
    stage = obj(server_keys(["grpc", "metrics"]), required=stage_required)
    ppo_stage = obj(
        {**server_keys(["grpc", "metrics"]), "distributed": distributed()},
        required=stage_required,
    )

    def share(description: str, exclusive_minimum: float, maximum: float) -> Schema:
        return {
            "type": "number",
            "exclusiveMinimum": exclusive_minimum,
            "maximum": maximum,
            "description": description,
        }

    release_stage = obj(
        {
            **server_keys(["grpc", "metrics"]),
            "canary": obj(
                {
                    "share": share("user requests a candidate answers (RLHF_CANARY_SHARE)", 0, 1),
                    "promoteError": share("chance of a false promotion, at most", 0, 0.49),
                    "rollbackError": share("chance of a false rollback, at most", 0, 0.49),
                    "margin": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                    "minThumbs": integer(2, description="thumbs on each version first"),
                    "maxSeconds": integer(1, description="undecided after this long: expired"),
                    "minAhead": integer(1, description="versions past the incumbent to be gated"),
                },
                required=["share", "promoteError", "rollbackError", "margin", "minThumbs"],
            ),
            "gate": obj(
                {
                    "enabled": {
                        "description": "compare each new policy with the incumbent first",
                        "type": "boolean",
                    },
                    "rewardTolerance": {"type": "number", "minimum": 0},
                    "lengthTolerance": {"type": "number", "minimum": 0},
                    "repetitionTolerance": {"type": "number", "minimum": 0},
                    "maxKl": {"description": "nats; 0 = no cap", "type": "number", "minimum": 0},
                },
                required=[
                    "enabled",
                    "rewardTolerance",
                    "lengthTolerance",
                    "repetitionTolerance",
                    "maxKl",
                ],
            ),
        },
        required=[*stage_required, "canary", "gate"],
    )
    sft_stage = obj(
        {
            **server_keys(["grpc", "metrics"]),
            "demonstrations": obj(
                {
                    "configMap": {
                        "description": "ConfigMap holding the JSONL demonstrations file",
                        "type": "string",
                        "pattern": r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                    },
                    "key": {
                        "description": "the file's key in that ConfigMap",
                        "type": "string",
                        "pattern": r"^[-._a-zA-Z0-9]+$",
                    },
                    "checkpointPath": {
                        "description": "or the file's path relative to the checkpoint volume",
                        "type": "string",
                        "pattern": r"^$|^[^/]",
                    },
                },
                required=["configMap", "key", "checkpointPath"],
            ),
        },
        required=[*stage_required, "demonstrations"],
    )
    properties: dict[str, Schema] = {
        "global": ANY_OBJECT,
        "nameOverride": STRING,
        "fullnameOverride": STRING,
        "image": obj(
            {
                "repository": {"type": "string", "minLength": 1},
                "tag": STRING,
                "cudaTagSuffix": STRING,
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            },
            required=["repository"],
        ),
        "imagePullSecrets": {
            "type": "array",
            "items": obj({"name": STRING}, required=["name"]),
        },
        "externalKafka": obj(
            {
                "bootstrapServers": {
                    "description": "host:port[,host:port] (required)",
                    "type": "string",
                    "pattern": r"^$|^[^,\s]+:[0-9]{1,5}(,[^,\s]+:[0-9]{1,5})*$",
                },
                "securityProtocol": {"enum": ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]},
                "sasl": obj(
                    {
                        "mechanism": {"enum": ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]},
                        "username": STRING,
                        "passwordSecret": obj({"name": STRING, "key": STRING}),
                    }
                ),
                "ssl": obj(
                    {
                        "caSecret": obj({"name": STRING, "key": STRING}),
                        "clientCertSecret": STRING,
                    }
                ),
            }
        ),
        "devBroker": obj(
            {
                "enabled": BOOLEAN,
                "port": ref("port"),
                "resources": ref("resources"),
                "nodeSelector": STRING_MAP,
                "tolerations": ref("tolerations"),
            },
            required=["enabled", "port"],
        ),
        "topics": obj(
            {
                "create": BOOLEAN,
                "partitions": integer(1),
                "replicationFactor": integer(1),
                "minInsyncReplicas": {"type": ["integer", "null"], "minimum": 1},
                "retentionMs": {"type": ["integer", "null"], "minimum": -1},
                "deadLetterRetentionMs": {"type": ["integer", "null"], "minimum": -1},
                "timeoutSeconds": integer(1),
                "backoffLimit": integer(0),
                "resources": ref("resources"),
            }
        ),
        "secrets": obj(
            {
                "existingSecret": STRING,
                "generationIdKey": STRING,
                "generationIdVerifyKeys": {"type": "array", "items": KEY},
                "serviceKey": KEY,
                "previousServiceKeys": {"type": "array", "items": KEY},
                "operatorKeys": NAMED_KEYS,
                "readerKeys": NAMED_KEYS,
                "metricsKey": KEY,
                "feedbackApiKeys": {
                    "type": "array",
                    "items": {
                        "description": "tenant=key, the key 16+ characters",
                        "type": "string",
                        "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}=[^,\s]{16,}$",
                    },
                },
                "simulatedUsersApiKey": STRING,
            }
        ),
        "tls": obj(
            {
                "enabled": BOOLEAN,
                "secretName": STRING,
                "clientAuth": BOOLEAN,
                "serverName": STRING,
                "healthPort": ref("port"),
            }
        ),
        "checkpoints": obj(
            {
                "mountPath": {"type": "string", "pattern": "^/"},
                "existingClaim": STRING,
                "size": ref("quantity"),
                "storageClassName": STRING,
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"enum": ["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"]},
                },
                "keepOnUninstall": BOOLEAN,
            }
        ),
        "serviceAccount": obj({"annotations": STRING_MAP}),
        "podSecurityContext": ANY_OBJECT,
        "securityContext": ANY_OBJECT,
        "scratch": obj({"tmpSizeLimit": ref("quantity"), "cacheSizeLimit": ref("quantity")}),
        "networkPolicy": obj(
            {
                "enabled": BOOLEAN,
                "clients": OBJECT_LIST,
                "metricsFrom": OBJECT_LIST,
                "controlPlaneFrom": OBJECT_LIST,
            }
        ),
        "monitoring": obj(
            {
                "metricsOpen": BOOLEAN,
                "serviceMonitor": obj(
                    {
                        "enabled": BOOLEAN,
                        "interval": STRING,
                        "scrapeTimeout": STRING,
                        "labels": STRING_MAP,
                    }
                ),
                "prometheusRule": obj({"enabled": BOOLEAN, "labels": STRING_MAP}),
                "grafanaDashboard": obj(
                    {"enabled": BOOLEAN, "labels": STRING_MAP, "annotations": STRING_MAP}
                ),
            }
        ),
        "generation": obj(
            {
                **service_keys(["grpc", "http", "metrics"]),
                **http,
                "policyModel": {"enum": ["smollm2-135m", "tiny-random"]},
                "open": BOOLEAN,
                "releases": BOOLEAN,
                "backend": {"enum": ["local", "tgi"]},
                "tgi": obj({"url": STRING, "deployment": STRING, "namespace": STRING}),
            }
        ),
        "feedback": obj({**service_keys(["grpc", "http", "metrics"]), **http}),
        "reward": obj(
            {
                **service_keys(["grpc", "metrics"]),
                "rewardModel": {"enum": ["minilm-l6", "tiny-random"]},
            }
        ),
        "trainer": obj(
            {
                "policyModel": {"enum": ["smollm2-135m", "tiny-random"]},
                "rewardModel": {"enum": ["minilm-l6", "tiny-random"]},
                "stages": obj(
                    {
                        "ppo": ppo_stage,
                        "reward": stage,
                        "sft": sft_stage,
                        "release": release_stage,
                    },
                    required=["ppo", "reward", "sft", "release"],
                ),
            }
        ),
        "simulatedUsers": obj({**pod_keys(), "enabled": BOOLEAN, "replicas": integer(0)}),
    }
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "rlhf chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "definitions": DEFINITIONS,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    SCHEMA_PATH.write_text(render())
    print(f"wrote {SCHEMA_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
