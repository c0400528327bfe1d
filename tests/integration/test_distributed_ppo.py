"""Data-parallel PPO under torchrun (2 ranks, gloo) takes the same steps as one process on the
same global batch: the weights after a few iterations match within float tolerance, with DDP
and with FSDP (whose learner state also survives a gather to rank 0 and a resume), and so do
GRPO's and RLOO's (groups of answers sampled per prompt on each rank, seeded by global row)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# A generation server over loopback serving the tiny base weights as v1, shared with that module.
from tests.conftest import KEYS_ENV
from tests.integration.test_pool_rollouts import served_v1, server, store  # noqa: F401

WORKER = Path(__file__).with_name("ppo_worker.py")


def run_worker(
    out: Path,
    ranks: int,
    lora_rank: int,
    strategy: str = "ddp",
    pool: str = "",
    algorithm: str = "ppo",
    aggregation: str = "token",
) -> tuple[dict, dict, dict]:
    args = ["--lora-rank", str(lora_rank), "--strategy", strategy, "--pool", pool]
    run_ranks(out, ranks, *args, "--algorithm", algorithm, "--aggregation", aggregation)
    stats = json.loads((out / "stats.json").read_text())
    initial = load_file(str(out / "initial.safetensors"))
    return initial, load_file(str(out / "trained.safetensors")), stats


def run_ranks(out: Path, ranks: int, *args: str) -> None:
    """The worker as `ranks` data-parallel ranks under torchrun (or as one process)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launcher, f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    command += [str(WORKER), "--out", str(out), *args]
    env = {**os.environ, **KEYS_ENV}  # the pool takes the test service key
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]


def assert_same_training(initial, single, single_stats, ranks, ranks_stats) -> None:
    """2 ranks and 1 process trained the same weights (and training moved them), with the same
    whole-batch statistics, the KL controller's input among them."""
    assert ranks_stats["world_size"] == 2 and single_stats["world_size"] == 1
    assert single.keys() == ranks.keys() == initial.keys() and single
    moved = max((single[name] - initial[name]).abs().max().item() for name in single)
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"
    for name, weight in single.items():
        torch.testing.assert_close(ranks[name], weight, atol=2e-5, rtol=1e-4, msg=name)
    keys = ["objective/kl", "objective/scores", "response/length", "kl_coef_after"]
    keys += [k for k in ("reward_std", "frac_reward_zero_std") if k in single_stats]
    for key in keys:
        assert ranks_stats[key] == pytest.approx(single_stats[key], rel=1e-4, abs=1e-6), key
    for key in keys[:3]:  # the same for the in-process sampled iterations (every one for ddp)
        if key in single_stats["iterate"]:
            single_value = single_stats["iterate"][key]
            assert ranks_stats["iterate"][key] == pytest.approx(single_value, rel=1e-4), key


@pytest.mark.parametrize(
    ("lora_rank", "algorithm", "aggregation"),
    [
        (0, "ppo", "token"),
        (4, "ppo", "token"),
        (0, "grpo", "token"),
        # Each rank's answers are a share of the minibatch's answers, not of its tokens.
        (0, "rloo", "sequence"),
    ],
)
def test_two_ranks_match_one_process_on_the_same_global_batch(
    tmp_path, lora_rank, algorithm, aggregation
):
    setup = {"algorithm": algorithm, "aggregation": aggregation}
    initial, single, single_stats = run_worker(tmp_path / "single", 1, lora_rank, **setup)
    _, ddp, ddp_stats = run_worker(tmp_path / "ddp", 2, lora_rank, **setup)
    assert_same_training(initial, single, single_stats, ddp, ddp_stats)
    if algorithm != "ppo":  # whole groups of answers, sampled per prompt on each rank
        assert "loss/value" not in single_stats
        assert single_stats["iterate"]["reward_std"] > 0


def test_fsdp_two_ranks_match_one_process_and_resume_from_gathered_state(tmp_path):
    """Sharded: fixed responses of unequal lengths, a rollback, then the state gathered to rank
    0, loaded by a fresh sharded learner on every rank and one more update, against one
    process that took the same updates without the round trip."""
    initial, single, single_stats = run_worker(tmp_path / "single", 1, 0, "fsdp")
    _, fsdp, fsdp_stats = run_worker(tmp_path / "fsdp", 2, 0, "fsdp")
    assert_same_training(initial, single, single_stats, fsdp, fsdp_stats)

    single_resumed = load_file(str(tmp_path / "single" / "resumed.safetensors"))
    fsdp_resumed = load_file(str(tmp_path / "fsdp" / "resumed.safetensors"))
    # The same names and shapes: the sharded learner's files are an unsharded learner's.
    assert fsdp_resumed.keys() == single_resumed.keys()
    moments = [name for name in single_resumed if name.startswith("optimizer.")]
    assert any(name.endswith(".exp_avg_sq") for name in moments), moments
    for name, value in single_resumed.items():
        assert fsdp_resumed[name].shape == value.shape, name
        if name in single:  # the update after the resume moved every weight again
            assert not torch.equal(value, single[name]), name
        torch.testing.assert_close(fsdp_resumed[name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_a_stop_on_rank_0_gives_every_rank_up_at_the_same_minibatch(tmp_path):
    """Rank 0 is told to stop after the update's first minibatch step; the followers are not
    (SIGTERM does not end them) and must give up at the same minibatch: a rank going on alone
    would wait in the next minibatch's gradient all-reduce for good."""
    run_ranks(tmp_path, 2, "--give-up")
    result = json.loads((tmp_path / "given-up.json").read_text())
    assert result == {"told": "update given up on stop after 1 of 2 minibatch steps", "updates": 0}
    initial = load_file(str(tmp_path / "initial.safetensors"))
    ranks = [load_file(str(tmp_path / f"given-up-{rank}.safetensors")) for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == initial.keys()
    # One step each, the same one (DDP averaged its gradients), and it moved the weights.
    assert any(not torch.equal(ranks[0][name], initial[name]) for name in initial)
    for name, weight in ranks[0].items():
        assert torch.equal(ranks[1][name], weight), name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ranks_on_pool_rollouts_match_one_process(tmp_path, server, strategy):  # noqa: F811
    """Rollouts sampled on a real generation server (serving the base weights as v1): each rank
    asks the pool for its share, seeded by global row, and the importance weights (the trainer
    moves away from what the pool serves after the first update) are global statistics."""
    pool = f"127.0.0.1:{server.port}"
    _, single, single_stats = run_worker(tmp_path / "single", 1, 0, strategy, pool)
    _, ranks, ranks_stats = run_worker(tmp_path / "ranks", 2, 0, strategy, pool)
    # The server computes the behaviour logprobs in its own batches, so the importance weights
    # differ in the 7th digit between the two runs, and Adam's normalised steps carry that into
    # weights whose gradient is near 0: measured up to 2.6e-5, against a move of 6e-3.
    for name, weight in single.items():
        torch.testing.assert_close(ranks[name], weight, atol=1e-4, rtol=1e-4, msg=name)
    single_iterate, ranks_iterate = single_stats["iterate"], ranks_stats["iterate"]
    # The last pool iteration came from v1 while the trainer had moved on: weighted, not 1.
    assert abs(single_iterate["policy/is_weight_mean"] - 1.0) > 1e-4, single_iterate
    assert single_iterate["rollout/policy_lag_max"] == 0  # within max_policy_lag=0
    for key in ("policy/is_weight_mean", "policy/is_capped_frac", "objective/kl"):
        assert ranks_iterate[key] == pytest.approx(single_iterate[key], rel=1e-4, abs=1e-6), key
