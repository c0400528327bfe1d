"""GenerationService over gRPC: a thin adapter over GenerationCore."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.auth import APP, SERVICE, caller
from rlhf.server import Rejected
from rlhf.v1 import generation_pb2, generation_pb2_grpc

from .core import REJECTED, GenerationCore, Outcome, Prepared


def _response(outcome: Outcome, with_logprobs: bool) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(
        generation_id=outcome.generation_id,
        text=outcome.text,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=len(outcome.token_ids),
        policy_version=outcome.policy_version,
        finish_reason=outcome.finish_reason,
        logprobs=outcome.logprobs if with_logprobs else [],
        token_ids=outcome.token_ids if with_logprobs else [],
    )


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, core: GenerationCore, model_name: str) -> None:
        self._core = core
        self._model_name = model_name

    def _prepare(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Prepared:
        principal = caller()  # checked by the server bootstrap against the method's rule
        if request.rollout and (principal is None or principal.role != SERVICE):
            # Rollouts are unsigned and unpublished: only the platform's trainer may ask.
            REJECTED.labels("rollout_forbidden").inc()
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "rollouts need a service key")
        tenant = principal.name if principal is not None and principal.role == APP else ""
        try:
            return self._core.prepare(
                request.prompt,
                list(request.messages),
                request.sampling,
                request.prompt_token_ids,
                request.rollout,
                tenant,
                request.user_key,
            )
        except Rejected as exc:
            REJECTED.labels(exc.reason).inc()
            context.abort(exc.code, str(exc))

    def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        prepared = self._prepare(request, context)
        try:
            return _response(self._core.run(prepared), request.return_logprobs)
        except Rejected as exc:
            context.abort(exc.code, str(exc))

    def GenerateStream(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[generation_pb2.GenerateStreamResponse]:
        prepared = self._prepare(request, context)
        try:
            for item in self._core.stream(prepared):
                if isinstance(item, Outcome):
                    final = _response(item, request.return_logprobs)
                    yield generation_pb2.GenerateStreamResponse(final=final)
                else:
                    token, text, logprob = item
                    chunk = generation_pb2.TokenChunk(id=token, text=text, logprob=logprob)
                    yield generation_pb2.GenerateStreamResponse(token=chunk)
        except Rejected as exc:
            context.abort(exc.code, str(exc))

    def GetPolicyInfo(
        self, request: generation_pb2.GetPolicyInfoRequest, context: grpc.ServicerContext
    ) -> generation_pb2.PolicyInfo:
        state = self._core.backend.policy()
        loaded_at = Timestamp()
        loaded_at.FromNanoseconds(int(state.loaded_at * 1e9))
        return generation_pb2.PolicyInfo(
            version=state.version,
            manifest_sha256=state.manifest_sha256,
            loaded_at=loaded_at,
            model=self._model_name,
            backend=self._core.backend.name,
            candidate_version=state.candidate_version,
            candidate_share=state.candidate_share,
        )
