"""`modelserve convert`: a scikit-learn version turned into an ONNX version, checked for parity.

skl2onnx converts the estimator with the canonical tensors (input `input` FP32; outputs `label`
and `probabilities`, or `prediction`) and without ZipMap. Tree ensembles then get their input
cast to double. skl2onnx already rounds each float threshold so that a float32 value takes the
branch scikit-learn takes, but onnxruntime sums the trees' outputs in the input's precision,
in an order that depends on its threads and the rows per call: in float32 a forest's exact tie
(50 trees against 50) can come out as 0.49999994 against 0.50000006, which flips the label.
In double the sums, and so the labels, are scikit-learn's; the graph's input stays FP32.

The candidate is loaded by the same runtime as any ONNX version and must answer a reference
sample as its source does before a file is written; the version then appears at once, as a
finished folder renamed into place.
"""

import hashlib
import io
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnx
import sklearn
from numpy.typing import NDArray
from onnx import TensorProto, helper

from service.errors import InvalidInput, ModelNotFound
from service.store.metadata import ArtifactMetadata, ConvertedFrom, Parity
from service.store.packaging import next_version
from service.store.profiles import Profile, profile_problem, read_profile, write_profile
from service.store.repository import (
    PICKLE_SUFFIXES,
    model_dir,
    parse_version,
    read_model_config,
    read_verified,
)
from service.store.runtimes import Prediction, RuntimeOptions, runtime_module
from service.store.runtimes import onnx as onnx_runtime
from service.store.samples import (
    choose_rows,
    chosen_rows,
    read_sample_file,
    read_stored_sample,
    write_sample,
)
from service.store.tensors import TensorSpec

# Probabilities: absolute difference. Regressors: difference relative to the prediction, or to
# the sample's mean absolute prediction where that is larger (a prediction near zero would
# otherwise be held to a bound no float computation meets). float32 rounding stays below 1e-6.
DEFAULT_TOLERANCE = 1e-5
TARGET_OPSET = 17
SHOWN_ROWS = 5
# A larger sample file is checked on this many of its rows, drawn at random (seeded).
PARITY_ROWS = 10_000
_TREE_ENSEMBLES = ("TreeEnsembleClassifier", "TreeEnsembleRegressor")


@dataclass(frozen=True)
class Disagreement:
    row: int  # in the sample, counted from 1
    source: str
    converted: str


@dataclass(frozen=True)
class ParityCheck:
    figures: Parity
    failed_rows: int
    label_mismatches: int
    first: list[Disagreement] = field(default_factory=list)
    calls: str = ""  # how the converted model was called, e.g. "one row a call, 2 threads"

    @property
    def ok(self) -> bool:
        return self.failed_rows == 0

    @property
    def worst(self) -> float:
        figures = self.figures
        found = [figures.max_abs_probability_difference, figures.max_relative_prediction_difference]
        return max((f for f in found if f is not None), default=0.0)


@dataclass(frozen=True)
class Conversion:
    source: str  # "iris:1"
    target: str  # "iris:3"
    parity: ParityCheck
    folder: Path | None  # None: refused, nothing written

    def refusal(self) -> str:
        """The one-line reason a refused conversion gives."""
        parity = self.parity
        figures = parity.figures
        tolerance = f"above the tolerance of {figures.tolerance:g}"
        causes = []
        if parity.label_mismatches:
            count = parity.label_mismatches
            causes.append(f"labels differ on {count} row{'s' if count > 1 else ''}")
        worst = figures.max_abs_probability_difference
        if worst is not None and not worst <= figures.tolerance:
            causes.append(f"probabilities differ by up to {worst:.3g}, {tolerance}")
        relative = figures.max_relative_prediction_difference
        if relative is not None:
            causes.append(f"predictions differ by up to {relative:.3g} relative, {tolerance}")
        fix = (
            "labels must be identical, so keep serving the scikit-learn version"
            if parity.label_mismatches
            else "keep serving the scikit-learn version, or raise --tolerance if such "
            "differences are acceptable"
        )
        return (
            f"the ONNX conversion of {self.source} disagrees with it on {parity.failed_rows} of "
            f"{figures.rows} rows of {figures.sample} ({parity.calls}): {' and '.join(causes)}; "
            f"{fix}; "
            f"{self.target} was not written"
        )


