import dataclasses
import importlib.util
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf.config import ConfigError, describe, load_config, parse_args, setting
from services.feedback.config import FeedbackConfig
from services.generation.config import GenerationConfig
from services.reward.config import RewardConfig

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Example:
    port: int = setting("EX_PORT", 1, "a port")
    ratio: float = setting("EX_RATIO", 0.5, "a ratio")
    debug: bool = setting("EX_DEBUG", False, "debug")
    folder: Path = setting("EX_FOLDER", Path("/tmp"), "a folder")
    names: tuple[str, ...] = setting("EX_NAMES", (), "names")
    token: str = setting("EX_TOKEN", "", "a secret", secret=True)


def test_defaults_when_unset():
    assert load_config(Example, {}) == Example()


def test_values_are_parsed_by_type():
    config = load_config(
        Example,
        {
            "EX_PORT": "8080",
            "EX_RATIO": "0.25",
            "EX_DEBUG": "yes",
            "EX_FOLDER": "/data",
            "EX_NAMES": "a, b,,c",
        },
    )
    assert config.port == 8080 and config.ratio == 0.25 and config.debug is True
    assert config.folder == Path("/data")
    assert config.names == ("a", "b", "c")


@pytest.mark.parametrize("env", [{"EX_PORT": "eighty"}, {"EX_DEBUG": "maybe"}])
def test_bad_values_name_the_variable(env):
    with pytest.raises(ConfigError, match=next(iter(env))):
        load_config(Example, env)


def test_help_lists_variables_and_hides_secrets(capsys):
    with pytest.raises(SystemExit):
        parse_args(Example, "example", ["--help"])
    out = capsys.readouterr().out
    assert "EX_PORT" in out and "EX_NAMES" in out
    assert "(secret)" in out


def test_describe_covers_every_field():
    assert [row[0] for row in describe(Example)] == [
        "EX_PORT",
        "EX_RATIO",
        "EX_DEBUG",
        "EX_FOLDER",
        "EX_NAMES",
        "EX_TOKEN",
    ]


def test_services_refuse_to_start_without_keys():
    with pytest.raises(ConfigError, match="RLHF_GENERATION_ID_KEY"):
        load_config(GenerationConfig, {})
    with pytest.raises(ConfigError, match="RLHF_FEEDBACK_API_KEYS"):
        load_config(FeedbackConfig, {"RLHF_GENERATION_ID_KEY": "k" * 32})


def test_serving_budgets_and_dtypes_are_checked_at_start():
    base = {"RLHF_GENERATION_ID_KEY": "k" * 32, "RLHF_GENERATION_OPEN": "1"}
    with pytest.raises(ConfigError, match="RLHF_GENERATION_KV_BUDGET_TOKENS"):
        load_config(GenerationConfig, {**base, "RLHF_GENERATION_KV_BUDGET_TOKENS": "1000"})
    with pytest.raises(ConfigError, match="RLHF_GENERATION_DTYPE"):
        load_config(GenerationConfig, {**base, "RLHF_GENERATION_DTYPE": "float16"})
    with pytest.raises(ConfigError, match="RLHF_REWARD_DTYPE"):
        load_config(RewardConfig, {"RLHF_REWARD_DTYPE": "int8"})


def test_generation_is_closed_unless_opened_and_keys_are_checked():
    key = {"RLHF_GENERATION_ID_KEY": "k" * 32}
    with pytest.raises(ConfigError, match="closed by default"):
        load_config(GenerationConfig, key)
    assert load_config(GenerationConfig, {**key, "RLHF_GENERATION_OPEN": "true"}).open_access
    apps = load_config(GenerationConfig, {**key, "RLHF_GENERATION_API_KEYS": "acme=" + "a" * 20})
    assert apps.apps().names("app") == {"acme"}
    with pytest.raises(ConfigError, match="one key is both service 't' and reader 'r'"):
        load_config(
            GenerationConfig,
            {**key, "RLHF_SERVICE_KEYS": "t=" + "s" * 20, "RLHF_READER_KEYS": "r=" + "s" * 20},
        )
    with pytest.raises(ConfigError, match="VERIFY_KEYS"):
        load_config(FeedbackConfig, {**key, "RLHF_GENERATION_ID_VERIFY_KEYS": "short"})
    with pytest.raises(ConfigError, match="RLHF_TLS_CLIENT_AUTH needs RLHF_TLS_CA_FILE"):
        load_config(
            GenerationConfig, {**key, "RLHF_GENERATION_OPEN": "1", "RLHF_TLS_CLIENT_AUTH": "1"}
        )


