"""Dynamic batching in a real server: concurrent requests share model calls, answers split back.

Proven through the public surface only: every answer is compared with the artifact run
directly (scikit-learn and onnxruntime, without modelserve), and the batch-size histogram
`modelserve_batch_rows` shows that calls were shared and that each version's calls held
exactly that version's rows.
"""

import asyncio
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_breast_cancer

from tests.scrape import Series, scrape, total
from tests.serving import run_server

ROWS = load_breast_cancer().data.astype(np.float32)
# Each request: (version, first row, row count, outputs asked for; None = all).
Plan = tuple[int, int, int, list[str] | None]
SELECTIONS: list[list[str] | None] = [
    None,
    ["probabilities"],
    ["label"],
    ["label", "probabilities"],
]


def expected_outputs(repository: Path, version: int) -> dict[str, np.ndarray]:
    """Labels and probabilities of every row, from the artifact run without modelserve."""
    folder = repository / "breast_cancer" / str(version)
    if version == 1:
        forest: Any = joblib.load(folder / "model.joblib")
        return {"label": forest.predict(ROWS), "probabilities": forest.predict_proba(ROWS)}
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"input": ROWS})
    return {"label": np.asarray(label), "probabilities": np.asarray(probabilities)}


def plans(rounds: int, concurrency: int) -> list[list[Plan]]:
    result: list[list[Plan]] = []
    for r in range(rounds):
        batch: list[Plan] = []
        for i in range(concurrency):
            index = r * concurrency + i
            version = 2 if index % 4 == 3 else 1
            count = 1 if index % 5 else 3
            batch.append((version, (index * 7) % (len(ROWS) - 3), count, SELECTIONS[index % 4]))
        result.append(batch)
    return result


async def infer(client: httpx.AsyncClient, plan: Plan) -> dict[str, Any]:
    version, first, count, selection = plan
    body: dict[str, Any] = {
        "id": f"{version}-{first}-{count}",
        "inputs": [
            {
                "name": "input",
                "shape": [count, ROWS.shape[1]],
                "datatype": "FP32",
                "data": ROWS[first : first + count].tolist(),
            }
        ],
    }
    if selection is not None:
        body["outputs"] = [{"name": name} for name in selection]
    response = await client.post(f"/v2/models/breast_cancer/versions/{version}/infer", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def run_rounds(url: str, rounds: list[list[Plan]]) -> list[list[dict[str, Any]]]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        return [await asyncio.gather(*(infer(client, plan) for plan in batch)) for batch in rounds]


def predicted_labels(samples: dict[Series, float], version: int) -> dict[str, float]:
    """modelserve_predictions_total per label for one breast_cancer version."""
    counts: dict[str, float] = {}
    for (name, labels), value in samples.items():
        found = dict(labels)
        if (
            name == "modelserve_predictions_total"
            and found.get("model") == "breast_cancer"
            and found.get("version") == str(version)
        ):
            counts[found["label"]] = value
    return counts


def batch_rows(samples: dict[Series, float], version: int) -> tuple[float, float]:
    """(sum, count) of the batch-size histogram of one breast_cancer version."""
    labels = {"model": "breast_cancer", "version": str(version)}
    return (
        total(samples, "modelserve_batch_rows_sum", **labels),
        total(samples, "modelserve_batch_rows_count", **labels),
    )


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
def test_concurrent_requests_are_batched_and_split_back_exactly(
    repository: Path, tmp_path: Path, batching: bool
) -> None:
    if not batching:
        (repository / "breast_cancer" / "model.toml").write_text("[batching]\nmax_batch_rows = 0\n")
    rounds = plans(rounds=4, concurrency=32)
    with run_server(repository, tmp_path) as server:
        answers = asyncio.run(run_rounds(server.url, rounds))
        metrics = scrape(server.url)
    expected = {v: expected_outputs(repository, v) for v in (1, 2)}

    for plan, answer in zip(
        (p for batch in rounds for p in batch), (a for batch in answers for a in batch), strict=True
    ):
        version, first, count, selection = plan
        assert answer["id"] == f"{version}-{first}-{count}"
        assert answer["model_version"] == str(version)
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert list(outputs) == (selection or ["label", "probabilities"])
        want = expected[version]
        if "label" in outputs:
            assert outputs["label"]["shape"] == [count]
            assert outputs["label"]["data"] == [
                str(v) for v in want["label"][first : first + count]
            ]
        if "probabilities" in outputs:
            assert outputs["probabilities"]["shape"] == [count, 2]
            np.testing.assert_allclose(
                np.reshape(outputs["probabilities"]["data"], (count, 2)),
                want["probabilities"][first : first + count],
                atol=1e-6,
            )

    for version in (1, 2):
        sent = sum(count for batch in rounds for v, _, count, _ in batch if v == version)
        rows_in_calls, calls = batch_rows(metrics, version)
        # Every row of this version went through exactly one call of this version's model.
        assert rows_in_calls == sent, (version, rows_in_calls, sent)
        # ... and its predicted label was counted once, whatever call it shared.
        labels = [
            str(label)
            for batch in rounds
            for v, first, count, _ in batch
            if v == version
            for label in expected[version]["label"][first : first + count]
        ]
        counted = {label: float(labels.count(label)) for label in set(labels)}
        assert predicted_labels(metrics, version) == counted
    rows_in_calls, calls = batch_rows(metrics, 1)
    requests = sum(1 for batch in rounds for plan in batch if plan[0] == 1)
    if batching:
        # The forest takes milliseconds per call, so concurrent requests must share calls.
        assert rows_in_calls / calls > 1.5, (rows_in_calls, calls)
    else:
        assert calls == requests