def resolve_version(folder: Path, text: str) -> int:
    """A version number, or an alias of the model's model.toml."""
    number = parse_version(text)
    if number is None:
        config, _ = read_model_config(folder / "model.toml")
        number = config.aliases.get(text)
    if number is None or not (folder / str(number)).is_dir():
        raise ModelNotFound(f"model {folder.name!r} has no version {text!r} in {folder.parent}")
    return number


def convert_version(
    root: Path,
    name: str,
    version: str,
    *,
    sample_file: Path | None = None,
    new_version: int | None = None,
    tolerance: float | None = None,
) -> Conversion:
    """Convert root/name/version to ONNX as a new version, if it passes the parity check."""
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    folder = model_dir(root, name)
    if not folder.is_dir():
        raise ModelNotFound(f"model {name!r} is not in {root}")
    number = resolve_version(folder, version)
    source_dir = folder / str(number)
    target_number = new_version if new_version is not None else next_version(folder)
    if (folder / str(target_number)).exists():
        raise InvalidInput(f"{folder / str(target_number)} exists; choose another --version")
    verified = read_verified(source_dir, allow_unverified_pickle=False)
    metadata = verified.metadata
    if verified.path.suffix not in PICKLE_SUFFIXES:
        raise InvalidInput(f"{name}:{number} is already {verified.path.name}; nothing to convert")
    if metadata is None or metadata.task not in ("classification", "regression"):
        raise InvalidInput(
            f"{name}:{number} needs a metadata.json of a classifier or regressor; "
            "add it with `modelserve package`"
        )
    sample, numbers, sample_name = _parity_sample(source_dir, metadata, sample_file)
    graph = _to_onnx(_read_estimator(verified.data), metadata)
    data = graph.SerializeToString()
    converted = _converted_metadata(data, metadata, target_number)
    source_runtime = runtime_module(verified.path).load(verified.data, metadata, RuntimeOptions())
    name_in = metadata.inputs[0].name
    expected = source_runtime.predict({name_in: sample})
    checks = [
        replace(
            check_parity(expected, answer, metadata, tolerance, sample_name, numbers), calls=calls
        )
        for calls, answer in _candidate_answers(data, converted, name_in, sample)
    ]
    parity = max(checks, key=lambda check: (check.failed_rows, check.worst))
    conversion = Conversion(f"{name}:{number}", f"{name}:{target_number}", parity, None)
    if not parity.ok:
        return conversion
    converted.converted_from = ConvertedFrom(
        version=number,
        artifact=verified.path.name,
        sha256=metadata.sha256,
        converter={"skl2onnx": _skl2onnx_version(), "scikit-learn": sklearn.__version__},
        parity=parity.figures,
    )
    written = _write_version(
        root,
        folder / str(target_number),
        data,
        converted,
        sample,
        _profile_of(source_dir, metadata),
    )
    return Conversion(conversion.source, conversion.target, parity, written)


def _parity_sample(
    source_dir: Path, metadata: ArtifactMetadata, sample_file: Path | None
) -> tuple[NDArray[np.float32], NDArray[np.intp], str]:
    """The rows to check on, their row numbers (from 1) in the sample, and the sample's name."""
    if sample_file is not None:
        rows = read_sample_file(sample_file, metadata.features, metadata.allow_nan)
        positions = chosen_rows(len(rows), PARITY_ROWS)
        return rows[positions], positions + 1, str(sample_file)
    stored = read_stored_sample(source_dir, metadata)
    if stored is None:
        raise InvalidInput(
            f"{metadata.name}:{metadata.version} has no reference sample; pass --sample FILE, "
            f"a CSV or Parquet file with the columns {', '.join(metadata.features[:3])}"
            f"{', …' if len(metadata.features) > 3 else ''}"
        )
    label = f"the reference sample of {metadata.name}:{metadata.version}"
    return stored, np.arange(1, len(stored) + 1), label


def _candidate_answers(
    data: bytes, metadata: ArtifactMetadata, name: str, sample: NDArray[np.float32]
) -> Iterator[tuple[str, Prediction]]:
    """The converted model's answers to the sample, called as a server may call it.

    onnxruntime splits a call between its intra-op threads (MODELSERVE_ONNX_INTRA_OP_THREADS)
    by rows or, for few rows, by trees, which changes the order of float sums: the answers
    must agree with one thread and several, for the whole sample and one row at a time.
    """
    for threads in (1, 2, 4):
        runtime = onnx_runtime.load(data, metadata, RuntimeOptions(onnx_intra_op_threads=threads))
        threads_text = f"{threads} intra-op thread{'s' if threads > 1 else ''}"
        yield f"the whole sample in one call, {threads_text}", runtime.predict({name: sample})
        answers = [runtime.predict({name: sample[i : i + 1]}) for i in range(len(sample))]
        yield (
            f"one row a call, {threads_text}",
            Prediction(
                {k: np.concatenate([a.outputs[k] for a in answers]) for k in answers[0].outputs}
            ),
        )


