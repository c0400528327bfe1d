"""How (prompt, response) pairs become reward-model inputs (`encode_reward_inputs`): padded to a
few widths, so forward passes share shapes, never past the token limit, scores unchanged."""

from __future__ import annotations

import pytest
import torch

from rlhf.models import REWARD_PAD_MULTIPLE, TINY, encode_reward_inputs, load_reward_backbone
from rlhf.scoring import score_pairs


@pytest.fixture(scope="module")
def tiny():
    return load_reward_backbone(TINY)


def _pair(words: int) -> tuple[str, str]:
    return "How was it?", " ".join(["fine"] * words)


def test_batches_of_any_length_share_a_few_widths(tiny) -> None:
    _, tokenizer = tiny
    widths = {
        encode_reward_inputs(tokenizer, *zip(_pair(n), strict=True), max_tokens=256)[
            "input_ids"
        ].shape[1]
        for n in range(1, 120)
    }
    assert all(width % REWARD_PAD_MULTIPLE == 0 for width in widths)
    assert len(widths) <= 128 // REWARD_PAD_MULTIPLE  # 119 lengths, at most 4 shapes


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("longest", [200, 30])  # truncated to the limit; rounded up past it
def test_padding_never_goes_past_the_token_limit(tiny, side: str, longest: int) -> None:
    _, tokenizer = tiny
    tokenizer.padding_side = side
    try:
        pairs = [_pair(longest), _pair(3)]
        encoded = encode_reward_inputs(
            tokenizer, [p for p, _ in pairs], [r for _, r in pairs], max_tokens=50
        )
        alone = encode_reward_inputs(tokenizer, *zip(_pair(3), strict=True), max_tokens=50)
    finally:
        tokenizer.padding_side = "right"
    assert encoded["input_ids"].shape == (2, 50)  # not rounded up to 64
    mask = encoded["attention_mask"]
    assert mask[0].sum() == min(50, 1 + 4 + 1 + longest + 1)  # CLS, prompt, SEP, answer, SEP
    # The short pair's tokens are all there, on the side the tokenizer keeps them.
    real = encoded["input_ids"][1][mask[1].bool()]
    assert real.tolist() == alone["input_ids"][0][alone["attention_mask"][0].bool()].tolist()
    assert bool(mask[1][0]) is (side == "right")
    pads = encoded["input_ids"][1][~mask[1].bool()]
    assert (pads == tokenizer.pad_token_id).all()
    assert (encoded["token_type_ids"][1][~mask[1].bool()] == tokenizer.pad_token_type_id).all()


def test_padding_does_not_change_a_score(tiny) -> None:
    model, tokenizer = tiny
    short, long = _pair(2), _pair(40)
    alone = score_pairs(model, tokenizer, [short], 256)[0]
    with torch.inference_mode():
        exact = tokenizer(*short, return_tensors="pt")  # no padding at all
        unpadded = model(**exact).logits[0, 0].item()
    beside_a_long_one = score_pairs(model, tokenizer, [short, long], 256)[0]
    assert alone == pytest.approx(unpadded, abs=1e-5)
    assert beside_a_long_one == pytest.approx(unpadded, abs=1e-5)
