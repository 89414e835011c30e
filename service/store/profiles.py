"""Reference profiles: how a version's training data and its predictions were distributed.

Per feature: quantile bin edges, the training share in each bin, the share of missing values,
min and max; per version: the predicted class shares (classifiers) or prediction bins
(regressors). Live traffic is binned on the same edges and compared by the Population
Stability Index. Stored as profile.json beside the artifact and hashed into metadata.json, as
the reference sample is.
"""

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

from service.errors import InvalidInput
from service.store.metadata import ArtifactMetadata, ReferenceProfile
from service.store.repository import read_verified
from service.store.runtimes import Arrays, Runtime, RuntimeOptions, runtime_module
from service.store.samples import stored_file_problem

PROFILE_FILE = "profile.json"
BINS = 10
# Shares are floored before the logarithm: an empty bin on one side would make PSI infinite.
SHARE_FLOOR = 1e-4
# Rows per model call while profiling, so a large data file does not make one huge call.
PREDICT_ROWS = 10_000


class Binned(BaseModel):
    """Values cut at interior edges: bin i holds edges[i-1] <= x < edges[i] (open at the ends)."""

    edges: list[float]
    shares: list[float]
    missing_share: float = 0.0
    min: float | None = None
    max: float | None = None


class FeatureProfile(Binned):
    name: str


class PredictionProfile(BaseModel):
    """Class shares (classifiers, `classes` set) or binned predicted values (regressors)."""

    classes: list[str | int] | None = None
    shares: list[float]
    edges: list[float] = []
    min: float | None = None
    max: float | None = None


class Profile(BaseModel):
    rows: int
    features: list[FeatureProfile]
    prediction: PredictionProfile | None = None

    @classmethod
    def read(cls, path: Path) -> "Profile":
        return cls.model_validate_json(path.read_bytes())


def bin_index(edges: NDArray[np.float64], values: NDArray[Any]) -> NDArray[np.intp]:
    """Each value's bin: how many edges are at or below it."""
    return np.searchsorted(edges, values, side="right")


def shares_of(counts: NDArray[Any]) -> NDArray[np.float64]:
    total = counts.sum()
    return counts / total if total else np.zeros(len(counts))


def psi(reference: NDArray[np.float64], live: NDArray[np.float64]) -> float:
    """Population Stability Index: sum over bins of (live - reference) * ln(live / reference)."""
    expected = np.maximum(reference, SHARE_FLOOR)
    actual = np.maximum(live, SHARE_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def bin_values(values: NDArray[Any], bins: int = BINS) -> Binned:
    """Quantile edges of the present values (ties merged) and the share of values per bin."""
    values = np.asarray(values, dtype=np.float64)
    present = values[~np.isnan(values)]
    missing = 1.0 - len(present) / len(values) if len(values) else 0.0
    if not len(present):
        return Binned(edges=[], shares=[1.0], missing_share=missing)
    low, high = float(present.min()), float(present.max())
    # Observed values as edges ("higher"), so a discrete feature's bins fall between its values.
    quantiles = np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1], method="higher")
    edges = np.unique(quantiles)
    edges = edges[edges > low]  # a bin below the minimum would hold nothing from training
    counts = np.bincount(bin_index(edges, present), minlength=len(edges) + 1)
    return Binned(
        edges=edges.tolist(),
        shares=shares_of(counts).tolist(),
        missing_share=missing,
        min=low,
        max=high,
    )


def class_indices(classes: list[str | int], labels: NDArray[Any]) -> NDArray[np.intp]:
    """Each label's position in `classes`; labels outside them get len(classes)."""
    known = np.asarray(classes)
    order = np.argsort(known)
    flat = labels.reshape(-1)
    if flat.dtype.kind != known.dtype.kind:
        flat = flat.astype(known.dtype)
    found = np.searchsorted(known, flat, sorter=order).clip(0, len(known) - 1)
    index = order[found]
    return np.where(known[index] == flat, index, len(known))


