"""A bare gRPC server that answers RewardService.Score at once (a zero per pair, no model, no
credentials, no batcher): what a round trip of the same messages costs on this machine with
nothing of the platform in it. `python -m bench.echo PORT`; `python -m bench reward` runs it."""

from __future__ import annotations

import sys
from concurrent import futures

import grpc

from rlhf.v1 import reward_pb2, reward_pb2_grpc


class Echo(reward_pb2_grpc.RewardServiceServicer):
    def Score(  # noqa: N802 (the gRPC method's name)
        self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        return reward_pb2.ScoreResponse(scores=[0.0] * len(request.pairs), model_version=1)


def main() -> None:
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    reward_pb2_grpc.add_RewardServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
