"""Reference samples: stored beside a version, hashed into its metadata, read as features."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.errors import InvalidInput
from service.store.metadata import ArtifactMetadata
from service.store.samples import (
    MAX_ROWS,
    choose_rows,
    read_sample_file,
    read_stored_sample,
    sample_problem,
    store_reference_sample,
)


def test_training_stores_a_hashed_sample_that_reads_back(repository: Path) -> None:
    folder = repository / "iris" / "1"
    metadata = ArtifactMetadata.read(folder / "metadata.json")
    assert metadata.reference_sample is not None
    assert metadata.reference_sample.rows == 112  # the training split of iris's 150 rows
    assert sample_problem(folder, metadata) is None
    rows = read_stored_sample(folder, metadata)
    assert rows is not None
    assert rows.shape == (112, 4)
    assert rows.dtype == np.float32


def test_a_large_sample_is_cut_to_a_seeded_subset(repository: Path) -> None:
    folder = repository / "diabetes" / "1"
    rows = np.arange(5 * MAX_ROWS * 10, dtype=np.float32).reshape(-1, 10)
    first = store_reference_sample(folder, rows)
    again = store_reference_sample(folder, rows)
    assert first.rows == MAX_ROWS
    assert first.sha256 == again.sha256
    stored = read_stored_sample(folder, ArtifactMetadata.read(folder / "metadata.json"))
    assert stored is not None
    np.testing.assert_array_equal(stored, choose_rows(rows))
    assert (np.diff(stored[:, 0]) > 0).all()  # in their order in the data


def test_a_changed_or_missing_sample_is_reported(repository: Path) -> None:
    folder = repository / "iris" / "1"
    metadata = ArtifactMetadata.read(folder / "metadata.json")
    sample = folder / "reference_sample.parquet"
    sample.write_bytes(sample.read_bytes() + b"\0")
    problem = sample_problem(folder, metadata)
    assert problem is not None
    assert "does not match metadata.json" in problem
    with pytest.raises(InvalidInput, match="pass a sample file"):
        read_stored_sample(folder, metadata)
    sample.unlink()
    assert sample_problem(folder, metadata) == f"{sample} is missing"


@pytest.mark.parametrize(
    ("columns", "allow_nan", "message"),
    [
        ({"a": ["1", "x"], "b": ["2", "3"]}, False, "column 'a' is not numeric"),
        ({"a": [1.0, None], "b": [2.0, 3.0]}, False, "row 2, column 'a': missing value"),
        ({"a": [1.0, float("inf")], "b": [2.0, 3.0]}, False, "row 2, column 'a': not a finite"),
        ({"a": [1.0, float("nan")], "b": [2.0, 3.0]}, False, "row 2, column 'a': not a finite"),
        ({"a": [1.0], "c": [2.0]}, False, "lacks the feature column 'b'"),
    ],
)
def test_sample_files_are_checked(
    tmp_path: Path, columns: dict[str, list[object]], allow_nan: bool, message: str
) -> None:
    path = tmp_path / "sample.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(InvalidInput, match=message):
        read_sample_file(path, ["a", "b"], allow_nan)


def test_gaps_reach_models_that_handle_them_as_nan(tmp_path: Path) -> None:
    path = tmp_path / "sample.csv"
    path.write_text("b,a,extra\n2,1,x\n3,,y\n4,nan,z\n")
    rows = read_sample_file(path, ["a", "b"], allow_nan=True)
    expected = np.array([[1.0, 2.0], [np.nan, 3.0], [np.nan, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(rows, expected)
