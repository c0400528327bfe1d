"""Rolling restarts through the Kubernetes API, for serving pods that cannot hot-reload (TGI).

Patching an annotation on the Deployment's pod template makes Kubernetes replace the pods with
its usual rolling-update guarantees (maxUnavailable, readiness probes); the annotation also tells
the new pods which policy version to load.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

log = logging.getLogger(__name__)

VERSION_ANNOTATION = "rlhf.io/policy-version"
MANIFEST_ANNOTATION = "rlhf.io/policy-manifest-sha256"
RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"


def restart_patch(version: int, manifest_sha256: str, now: datetime.datetime) -> dict[str, Any]:
    """The strategic-merge patch that rolls a Deployment to `version`."""
    annotations = {
        VERSION_ANNOTATION: str(version),
        MANIFEST_ANNOTATION: manifest_sha256,
        RESTARTED_AT_ANNOTATION: now.isoformat(),
    }
    return {"spec": {"template": {"metadata": {"annotations": annotations}}}}


class Rollout:
    """Restarts one Deployment; `apps_api` is a `kubernetes.client.AppsV1Api`."""

    def __init__(self, apps_api: Any, deployment: str, namespace: str) -> None:
        self._api = apps_api
        self.deployment = deployment
        self.namespace = namespace

    @classmethod
    def in_cluster(cls, deployment: str, namespace: str) -> Rollout:
        """Credentials from the pod's service account (or ~/.kube/config outside a cluster)."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.AppsV1Api(), deployment, namespace)

    def restart(self, version: int, manifest_sha256: str) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self._api.patch_namespaced_deployment(
            name=self.deployment,
            namespace=self.namespace,
            body=restart_patch(version, manifest_sha256, now),
        )
        log.info("rolling %s/%s to policy v%d", self.namespace, self.deployment, version)
