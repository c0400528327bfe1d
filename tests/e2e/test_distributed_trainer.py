"""The PPO trainer service under torchrun with two ranks (gloo, tiny model): rank 0 consumes the
feedback, both ranks train, rank 0 publishes policies, and SIGTERM stops every rank cleanly.

A broker of its own, the real reward service, the trainer as `torchrun -m services.trainer`.
"""

import signal
import subprocess
import sys
import uuid

from rlhf import bus
from rlhf.broker import free_port
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.models import load_tokenizer
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from tests.conftest import KEYS_ENV, READER_KEY, channel, wait_until
from tests.e2e.test_trainer_resume import _events, _publish, reward  # noqa: F401 (fixture)
from tests.processes import wait_healthy


def test_two_rank_trainer_trains_publishes_and_stops_cleanly(
    own_broker,
    cache_dir,
    tmp_path,
    reward,  # noqa: F811
):
    store = CheckpointStore(tmp_path / "checkpoints")
    port = free_port()
    env = {
        "RLHF_KAFKA_BOOTSTRAP": own_broker.bootstrap,
        "RLHF_CHECKPOINT_DIR": str(store.root),
        "RLHF_CACHE_DIR": str(cache_dir),
        "RLHF_POLICY_MODEL": "tiny-random",
        "RLHF_REWARD_ADDRESS": f"127.0.0.1:{reward.port}",
        "RLHF_TRAINER_GROUP": f"ddp-{uuid.uuid4().hex[:8]}",
        "RLHF_PPO_MIN_REWARD_VERSION": "0",  # the untrained reward head serves the plumbing
        "RLHF_PPO_BATCH_SIZE": "4",
        "RLHF_PPO_MINIBATCH_SIZE": "2",
        "RLHF_PPO_EPOCHS": "1",
        "RLHF_PPO_RESPONSE_TOKENS": "6",
        "RLHF_GRPC_HOST": "127.0.0.1",
        "RLHF_GRPC_PORT": str(port),
        "RLHF_METRICS_PORT": "0",
        "RLHF_TRAINER_METRICS_LOG": "off",
    }
    publisher = bus.Publisher(own_broker.bootstrap, client_id="ddp-test")
    generations, feedback = _events(load_tokenizer(cache_dir), 8, "ddp")
    _publish(publisher, generations, bus.GENERATIONS)
    _publish(publisher, feedback, bus.FEEDBACK)
    publisher.close()

    log_path = tmp_path / "trainer.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "services.trainer"]
    with open(log_path, "ab") as log:
        trainer = subprocess.Popen(command, env={**_base_env(), **env}, stdout=log, stderr=log)
    try:
        wait_healthy(port, trainer, timeout=120)
        with channel(port, READER_KEY) as opened:
            control = trainer_pb2_grpc.TrainerServiceStub(opened)

            def trained_on_everything() -> bool:
                status = control.GetStatus(trainer_pb2.GetStatusRequest(), timeout=5)
                return status.feedback_used == 8 and status.policy_version >= 2

            assert wait_until(trained_on_everything, timeout=180), log_path.read_text()[-3000:]
    finally:
        trainer.send_signal(signal.SIGTERM)
        code = trainer.wait(timeout=120)
    log_text = log_path.read_text()
    # torchrun itself ends on the signal (code 1, SignalException), but its ranks must not: rank
    # 0 drained, then released the follower, which had waited for it.
    assert code in (0, 1), log_text[-3000:]
    assert "rank 1: waiting for rank 0" in log_text
    assert "could not tell every rank to stop" not in log_text
    assert "[rank0]: Traceback" not in log_text and "[rank1]: Traceback" not in log_text
    assert "ChildFailedError" not in log_text, log_text[-3000:]
    manifest, _ = store.read_manifest(POLICY, store.latest_version(POLICY))
    assert manifest.metadata["data_parallel_ranks"] == 2
    assert manifest.metadata["updates"] == 2  # 8 prompts, a global batch of 4


def _base_env() -> dict[str, str]:
    import os

    return {**os.environ, **KEYS_ENV}
