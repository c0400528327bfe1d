"""Simulated users entry point: `rlhf-simulated-users --help` lists its settings."""

from __future__ import annotations

import logging
import random
import threading

import grpc

from rlhf.auth import ClientSecurity, dial
from rlhf.config import parse_args
from rlhf.local import stop_on_signals
from rlhf.server import configure_logging

from .config import SimulatedUsersConfig
from .users import SimulatedUser, Tally

log = logging.getLogger("simulated_users")


def run(config: SimulatedUsersConfig, stop: threading.Event) -> Tally:
    security = ClientSecurity.of(config, key="")  # TLS; the key goes with each call
    generation = dial(config.generation_address, security)
    feedback = dial(config.feedback_address, security)
    tally = Tally()

    def user_loop(index: int) -> None:
        user = SimulatedUser(
            generation,
            feedback,
            config.api_key,
            config.threshold,
            config.max_new_tokens,
            random.Random(config.seed * 1000 + index),
            tally,
            rank_share=config.rank_share,
            require_topic=config.require_topic,
        )
        while not stop.is_set():
            try:
                user.interact()
            except grpc.RpcError as exc:
                log.warning("user %d: %s %s", index, exc.code().name, exc.details())
                stop.wait(2.0)
            stop.wait(config.pause_seconds)

    threads = [
        threading.Thread(target=user_loop, args=(i,), daemon=True) for i in range(config.users)
    ]
    for thread in threads:
        thread.start()
    while not stop.wait(15.0):
        log.info("thumbs-up rate by policy version: %s", tally.summary())
    for thread in threads:
        thread.join(timeout=130)
    generation.close()
    feedback.close()
    return tally


def main() -> None:
    config = parse_args(
        SimulatedUsersConfig, "Simulated users: generate, rate with VADER sentiment, send thumbs."
    )
    configure_logging("simulated-users")
    run(config, stop_on_signals())


if __name__ == "__main__":
    main()
