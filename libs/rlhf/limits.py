"""What apps may send, declared once: the generation and feedback services refuse anything
beyond these at the edge, and the offline importer (`rlhf import`) applies the same settings, read
from the same environment, so an import never carries what the live services would refuse."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from rlhf.config import setting

# Fixed bounds on a generation request's shape (not settings).
MAX_MESSAGES = 64
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
# A user key (who rated, who asks): feedback counts one thumb per user and answer, generation
# routes a canary by it.
MAX_USER_KEY = 128


@dataclass(frozen=True)
class PromptLimits:
    max_prompt_tokens: int = setting("RLHF_MAX_PROMPT_TOKENS", 1024, "longest prompt accepted")
    max_prompt_chars: int = setting(
        "RLHF_MAX_PROMPT_CHARS", 16384, "longest prompt text accepted, before tokenising"
    )


@dataclass(frozen=True)
class FeedbackLimits:
    max_text_chars: int = setting(
        "RLHF_FEEDBACK_MAX_TEXT_CHARS", 8192, "longest correction or comment accepted"
    )
    max_ranking_size: int = setting(
        "RLHF_FEEDBACK_MAX_RANKING_SIZE", 16, "most generations one ranking may order"
    )


class RateLimiter:
    """A token bucket per name (e.g. per tenant): `rate` a second, bursts up to `burst`.

    Bounded memory: names idle long enough to have refilled are forgotten."""

    def __init__(self, rate: float, burst: float, max_names: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate, self.burst, self._max_names = rate, burst, max_names
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, name: str, count: float = 1.0, now: float | None = None) -> bool:
        """Take `count` tokens for `name`; False (nothing taken) when there are not enough."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, since = self._buckets.get(name, (self.burst, now))
            tokens = min(self.burst, tokens + (now - since) * self.rate)
            allowed = tokens >= count
            if allowed:
                tokens -= count
            self._buckets[name] = (tokens, now)
            if len(self._buckets) > self._max_names:
                self._forget_full(now)
            return allowed

    def _forget_full(self, now: float) -> None:
        full = [
            name
            for name, (tokens, since) in self._buckets.items()
            if tokens + (now - since) * self.rate >= self.burst
        ]
        for name in full:
            del self._buckets[name]