def prediction_column(outputs: Arrays) -> NDArray[Any]:
    """What a profile describes of a prediction: the label, else the first output's first value."""
    output = outputs.get("label")
    if output is None:
        output = next(iter(outputs.values()))
    return output.reshape(len(output), -1)[:, 0] if output.ndim != 1 else output


def predicted_values(runtime: Runtime, matrix: NDArray[np.float32]) -> NDArray[Any]:
    name = runtime.signature.inputs[0].name
    parts = [
        prediction_column(runtime.predict({name: matrix[start : start + PREDICT_ROWS]}).outputs)
        for start in range(0, len(matrix), PREDICT_ROWS)
    ]
    return np.concatenate(parts)


def build_profile(
    matrix: NDArray[np.float32], features: list[str], runtime: Runtime | None = None
) -> Profile:
    """The profile of `matrix` (columns are `features`), with the predictions of `runtime`."""
    if matrix.ndim != 2 or matrix.shape[1] != len(features) or not len(matrix):
        raise InvalidInput(
            f"a profile of a {list(matrix.shape)} matrix for {len(features)} features"
        )
    profiled = [
        FeatureProfile(name=name, **bin_values(matrix[:, i]).model_dump())
        for i, name in enumerate(features)
    ]
    prediction = None
    if runtime is not None:
        predicted = predicted_values(runtime, matrix)
        classes = runtime.signature.classes
        if runtime.signature.task == "classification" and classes:
            counts = np.bincount(class_indices(classes, predicted), minlength=len(classes) + 1)
            shares = shares_of(counts[: len(classes)])
            prediction = PredictionProfile(classes=classes, shares=shares.tolist())
        elif predicted.dtype.kind in "fiu":
            binned = bin_values(predicted)
            prediction = PredictionProfile(**binned.model_dump(exclude={"missing_share"}))
    return Profile(rows=len(matrix), features=profiled, prediction=prediction)


def write_profile(folder: Path, profile: Profile) -> ReferenceProfile:
    """Write profile.json into a version's folder; what metadata.json records of it."""
    path = folder / PROFILE_FILE
    path.write_text(profile.model_dump_json(indent=1) + "\n")
    return ReferenceProfile(
        file=PROFILE_FILE, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), rows=profile.rows
    )


def store_profile(folder: Path, profile: Profile) -> ReferenceProfile:
    """Write profile.json beside a packaged version and record its sha256 in metadata.json."""
    info = write_profile(folder, profile)
    metadata_path = folder / "metadata.json"
    metadata = ArtifactMetadata.read(metadata_path)
    metadata.model_copy(update={"profile": info}).write(metadata_path)
    return info


def profile_problem(folder: Path, metadata: ArtifactMetadata) -> str | None:
    """Why a version's profile cannot be trusted; None if it has none or it is intact."""
    info = metadata.profile
    if info is None:
        return None
    return stored_file_problem(folder, info.file, info.sha256, PROFILE_FILE, "profile")


def read_profile(folder: Path, metadata: ArtifactMetadata) -> Profile | None:
    """The version's profile, checked against its sha256; None if it has none."""
    if metadata.profile is None:
        return None
    problem = profile_problem(folder, metadata)
    if problem is not None:
        raise InvalidInput(problem)
    profile = Profile.read(folder / PROFILE_FILE)
    names = [f.name for f in profile.features]
    if names != metadata.features:
        raise InvalidInput(
            f"{folder / PROFILE_FILE} profiles the features {names}; the version declares "
            f"{metadata.features}"
        )
    return profile


def profile_version(
    folder: Path, matrix: NDArray[np.float32], allow_unverified_pickle: bool = False
) -> ReferenceProfile:
    """Profile a packaged version on `matrix` (its feature columns) and store the profile."""
    artifact = read_verified(folder, allow_unverified_pickle)
    if artifact.metadata is None:
        raise InvalidInput(f"{folder}: no metadata.json to record a profile in")
    runtime = runtime_module(artifact.path).load(artifact.data, artifact.metadata, RuntimeOptions())
    return store_profile(folder, build_profile(matrix, artifact.metadata.features, runtime))
