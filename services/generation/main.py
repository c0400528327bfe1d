"""Generation service entry point: `rlhf-generation --help` lists its settings."""

from __future__ import annotations

import time

import grpc
from transformers import PreTrainedTokenizerBase

from rlhf import bus
from rlhf.auth import APP, OPEN, READER, SERVICE, Access, allow, rules
from rlhf.backends import Backend, LocalBackend, TgiBackend, tgi_rollout_follower
from rlhf.batching import ContinuousBatcher, PolicyLoader, PolicyWeights
from rlhf.bus import Publisher
from rlhf.canary import ReleaseFollower, ReleaseSlot
from rlhf.checkpoints import POLICY, CheckpointStore, VerifiedCheckpoint
from rlhf.ids import GenerationIdSigner
from rlhf.kube import Rollout
from rlhf.models import load_base_policy, load_tokenizer, policy_from_checkpoint, serving_dtype
from rlhf.server import run_main, tls_from_config
from rlhf.serving import CheckpointFollower, HotSwap, Routes, Served, latest_or_base
from rlhf.v1 import generation_pb2, generation_pb2_grpc

from .config import GenerationConfig
from .core import GenerationCore
from .http_api import GenerationHttpServer
from .servicer import GenerationServicer

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


def access_rules(config: GenerationConfig) -> dict[str, Access]:
    """Apps and the platform's services generate (rollouts: services only, checked by the
    servicer), or anyone when generation is open; readers may also ask what is served."""
    generate = OPEN if config.open_access else allow(APP, SERVICE)
    info = OPEN if config.open_access else allow(APP, SERVICE, READER)
    return rules(
        SERVICE_NAME, {"Generate": generate, "GenerateStream": generate, "GetPolicyInfo": info}
    )


def batcher_for(
    config: GenerationConfig, slot: Routes, tokenizer: PreTrainedTokenizerBase
) -> ContinuousBatcher:
    return ContinuousBatcher(
        slot,
        eos_ids={tokenizer.eos_token_id},
        pad_id=tokenizer.pad_token_id,
        max_batch=config.max_batch,
        max_wait_s=config.batch_wait_ms / 1000,
        max_queue=config.max_concurrent_requests,
        kv_budget_tokens=config.kv_budget_tokens,
    )


def local_backend(
    config: GenerationConfig, store: CheckpointStore, tokenizer: PreTrainedTokenizerBase
) -> LocalBackend:
    if config.releases:
        return released_backend(config, store, tokenizer)
    batcher: ContinuousBatcher | None = None
    loader = PolicyLoader(
        serving_dtype(config.decode_dtype), lambda w: batcher is not None and batcher.serving(w)
    )
    initial = latest_or_base(
        store,
        POLICY,
        loader.build,
        lambda: PolicyWeights.of(
            load_base_policy(config.policy_model, config.cache_dir),
            serving_dtype(config.decode_dtype),
        ),
    )
    loader.initial(initial.model)
    slot = HotSwap(POLICY, initial)
    batcher = batcher_for(config, slot, tokenizer)
    follower = CheckpointFollower(
        slot,
        store,
        loader.build,
        config.kafka_bootstrap,
        bus.POLICY_CHECKPOINTS,
        client_id="generation-follower",
        reuse=loader.reuse,
    )
    return LocalBackend(slot, batcher, follower)


def released_backend(
    config: GenerationConfig, store: CheckpointStore, tokenizer: PreTrainedTokenizerBase
) -> LocalBackend:
    """In-process decoding of what release events name (`rlhf.canary`): the store's newest
    policy until the first one is read. Each version is built in memory of its own (the
    hot-reload buffer reuse assumes one served version and one retired, not two served)."""
    dtype = serving_dtype(config.decode_dtype)

    def build(checkpoint: VerifiedCheckpoint) -> PolicyWeights:
        return PolicyWeights.of(policy_from_checkpoint(checkpoint), dtype, checkpoint.buffers)

    initial = latest_or_base(
        store,
        POLICY,
        build,
        lambda: PolicyWeights.of(load_base_policy(config.policy_model, config.cache_dir), dtype),
    )
    slot = ReleaseSlot(POLICY, initial)
    batcher = batcher_for(config, slot, tokenizer)
    follower = ReleaseFollower(
        slot, store, build, config.kafka_bootstrap, client_id="generation-releases"
    )
    return LocalBackend(slot, batcher, follower)


def tgi_backend(config: GenerationConfig, store: CheckpointStore) -> TgiBackend:
    rollout = None
    if config.tgi_deployment:
        # What TGI serves is the store's newest policy until the follower rolls it further.
        slot: HotSwap[None] = HotSwap(
            POLICY, Served(None, store.latest_version(POLICY) or 0, "", time.time())
        )
        follower = tgi_rollout_follower(
            slot,
            store,
            Rollout.in_cluster(config.tgi_deployment, config.tgi_namespace),
            config.kafka_bootstrap,
            client_id="generation-tgi-rollout",
        )
        rollout = (slot, follower)
    return TgiBackend(
        config.tgi_url,
        max_concurrency=config.max_concurrent_requests,
        timeout=config.request_timeout_seconds,
        rollout=rollout,
    )


class GenerationService:
    name = "generation"

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        store = CheckpointStore(config.checkpoint_dir)
        tokenizer = load_tokenizer(config.cache_dir)
        backend: Backend = (
            tgi_backend(config, store)
            if config.backend == "tgi"
            else local_backend(config, store, tokenizer)
        )
        self.publisher = Publisher(config.kafka_bootstrap, client_id="generation")
        signing_key, verify_keys = config.generation_id_keys()
        self.core = GenerationCore(
            config,
            backend,
            tokenizer,
            self.publisher,
            GenerationIdSigner(signing_key, verify_keys=verify_keys),
        )
        self.servicer = GenerationServicer(self.core, config.policy_model)
        self.rules = access_rules(config)
        self.apps = config.apps()
        self.http: GenerationHttpServer | None = None
        if config.http_port >= 0:
            self.http = GenerationHttpServer(
                self.core,
                config.policy_model,
                config.grpc_host,
                config.http_port,
                None if config.open_access else self.apps | config.auth.credentials(),
                tls_from_config(config),
                config.http_max_connections,
                config.read_timeout_seconds,
            )

    def healthy(self) -> bool:
        return self.core.backend.healthy()

    def register(self, server: grpc.Server) -> list[str]:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)
        return [SERVICE_NAME]

    def start(self) -> None:
        self.core.backend.start()
        if self.http is not None:
            self.http.start()

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        self.core.backend.stop()
        self.publisher.close(timeout=self.config.shutdown_grace_seconds)


def main() -> None:
    run_main(
        "generation",
        GenerationConfig,
        GenerationService,
        "Serve the policy over gRPC and an HTTP API (TGI and OpenAI chat completions), sign "
        "generation ids and follow policy checkpoints.",
    )


if __name__ == "__main__":
    main()
