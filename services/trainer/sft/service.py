"""The sft stage's process: the policy continued from the store, the demonstrations file (once),
the intake restored from the newest sft state, and the rounds."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from rlhf.checkpoints import POLICY, SFT_STATE, CheckpointError, CheckpointStore
from rlhf.models import (
    chat_text,
    encode_text,
    load_base_policy,
    load_tokenizer,
    policy_from_checkpoint,
)
from rlhf.serving import latest_or_base
from rlhf.training.sft import (
    Demonstration,
    Prompt,
    PromptEncoder,
    SFTLearner,
    read_demonstrations,
)

from ..config import TrainerConfig
from ..stage import StageService
from .loop import DEMONSTRATIONS, CorrectionIntake, Encode, SFTRounds

log = logging.getLogger(__name__)

SFT_DATA_SHA = "sft_data_sha256"


class SFTTrainerService(StageService):
    """The trainer process running the sft stage (RLHF_TRAINER_STAGE=sft)."""

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        settings = config.sft
        store = CheckpointStore(config.checkpoint_dir)
        tokenizer = load_tokenizer(config.cache_dir)
        current = latest_or_base(
            store,
            POLICY,
            policy_from_checkpoint,
            lambda: load_base_policy(config.policy_model, config.cache_dir),
        )

        def encode(text: str) -> list[int]:
            return encode_text(tokenizer, text)

        def encode_prompt(prompt: Prompt) -> list[int]:
            return encode(prompt if isinstance(prompt, str) else chat_text(tokenizer, prompt))

        max_tokens = settings.training.max_tokens
        initial: list[Demonstration] = []
        file_metadata: dict[str, str] = {}
        if settings.data:
            digest = hashlib.sha256(Path(settings.data).read_bytes()).hexdigest()
            file_metadata = {SFT_DATA_SHA: digest}
            if trained_on(store, digest):
                log.info("%s was trained on already (same sha256); not again", settings.data)
            else:
                initial = load_file(Path(settings.data), encode_prompt, encode, max_tokens)
        learner = SFTLearner(
            current.model, tokenizer.pad_token_id, tokenizer.eos_token_id, settings.training
        )
        parts = self.open_intake(
            store,
            settings.consumer_group,
            "sft-trainer",
            lambda consumer: CorrectionIntake(consumer, encode, max_tokens),
            SFT_STATE,
            # Policies are not pruned here: the sft result is what ppo's KL holds it to.
            keep_checkpoints=False,
        )
        loop = SFTRounds(
            parts,
            learner,
            settings.round_examples,
            current.version,
            initial,
            file_metadata if initial else None,
        )
        self.serve(loop, store)


def trained_on(store: CheckpointStore, digest: str) -> bool:
    """Whether a policy in the store came from a round on the demonstrations file with this
    sha256 (a restarted pod must not train the same file again on top of itself)."""
    for version in store.versions(POLICY):
        try:
            manifest, _ = store.read_manifest(POLICY, version)
        except CheckpointError:
            continue
        if manifest.metadata.get(SFT_DATA_SHA) == digest:
            return True
    return False


def load_file(
    path: Path, encode_prompt: PromptEncoder, encode: Encode, max_tokens: int
) -> list[Demonstration]:
    """The file's demonstrations; rejected lines are logged with their line number."""
    demos, rejected = read_demonstrations(path, encode_prompt, encode, max_tokens)
    for bad in rejected[:20]:
        log.warning("%s:%d skipped: %s", path, bad.line, bad.reason)
    DEMONSTRATIONS.labels("file", "accepted").inc(len(demos))
    DEMONSTRATIONS.labels("file", "rejected").inc(len(rejected))
    log.info("%s: %d demonstrations, %d lines rejected", path, len(demos), len(rejected))
    return demos
