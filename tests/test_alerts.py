"""The example alerting rules: promtool accepts them, they name our metrics, and they fire."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.observability.metrics import create_metrics

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "modelserve-alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")

# Series written the way `promtool test rules` reads them: the value every minute.
UNIT_TEST = {
    "rule_files": [str(RULES)],
    "evaluation_interval": "1m",
    "tests": [
        {
            "interval": "1m",
            "input_series": [
                {
                    "series": 'modelserve_feature_drift_psi{model="iris",version="1",'
                    'feature="petal_length"}',
                    "values": "0.4x30",
                },
                {
                    "series": 'modelserve_feature_drift_psi{model="iris",version="1",'
                    'feature="sepal_width"}',
                    "values": "0.02x30",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "20m",
                    "alertname": "ModelserveFeatureDrift",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "model": "iris",
                                "version": "1",
                                "feature": "petal_length",
                            },
                            "exp_annotations": {
                                "summary": "iris v1: feature petal_length drifted",
                                "description": "The Population Stability Index of petal_length "
                                "over the recent rows is 0.40 (above 0.25): the inputs no longer "
                                "look like the training data. GET /v2/models/iris/versions/1/"
                                "drift shows which bins moved.",
                            },
                        }
                    ],
                }
            ],
        }
    ],
}


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_a_drifted_feature_fires_and_a_steady_one_does_not(tmp_path: Path) -> None:
    # JSON is YAML, so the unit test needs no YAML writer.
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(json.dumps(UNIT_TEST))
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", str(tests)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_query_metrics_the_server_defines() -> None:
    registry = CollectorRegistry()
    create_metrics(registry)
    families = list(registry.collect())
    defined = {m.name for m in families} | {m.name + "_total" for m in families}
    queried = set(re.findall(r"\bmodelserve_[a-z_]+", RULES.read_text()))
    assert queried
    assert queried <= defined, queried - defined
