"""Playground entry point: `rlhf-playground --help` lists its settings."""

from __future__ import annotations

import grpc

from rlhf.server import run_main, tls_from_config

from .config import PlaygroundConfig
from .http_api import PlaygroundHttpServer
from .status import StatusBoard


class PlaygroundService:
    """The page's HTTP server and the panel's refresher; the gRPC server only answers health
    checks (how the launcher and Kubernetes see it is up)."""

    name = "playground"

    def __init__(self, config: PlaygroundConfig) -> None:
        self.config = config
        self.board = StatusBoard(config)
        self.http = PlaygroundHttpServer(config, self.board.latest, tls_from_config(config))

    def register(self, server: grpc.Server) -> list[str]:
        return []

    def start(self) -> None:
        self.board.start()
        self.http.start()

    def stop(self) -> None:
        self.http.stop()
        self.board.stop()


def main() -> None:
    run_main(
        "playground",
        PlaygroundConfig,
        PlaygroundService,
        "Serve a chat page where a person talks to the served policy and rates its answers, "
        "with a panel of the loop's state.",
    )


if __name__ == "__main__":
    main()
