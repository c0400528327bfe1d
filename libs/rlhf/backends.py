"""Generation backends behind one interface: local transformers, or a TGI server.

`LocalBackend` decodes in this process with continuous batching and hot-reloads policy checkpoints.
`TgiBackend` forwards to a text-generation-inference server through the official
`text-generation` client. A TGI server cannot load new weights while running, so on a new policy
checkpoint it verifies the checkpoint and asks Kubernetes for a rolling restart of the TGI
Deployment (`libs/rlhf/kube.py`); the new pods load the announced version.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from text_generation import Client
from text_generation.errors import OverloadedError, ValidationError

from rlhf import decoding
from rlhf.batching import ContinuousBatcher, Job, JobResult, Overloaded
from rlhf.bus import POLICY_CHECKPOINTS
from rlhf.canary import ReleaseFollower, ReleaseSlot
from rlhf.checkpoints import CheckpointStore
from rlhf.kube import Rollout
from rlhf.serving import CheckpointFollower, HotSwap, Served

log = logging.getLogger(__name__)

TokenCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class Generated:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int
    text: str | None = None  # set when the backend detokenised (TGI)


@dataclass(frozen=True)
class PolicyState:
    version: int
    manifest_sha256: str
    loaded_at: float
    candidate_version: int = 0  # a canary's candidate, served beside `version`
    candidate_share: float = 0.0


class Backend(Protocol):
    name: str

    def submit(
        self,
        prompt: str,
        prompt_ids: list[int],
        sampling: decoding.Sampling,
        stop_check: Callable[[list[int]], bool] | None,
        stops: list[str],
        on_token: TokenCallback | None,
        exact: bool = False,
        route_key: str | None = None,
    ) -> Future:
        """`exact`: a trainer's rollout, decoded on the checkpoint's own float32 weights;
        `route_key`: who asks, for a canary's sticky routing (None: routed on its own)."""
        ...

    def policy(self) -> PolicyState: ...

    def arriving(self) -> AbstractContextManager[None]:
        """Held while a request is validated and tokenised, before `submit`."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def healthy(self) -> bool:
        """False while following checkpoints has failed (the service reports NOT_SERVING)."""
        ...


class LocalBackend:
    """In-process decoding: continuous batching plus hot reload of policy checkpoints."""

    name = "local"

    def __init__(
        self,
        slot: HotSwap | ReleaseSlot,
        batcher: ContinuousBatcher,
        follower: CheckpointFollower | ReleaseFollower | None,
    ) -> None:
        self._slot = slot
        self._batcher = batcher
        self._follower = follower

    def submit(
        self,
        prompt: str,
        prompt_ids: list[int],
        sampling: decoding.Sampling,
        stop_check: Callable[[list[int]], bool] | None,
        stops: list[str],
        on_token: TokenCallback | None,
        exact: bool = False,
        route_key: str | None = None,
    ) -> Future:
        outer: Future = Future()
        job = Job(prompt_ids, sampling, stop_check, on_token, exact=exact, route_key=route_key)
        inner = self._batcher.submit(job)
        # A caller that gives up cancels its future: the request leaves the batch.
        outer.add_done_callback(lambda future: job.abandon() if future.cancelled() else None)

        def done(future: Future) -> None:
            if outer.cancelled():
                return
            if future.exception() is not None:
                outer.set_exception(future.exception())
                return
            result: JobResult = future.result()
            completion = result.completion
            outer.set_result(
                Generated(
                    completion.token_ids,
                    completion.logprobs,
                    completion.finish_reason,
                    result.policy_version,
                )
            )

        inner.add_done_callback(done)
        return outer

    def arriving(self) -> AbstractContextManager[None]:
        return self._batcher.arriving()

    def policy(self) -> PolicyState:
        if isinstance(self._slot, ReleaseSlot):
            release = self._slot.release()
            served, candidate = release.incumbent, release.candidate
            return PolicyState(
                served.version,
                served.manifest_sha256,
                served.loaded_at,
                candidate.version if candidate is not None else 0,
                release.share if candidate is not None else 0.0,
            )
        served = self._slot.current()
        return PolicyState(served.version, served.manifest_sha256, served.loaded_at)

    def start(self) -> None:
        self._batcher.start()
        if self._follower is not None:
            self._follower.start()

    def healthy(self) -> bool:
        return self._follower is None or self._follower.healthy()

    def stop(self) -> None:
        if self._follower is not None:
            self._follower.stop()
        self._batcher.stop()


_TGI_FINISH = {"eos_token": decoding.EOS, "stop_sequence": decoding.STOP, "length": decoding.LENGTH}


class TgiBackend:
    """Forwards to a TGI server with the `text-generation` client; restarts it on new policies."""

    name = "tgi"

    def __init__(
        self,
        url: str,
        max_concurrency: int = 32,
        timeout: float = 120.0,
        rollout: tuple[HotSwap[None], CheckpointFollower[None]] | None = None,
    ) -> None:
        """`rollout`: the slot recording the policy version TGI serves and the follower that
        rolls TGI onto new versions; None serves whatever TGI was started with (version 0)."""
        self._client = Client(url, timeout=int(timeout))
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="tgi")
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._slot, self._follower = rollout if rollout is not None else (None, None)
        self._started_at = time.time()

    def submit(
        self,
        prompt: str,
        prompt_ids: list[int],
        sampling: decoding.Sampling,
        stop_check: Callable[[list[int]], bool] | None,
        stops: list[str],
        on_token: TokenCallback | None,
        exact: bool = False,
        route_key: str | None = None,
    ) -> Future:
        if not self._slots.acquire(blocking=False):
            raise Overloaded("too many requests in flight to the TGI server")
        future = self._pool.submit(self._call, prompt, sampling, stops, on_token)
        future.add_done_callback(lambda _f: self._slots.release())
        return future

    def _parameters(self, sampling: decoding.Sampling, stops: list[str]) -> dict:
        sample = sampling.temperature > 0
        return {
            "do_sample": sample,
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature if sample else None,
            "top_p": sampling.top_p if sample and sampling.top_p < 1.0 else None,
            "top_k": sampling.top_k if sample and sampling.top_k > 0 else None,
            "seed": sampling.seed,
            "stop_sequences": stops or None,
        }

    def _call(
        self,
        prompt: str,
        sampling: decoding.Sampling,
        stops: list[str],
        on_token: TokenCallback | None,
    ) -> Generated:
        parameters = self._parameters(sampling, stops)
        version = self.policy().version
        try:
            if on_token is None:
                reply = self._client.generate(prompt, **parameters)
                tokens, details, text = reply.details.tokens, reply.details, reply.generated_text
            else:
                tokens, details, text = [], None, ""
                for chunk in self._client.generate_stream(prompt, **parameters):
                    tokens.append(chunk.token)
                    on_token(chunk.token.id, chunk.token.logprob or 0.0)
                    if chunk.details is not None:
                        details, text = chunk.details, chunk.generated_text or ""
        except OverloadedError as exc:
            raise Overloaded(str(exc)) from exc
        except ValidationError as exc:
            raise ValueError(str(exc)) from exc
        finish = _TGI_FINISH.get(getattr(details.finish_reason, "value", ""), decoding.LENGTH)
        return Generated(
            [t.id for t in tokens], [t.logprob or 0.0 for t in tokens], finish, version, text
        )

    def arriving(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def policy(self) -> PolicyState:
        if self._slot is None:
            return PolicyState(0, "", self._started_at)
        served = self._slot.current()
        return PolicyState(served.version, served.manifest_sha256, served.loaded_at)

    def start(self) -> None:
        if self._follower is not None:
            self._follower.start()

    def healthy(self) -> bool:
        return self._follower is None or self._follower.healthy()

    def stop(self) -> None:
        if self._follower is not None:
            self._follower.stop()
        self._pool.shutdown(wait=True)


def tgi_rollout_follower(
    slot: HotSwap[None], store: CheckpointStore, rollout: Rollout, bootstrap: str, client_id: str
) -> CheckpointFollower[None]:
    """Follows policy checkpoints for TGI pods: verify (the follower's one path), then ask
    Kubernetes for a rolling restart onto that version; `slot` then says what TGI serves. A
    tampered checkpoint is refused before anything restarts."""

    def roll(served: Served[None]) -> None:
        rollout.restart(served.version, served.manifest_sha256)

    return CheckpointFollower(
        slot, store, lambda _verified: None, bootstrap, POLICY_CHECKPOINTS, client_id, roll
    )
