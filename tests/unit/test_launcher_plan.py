"""`make up`'s process plan: the release stage only when asked for (RELEASES=1)."""

from rlhf.config import load_config
from rlhf.local import PortReservations
from services.launcher.config import LauncherConfig
from services.launcher.main import CPU_DEMO, Keys, plan


def _plan(releases):
    keys = Keys.new()
    ports = PortReservations()
    try:
        processes = plan("127.0.0.1:1", "tiny", "tiny", keys, "k", ports.take, releases)
    finally:
        ports.release()
    return keys, {p.name: p for p in processes}


def test_by_default_every_new_policy_serves_everyone_at_once():
    assert not load_config(LauncherConfig, {}).releases
    _, processes = _plan(False)
    assert "release-trainer" not in processes
    assert "RLHF_GENERATION_RELEASES" not in processes["generation"].env


def test_with_releases_the_release_stage_runs_and_generation_follows_it():
    assert load_config(LauncherConfig, {"RLHF_UP_RELEASES": "true"}).releases
    keys, processes = _plan(True)
    names = list(processes)
    assert names.index("release-trainer") > names.index("reward")  # the gate scores on it
    release = processes["release-trainer"]
    assert release.command[-1] == "services.trainer"
    assert release.env["RLHF_TRAINER_STAGE"] == "release"
    assert release.env["RLHF_REWARD_ADDRESS"] == f"127.0.0.1:{processes['reward'].grpc_port}"
    assert release.env["RLHF_CLIENT_KEY"] == keys.service  # Score needs the service key
    assert processes["generation"].env["RLHF_GENERATION_RELEASES"] == "true"
    assert CPU_DEMO["release-trainer"]["RLHF_CANARY_SHARE"] == "0.5"
    assert CPU_DEMO["release-trainer"]["RLHF_RELEASE_MAX_SECONDS"] == "600"  # a session sees ends
    assert int(CPU_DEMO["release-trainer"]["RLHF_RELEASE_MIN_AHEAD"]) > 1  # a tellable difference


def test_the_trainer_can_sample_its_rollouts_on_the_generation_pool():
    keys, processes = _plan(False)
    trainer = processes["trainer"]
    assert trainer.env["RLHF_PPO_POOL_ADDRESS"] == (
        f"127.0.0.1:{processes['generation'].grpc_port}"
    )
    assert trainer.env["RLHF_CLIENT_KEY"] == keys.service  # rollouts need the service key
