"""Feedback service entry point: `rlhf-feedback --help` lists its settings."""

from __future__ import annotations

import grpc

from rlhf.auth import ApiKeys
from rlhf.bus import Publisher
from rlhf.ids import GenerationIdSigner
from rlhf.server import run_main
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

from .config import FeedbackConfig
from .servicer import FeedbackServicer
from .validation import Limits


class FeedbackService:
    name = "feedback"

    def __init__(self, config: FeedbackConfig) -> None:
        self.config = config
        self.publisher = Publisher(config.kafka_bootstrap, client_id="feedback")
        self.servicer = FeedbackServicer(
            ApiKeys.parse(config.api_keys),
            GenerationIdSigner(
                config.generation_id_key.encode(), config.generation_id_max_age_seconds
            ),
            Limits(config.max_text_chars, config.max_ranking_size),
            self.publisher,
            config.publish_timeout_seconds,
        )

    def register(self, server: grpc.Server) -> list[str]:
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(self.servicer, server)
        return [feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name]

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.publisher.close(timeout=self.config.shutdown_grace_seconds)


def main() -> None:
    run_main(
        "feedback",
        FeedbackConfig,
        FeedbackService,
        "Accept user feedback over gRPC and publish it once the broker acknowledged it.",
    )


if __name__ == "__main__":
    main()