def _read_estimator(data: bytes) -> Any:
    with warnings.catch_warnings():
        # A scikit-learn version mismatch is reported by the runtime that loads the source.
        warnings.simplefilter("ignore", category=UserWarning)
        return joblib.load(io.BytesIO(data))


def _skl2onnx_version() -> str:
    import skl2onnx

    return str(skl2onnx.__version__)


# Of an exporter's message, at most this much goes into the one-line error.
_REASON_CHARS = 300


def _to_onnx(estimator: Any, metadata: ArtifactMetadata) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    width = _width(metadata)
    steps = getattr(estimator, "steps", None)
    final = steps[-1][1] if steps else estimator
    classifier = metadata.task == "classification"
    try:
        model: onnx.ModelProto = convert_sklearn(
            estimator,
            initial_types=[("input", FloatTensorType([None, width]))],
            options={id(final): {"zipmap": False}} if classifier else None,
            target_opset=TARGET_OPSET,
        )
    except Exception as exc:  # skl2onnx raises many unrelated types for what it cannot convert
        # Any step may be the one it cannot convert: a Pipeline is named with all of them.
        names = [type(step).__name__ for _, step in steps] if steps else []
        what = f"Pipeline({', '.join(names)})" if steps else type(final).__name__
        reason = " ".join(str(exc).split())
        if len(reason) > _REASON_CHARS:  # cut between words
            reason = reason[:_REASON_CHARS].rsplit(" ", 1)[0] + " …"
        raise InvalidInput(
            f"skl2onnx cannot convert {what} ({type(exc).__name__}: {reason})"
        ) from exc
    _trees_in_double(model.graph)
    _canonical_outputs(model.graph, [spec.name for spec in metadata.outputs])
    return model


def _width(metadata: ArtifactMetadata) -> int:
    """Features per row: from the input's shape, else from the feature names."""
    shape = metadata.inputs[0].shape if len(metadata.inputs) == 1 else []
    return shape[-1] if len(shape) == 2 and shape[-1] > 0 else len(metadata.features)


def _trees_in_double(graph: onnx.GraphProto) -> None:
    """Cast each tree ensemble's input to double, so that onnxruntime sums the trees in double.

    The thresholds stay the float32 ones skl2onnx chose for float32 inputs; a float32 value
    cast to double compares with them exactly as it did.
    """
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain == "ai.onnx.ml" and node.op_type in _TREE_ENSEMBLES:
            as_double = f"{node.input[0]}_as_double_{len(nodes)}"
            nodes.append(
                helper.make_node(
                    "Cast", [node.input[0]], [as_double], to=TensorProto.DOUBLE, name=as_double
                )
            )
            node.input[0] = as_double
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _canonical_outputs(graph: onnx.GraphProto, names: list[str]) -> None:
    """Name the graph's outputs as the source's, in order; drop outputs the source lacks
    (a classifier without predict_proba gets scores from skl2onnx, not probabilities)."""
    if len(graph.output) < len(names):
        raise InvalidInput(
            f"skl2onnx produced {len(graph.output)} outputs; the version has {len(names)}"
        )
    del graph.output[len(names) :]
    for output, name in zip(graph.output, names, strict=True):
        old = output.name
        if old == name:
            continue
        for node in graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
            node.input[:] = [name if i == old else i for i in node.input]
        output.name = name


def _converted_metadata(data: bytes, source: ArtifactMetadata, number: int) -> ArtifactMetadata:
    graph = onnx_runtime.describe(data)
    if len(graph.outputs) != len(source.outputs):
        raise InvalidInput(
            f"the ONNX graph has {len(graph.outputs)} outputs; "
            f"the version has {len(source.outputs)}"
        )
    outputs = [
        TensorSpec(name=spec.name, datatype=found.datatype, shape=spec.shape)
        for spec, found in zip(source.outputs, graph.outputs, strict=True)
    ]
    if source.task == "classification" and graph.classes != source.classes:
        raise InvalidInput(
            f"the ONNX graph's classes {graph.classes} differ from the version's {source.classes}"
        )
    return ArtifactMetadata(
        name=source.name,
        version=number,
        artifact="model.onnx",
        sha256=hashlib.sha256(data).hexdigest(),
        task=source.task,
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, _width(source)])],
        outputs=outputs,
        features=source.features,
        classes=source.classes,
        framework=onnx_runtime.framework_versions(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training=source.training,
        allow_nan=source.allow_nan,
    )


