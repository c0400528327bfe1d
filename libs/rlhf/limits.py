"""What apps may send, declared once: the generation and feedback services refuse anything
beyond these at the edge, and the offline importer (`rlhf import`) applies the same settings, read
from the same environment, so an import never carries what the live services would refuse."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import setting

# Fixed bounds on a generation request's shape (not settings).
MAX_MESSAGES = 64
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64


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
