"""What the benchmark sends: artifacts, request bodies per server kind, and answer checks."""

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from sklearn import datasets

from service.store.tensors import DATATYPES

# Triton speaks V2 at the same paths and with the same output names as modelserve.
Kind = Literal["modelserve", "mlserver", "tutorial", "triton"]
Encoding = Literal["json", "binary"]
HEADER_LENGTH = "Inference-Header-Content-Length"
DATASETS = {
    "iris": datasets.load_iris,
    "breast_cancer": datasets.load_breast_cancer,
    "iris_int": datasets.load_iris,
}
FORMATS = {1: "joblib", 2: "onnx"}
# Connections (outstanding requests) of single-row runs, and rows of large requests.
CONCURRENCY = (1, 16, 64)
BULK_ROWS = (1_000, 10_000)
# Before a server's measured runs of an artifact, a discarded run of this many seconds (whole:
# wrk takes whole seconds): every server is measured warm (caches, allocator arenas, lazily
# built state), whichever runs first in its repetition.
WARM_UP_S = 1.0


@dataclass(frozen=True)
class Artifact:
    model: str
    version: int

    @property
    def format(self) -> str:
        return FORMATS[self.version]

    @property
    def label(self) -> str:
        return f"{self.model} v{self.version} ({self.format})"

    def path(self, repository: Path) -> Path:
        return repository / self.model / str(self.version) / f"model.{self.format}"


ARTIFACTS = [Artifact(m, v) for m in ("iris", "breast_cancer") for v in FORMATS]
# Iris with integer labels: measured in large requests only, where its answers carry no strings.
LARGE_ONLY_ARTIFACTS = [Artifact("iris_int", v) for v in FORMATS]


def features(model: str, rows: int) -> NDArray[np.float32]:
    """`rows` rows of the model's own dataset (repeated when it has fewer)."""
    data = np.asarray(DATASETS[model]().data, dtype=np.float32)
    return np.ascontiguousarray(np.resize(data, (rows, data.shape[1])))


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes
    content_type: str
    header_length: int | None
    markers: tuple[str, ...]


@dataclass(frozen=True)
class Answer:
    labels: list[str]
    probabilities: NDArray[np.float64]


def _v2_tensor(name: str, rows: NDArray[np.float32]) -> dict[str, Any]:
    return {"name": name, "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}


def build_request(
    kind: Kind, artifact: Artifact, rows: NDArray[np.float32], first_label: str, encoding: Encoding
) -> Request:
    """The request a client of `kind` sends; markers are substrings every right answer has."""
    if kind == "tutorial":
        body = json.dumps({"instances": rows.tolist()}).encode()
        path = f"/models/{artifact.model}/predict"
        return Request(path, body, "application/json", None, ('"probabilities"', first_label))
    if kind == "mlserver":
        payload = {
            "inputs": [_v2_tensor("input-0", rows)],
            "outputs": [{"name": "predict"}, {"name": "predict_proba"}],
        }
        path = f"/v2/models/{artifact.model}/infer"
        body = json.dumps(payload).encode()
        return Request(path, body, "application/json", None, ('"predict_proba"', first_label))
    path = f"/v2/models/{artifact.model}/versions/{artifact.version}/infer"
    if encoding == "json":
        body = json.dumps({"inputs": [_v2_tensor("input", rows)]}).encode()
        return Request(path, body, "application/json", None, ('"probabilities"', first_label))
    raw = rows.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return Request(
        path,
        header + raw,
        "application/octet-stream",
        len(header),
        ('"probabilities"', first_label),
    )


def _binary_outputs(body: bytes, header_length: int) -> dict[str, NDArray[Any]]:
    header = json.loads(body[:header_length])
    offset = header_length
    arrays: dict[str, NDArray[Any]] = {}
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        raw = body[offset : offset + size]
        offset += size
        datatype = output["datatype"]
        if datatype == "BYTES":
            items, at = [], 0
            while at < len(raw):
                (length,) = struct.unpack_from("<I", raw, at)
                items.append(raw[at + 4 : at + 4 + length].decode())
                at += 4 + length
            arrays[output["name"]] = np.asarray(items, dtype=object)
        else:
            dtype = DATATYPES[datatype].newbyteorder("<")
            arrays[output["name"]] = np.frombuffer(raw, dtype=dtype).reshape(output["shape"])
    return arrays


def decode_answer(kind: Kind, body: bytes, header_length: str | None, n_classes: int) -> Answer:
    """Labels and probabilities from a response of any server kind."""
    if kind == "tutorial":
        payload = json.loads(body)
        return Answer(payload["predictions"], np.asarray(payload["probabilities"], dtype=float))
    if header_length is not None:
        arrays = _binary_outputs(body, int(header_length))
        labels = [str(v) for v in arrays["label"]]
        return Answer(labels, np.asarray(arrays["probabilities"], dtype=float))
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    label, proba = (
        ("predict", "predict_proba") if kind == "mlserver" else ("label", "probabilities")
    )
    probabilities = np.asarray(outputs[proba]["data"], dtype=float).reshape(-1, n_classes)
    return Answer([str(v) for v in outputs[label]["data"]], probabilities)
