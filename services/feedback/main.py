"""Feedback service entry point: `rlhf-feedback --help` lists its settings."""

from __future__ import annotations

import grpc

from rlhf.auth import OPEN, rules
from rlhf.bus import Publisher
from rlhf.ids import GenerationIdSigner
from rlhf.server import run_main, tls_from_config

from .config import FeedbackConfig
from .http_api import FeedbackHttpApi, FeedbackHttpServer
from .ingest import FeedbackIngest, RecentAcks, StreamLimits
from .servicer import SERVICE_NAME, FeedbackServicer
from .validation import Limits


def build_ingest(config: FeedbackConfig, publisher: Publisher) -> FeedbackIngest:
    signing_key, verify_keys = config.generation_id_keys()
    return FeedbackIngest(
        config.apps(),
        GenerationIdSigner(signing_key, config.generation_id_max_age_seconds, verify_keys),
        Limits(config.max_text_chars, config.max_ranking_size),
        publisher,
        config.publish_timeout_seconds,
        RecentAcks(config.recent_keys),
        StreamLimits(config.max_stream_items, config.stream_window),
        config.rate_limiter(),
    )


class FeedbackService:
    name = "feedback"
    # Tenants are authenticated by the ingest (gRPC and HTTP alike), which counts refusals.
    rules = rules(SERVICE_NAME, {"SubmitFeedback": OPEN, "StreamFeedback": OPEN})

    def __init__(self, config: FeedbackConfig, publisher: Publisher | None = None) -> None:
        self.config = config
        # The producer gives up on a record when the request would: nothing waits unbounded.
        self.publisher = publisher or Publisher(
            config.kafka_bootstrap,
            client_id="feedback",
            delivery_timeout_ms=int(config.publish_timeout_seconds * 1000),
            linger_ms=config.linger_ms,
        )
        self.ingest = build_ingest(config, self.publisher)
        self.servicer = FeedbackServicer(self.ingest)
        self.http: FeedbackHttpServer | None = None

    def register(self, server: grpc.Server) -> list[str]:
        return self.servicer.register(server)

    def start(self) -> None:
        if self.config.http_port >= 0:
            api = FeedbackHttpApi(
                self.ingest, self.config.http_max_body_bytes, self.config.http_cors_origins
            )
            self.http = FeedbackHttpServer(
                api,
                self.config.grpc_host,
                self.config.http_port,
                tls_from_config(self.config),
                self.config.http_max_connections,
                self.config.read_timeout_seconds,
            ).start()

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        self.publisher.close(timeout=self.config.shutdown_grace_seconds)


def main() -> None:
    run_main(
        "feedback",
        FeedbackConfig,
        FeedbackService,
        "Accept user feedback over gRPC (and optionally HTTP JSON) and publish it once the broker "
        "acknowledged it.",
    )


if __name__ == "__main__":
    main()