def test_call_limits_come_from_the_configuration():
    from rlhf.server import SPARE_THREADS, call_limits

    env = {"RLHF_GENERATION_ID_KEY": "k" * 32, "RLHF_GENERATION_OPEN": "1"}
    limits = call_limits(load_config(GenerationConfig, env))
    assert (limits.max_calls, limits.slot_wait, limits.waiting) == (32, 0.1, 32)
    set_env = {**env, "RLHF_MAX_CALLS": "8", "RLHF_CALL_SLOT_WAIT_MS": "250"}
    limits = call_limits(load_config(GenerationConfig, set_env))
    assert (limits.max_calls, limits.slot_wait, limits.waiting) == (8, 0.25, 8)
    at_once = call_limits(load_config(GenerationConfig, {**env, "RLHF_CALL_SLOT_WAIT_MS": "0"}))
    assert at_once.waiting == 0 and at_once.threads == 32 + SPARE_THREADS
    with pytest.raises(ConfigError, match="RLHF_CALL_SLOT_WAIT_MS"):
        load_config(GenerationConfig, {**env, "RLHF_CALL_SLOT_WAIT_MS": "-1"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RLHF_KAFKA_SECURITY_PROTOCOL": "TLS"}, "must be one of"),
        ({"RLHF_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "SASL needs"),
        ({"RLHF_KAFKA_SSL_CA_FILE": "/nonexistent/ca.pem"}, "not a readable file"),
        ({"RLHF_KAFKA_SSL_CERT_FILE": __file__}, "set both"),
    ],
)
def test_kafka_security_settings_are_checked(env, message):
    from rlhf.config import KafkaSettings

    with pytest.raises(ConfigError, match=message):
        load_config(KafkaSettings, env)


def test_kafka_security_reaches_every_client():
    """What kafka-python is given: it accepts every option (an unknown one is a ValueError
    before any connection is tried)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaTimeoutError

    from rlhf import bus
    from rlhf.broker import free_port
    from rlhf.config import KafkaSettings

    settings = load_config(
        KafkaSettings,
        {
            "RLHF_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "RLHF_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "RLHF_KAFKA_SASL_USERNAME": "rlhf",
            "RLHF_KAFKA_SASL_PASSWORD": "secret",
            "RLHF_KAFKA_SSL_CA_FILE": __file__,
        },
    )
    try:
        bus.configure(settings)
        options = bus.client_options()
        assert options == {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_plain_username": "rlhf",
            "sasl_plain_password": "secret",
            "ssl_check_hostname": True,
            "ssl_cafile": __file__,
        }
        with pytest.raises(KafkaTimeoutError):  # no broker there; every option was taken
            KafkaProducer(
                bootstrap_servers=f"127.0.0.1:{free_port()}", bootstrap_timeout_ms=200, **options
            )
    finally:
        bus.configure(KafkaSettings())
    assert bus.client_options() == {"security_protocol": "PLAINTEXT"}


def _config_classes() -> set[type]:
    """Every settings class the platform declares: each service's config, the classes they
    inherit and the groups nested in them, recursively."""
    found: set[type] = set()
    pending = [cls for _, cls in _service_configs()]
    while pending:
        cls = pending.pop()
        if cls in found or not dataclasses.is_dataclass(cls):
            continue
        found.add(cls)
        pending += [base for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)]
        hints = typing.get_type_hints(cls)
        pending += [hints[f.name] for f in dataclasses.fields(cls) if "group" in f.metadata]
    return found


def _service_configs() -> list[tuple[str, type]]:
    spec = importlib.util.spec_from_file_location("generate_docs", ROOT / "docs" / "generate.py")
    docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs)
    return docs.service_configs()


def test_every_setting_is_declared_once():
    """A variable may be declared again only to change a default in a subclass (each service
    its own gRPC port); settings several services read live in one shared class."""
    declared: dict[str, list[type]] = {}
    for cls in _config_classes():
        own = cls.__dict__.get("__annotations__", {})
        for field in dataclasses.fields(cls):
            if field.name in own and "env" in field.metadata:
                declared.setdefault(field.metadata["env"], []).append(cls)
    assert "RLHF_PPO_CLIP_RANGE" in declared and "RLHF_SEED" in declared
    twice = {
        env: sorted(c.__qualname__ for c in classes)
        for env, classes in declared.items()
        if not any(all(issubclass(c, root) for c in classes) for root in classes)
    }
    assert not twice, f"declared in unrelated classes: {twice}"


def test_libs_never_import_services():
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "libs").rglob("*.py")
        if re.search(r"^\s*(from|import) services\b", path.read_text(), re.MULTILINE)
    ]
    assert not offenders, f"libs/ modules importing services/: {offenders}"


def test_a_service_lowers_its_own_priority_when_asked():
    """RLHF_NICE: the process (here a child Python) runs at that nice value afterwards."""
    script = (
        "import os; from rlhf.server import lower_priority; lower_priority(7); print(os.nice(0))"
    )
    base = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.nice(0))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert int(done.stdout) == base + 7
    refused = subprocess.run(
        [sys.executable, "-c", script.replace("(7)", "(-1)")], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "RLHF_NICE=-1" in refused.stderr


def _python_in_session(code: str, *args: str, leader: bool = True) -> str:
    """What a child Python running `code` prints, in a session of its own or in ours."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=leader,
    ).stdout.strip()


def test_a_session_leader_lowers_its_autogroup_too_and_a_session_member_does_not(tmp_path):
    """With autogroup scheduling, nice counts only inside a session; make up starts each
    service in a session of its own, so the session's autogroup takes the nice value too. A
    process in someone else's session (a shell's) must leave that session's group alone."""
    script = (
        "import os, sys; from pathlib import Path; from rlhf.server import nice_autogroup; "
        "path = Path(sys.argv[1]); done = nice_autogroup(7, path); "
        "print(done, path.read_text().strip())"
    )
    fake = tmp_path / "autogroup"  # the kernel's file format, in a file the test can read back
    for leader, expected in ((True, "True 7"), (False, "False /autogroup-1 nice 0")):
        fake.write_text("/autogroup-1 nice 0\n")
        assert _python_in_session(script, str(fake), leader=leader) == expected
    fake.write_text("/autogroup-1 nice 12\n")  # already lower: never raised back
    assert _python_in_session(script, str(fake)) == "True /autogroup-1 nice 12"
    real = Path("/proc/self/autogroup")
    if real.exists():  # where the kernel has autogroups, the real one takes the value
        check = (
            "import os; from rlhf.server import lower_priority; lower_priority(5); "
            "print(open('/proc/self/autogroup').read().split('nice')[1].strip())"
        )
        assert int(_python_in_session(check)) == 5
