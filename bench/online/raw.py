"""The floor: model calls in-process, without a server, on the same artifacts."""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from bench.online.workload import Artifact, features
from service.store.repository import read_verified
from service.store.runtimes import Runtime, RuntimeOptions, runtime_module


def seconds_per_call(call: Callable[[], object], budget_s: float = 0.3) -> float:
    """The mean time of one call over about budget_s seconds of calls.

    A mean over a stretch of time, as wrk measures the servers: the best of a few short runs
    would flatter the raw call on a machine that other work shares.
    """
    call()  # warm caches and lazily built state
    calls = 0
    started = time.perf_counter()
    elapsed = 0.0
    while elapsed < budget_s:
        call()
        calls += 1
        elapsed = time.perf_counter() - started
    return elapsed / calls


def load_runtime(repository: Path, artifact: Artifact, options: RuntimeOptions) -> Runtime:
    """The artifact loaded as the server loads it (sha256 checked, same runtime module)."""
    verified = read_verified(repository / artifact.model / str(artifact.version), False)
    return runtime_module(verified.path).load(verified.data, verified.metadata, options)


def estimator_call(path: Path, rows: NDArray[np.float32]) -> Callable[[], object]:
    """The bare scikit-learn call a hand-written server makes: predict and predict_proba."""
    estimator: Any = joblib.load(path)

    def call() -> object:
        return estimator.predict(rows), estimator.predict_proba(rows)

    return call


def session_call(
    path: Path, rows: NDArray[np.float32], options: RuntimeOptions
) -> Callable[[], object]:
    """The bare onnxruntime call a hand-written server makes: session.run of every output."""
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = options.onnx_intra_op_threads
    settings.inter_op_num_threads = options.onnx_inter_op_threads
    session: Any = ort.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: rows}
    return lambda: session.run(None, feed)


def runtime_call(runtime: Runtime, rows: NDArray[np.float32]) -> Callable[[], object]:
    inputs = {runtime.signature.inputs[0].name: rows}
    return lambda: runtime.predict(inputs)


def measure_raw(
    repository: Path, artifact: Artifact, rows: int, options: RuntimeOptions, budget_s: float = 0.3
) -> dict[str, float]:
    """Rows/s of the raw calls on `rows` rows: the runtime, and the bare estimator (joblib) or
    onnxruntime session (ONNX)."""
    data = features(artifact.model, rows)
    runtime = load_runtime(repository, artifact, options)
    result = {"runtime": rows / seconds_per_call(runtime_call(runtime, data), budget_s)}
    bare = bare_call(repository, artifact, data, options)
    if bare is not None:
        name, call = bare
        result[name] = rows / seconds_per_call(call, budget_s)
    return result


def bare_call(
    repository: Path, artifact: Artifact, rows: NDArray[np.float32], options: RuntimeOptions
) -> tuple[str, Callable[[], object]] | None:
    """The call a hand-written server makes on `rows`, named as the raw records name it:
    "estimator" (joblib) or "session" (ONNX); None for another format."""
    if artifact.format == "joblib":
        return "estimator", estimator_call(artifact.path(repository), rows)
    if artifact.format == "onnx":
        return "session", session_call(artifact.path(repository), rows, options)
    return None
