"""docs/operations.md must be what `make docs` writes from the code, and its runbook must cover
every alert the Prometheus rules can raise."""

import importlib.util
from pathlib import Path

import yaml

from rlhf.config import describe

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("generate_docs", ROOT / "docs" / "generate.py")
docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs)


def test_generated_references_are_fresh():
    committed = docs.DOC.read_text()
    assert docs.render(committed) == committed, "docs/operations.md is stale: run `make docs`"


def test_every_setting_and_metric_is_listed():
    text = docs.DOC.read_text()
    configs = docs.service_configs()
    assert {name for name, _ in configs} >= {"generation", "feedback", "reward", "trainer"}
    for _, cls in configs:
        for env, *_ in describe(cls):
            assert f"| `{env}` |" in text, f"{env} ({cls.__name__}) missing in operations.md"
    # Metrics from a library module, a service module and the server bootstrap.
    for name in ("rlhf_reward_live", "rlhf_feedback_thumbs_total", "rlhf_grpc_requests_total"):
        assert f"| `{name}` |" in text


def test_the_runbook_covers_every_alert():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    alerts = [
        rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule
    ]
    assert alerts
    text = docs.DOC.read_text()
    missing = [alert for alert in alerts if f"### `{alert}`" not in text]
    assert not missing, f"runbook sections missing in docs/operations.md: {missing}"


def test_hand_written_parts_survive_regeneration():
    marked = (
        "intro\n\n"
        f"{docs.BEGIN.format(name='configuration')}\nSTALE-ROWS\n{docs.END.format(name='configuration')}"
        "\n\nmiddle\n\n"
        f"{docs.BEGIN.format(name='metrics')}\nSTALE-ROWS\n{docs.END.format(name='metrics')}\n\nend\n"
    )
    fresh = docs.render(marked)
    assert fresh.startswith("intro\n\n") and "\n\nmiddle\n\n" in fresh and fresh.endswith("end\n")
    assert "STALE-ROWS" not in fresh and "`RLHF_KAFKA_BOOTSTRAP`" in fresh
