from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf.config import ConfigError, describe, load_config, parse_args, setting
from services.feedback.config import FeedbackConfig
from services.generation.config import GenerationConfig


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