def check_parity(
    source: Prediction,
    candidate: Prediction,
    metadata: ArtifactMetadata,
    tolerance: float,
    sample: str,
    numbers: NDArray[np.intp],
) -> ParityCheck:
    """Every label identical; probabilities (or predictions, relatively) within `tolerance`.

    `numbers` are the rows' numbers in the sample, as the disagreements name them.
    """
    if metadata.task == "regression":
        return _regression_parity(source, candidate, tolerance, sample, numbers)
    labels = np.asarray(source.outputs["label"])
    converted = np.asarray(candidate.outputs["label"])
    rows = len(labels)
    mismatched = np.asarray(labels != converted, dtype=np.bool_).reshape(rows)
    failed = mismatched.copy()
    worst: float | None = None
    shown: list[str] = [repr(label.item()) for label in labels]
    shown_converted: list[str] = [repr(label.item()) for label in converted]
    if "probabilities" in source.outputs:
        exact = np.asarray(source.outputs["probabilities"], dtype=np.float64)
        near = np.asarray(candidate.outputs["probabilities"], dtype=np.float64)
        difference = np.abs(exact - near).max(axis=1)
        worst = float(difference.max())
        failed |= ~(difference <= tolerance)  # NaN fails too
        shown = [f"{s} {_vector(p)}" for s, p in zip(shown, exact, strict=True)]
        shown_converted = [f"{s} {_vector(p)}" for s, p in zip(shown_converted, near, strict=True)]
    figures = Parity(
        rows=rows,
        label_agreement=round(1 - int(mismatched.sum()) / rows, 6),
        max_abs_probability_difference=worst,
        tolerance=tolerance,
        sample=sample,
    )
    first = [
        Disagreement(int(numbers[row]), shown[row], shown_converted[row])
        for row in np.flatnonzero(failed)[:SHOWN_ROWS]
    ]
    return ParityCheck(figures, int(failed.sum()), int(mismatched.sum()), first)


def _regression_parity(
    source: Prediction,
    candidate: Prediction,
    tolerance: float,
    sample: str,
    numbers: NDArray[np.intp],
) -> ParityCheck:
    exact = np.asarray(source.outputs["prediction"], dtype=np.float64)
    near = np.asarray(candidate.outputs["prediction"], dtype=np.float64)
    scale = max(float(np.abs(exact).mean()), float(np.finfo(np.float32).tiny))
    relative = np.abs(exact - near) / np.maximum(np.abs(exact), scale)
    failed = ~(relative <= tolerance)
    figures = Parity(
        rows=len(exact),
        max_relative_prediction_difference=float(relative.max()),
        tolerance=tolerance,
        sample=sample,
    )
    first = [
        Disagreement(int(numbers[row]), f"{exact[row]:.8g}", f"{near[row]:.8g}")
        for row in np.flatnonzero(failed)[:SHOWN_ROWS]
    ]
    return ParityCheck(figures, int(failed.sum()), 0, first)


def _vector(values: NDArray[np.float64]) -> str:
    return "[" + ", ".join(f"{v:.8g}" for v in values) + "]"


def _profile_of(source_dir: Path, metadata: ArtifactMetadata) -> Profile | None:
    """The source version's drift profile, if it has an intact one: the converted version
    takes the same rows and, with parity checked, predicts alike, so the profile holds for it."""
    if metadata.profile is None or profile_problem(source_dir, metadata) is not None:
        return None
    return read_profile(source_dir, metadata)


def _write_version(
    root: Path,
    target: Path,
    data: bytes,
    metadata: ArtifactMetadata,
    sample: NDArray[np.float32],
    profile: Profile | None,
) -> Path:
    """Write the version into a hidden folder of the repository, then rename it into place:
    a server polling the repository sees no version or a whole one."""
    staging = root / f".convert-{metadata.name}-{metadata.version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        (staging / metadata.artifact).write_bytes(data)
        metadata.reference_sample = write_sample(staging, choose_rows(sample), metadata.features)
        if profile is not None:
            metadata.profile = write_profile(staging, profile)
        metadata.write(staging / "metadata.json")
        if target.exists():
            raise InvalidInput(f"{target} appeared during the conversion; nothing was written")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
