"""The rows of a job's input before the runner counts them: exact from a Parquet footer, else
estimated from the file's size and the lines of its first MiB."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_SAMPLE_BYTES = 1 << 20


def estimate_rows(source: Path, input_format: str) -> tuple[int, bool] | None:
    """(rows, estimated), or None when the file cannot be read (the job fails later, saying
    why). A Parquet footer holds the exact count; CSV and NDJSON rows are lines, so their
    count is the file's size over the mean line length of a sample, without reading the file."""
    try:
        if input_format == "parquet":
            return pq.ParquetFile(source).metadata.num_rows, False
        size = source.stat().st_size
        with source.open("rb") as file:
            sample = file.read(_SAMPLE_BYTES)
    except (OSError, pa.ArrowException):
        return None
    header = 1 if input_format == "csv" else 0
    if len(sample) == size:  # the whole file: count its lines, a last one without \n included
        lines = sample.count(b"\n") + (1 if sample and not sample.endswith(b"\n") else 0)
        return max(lines - header, 0), True
    whole = sample[: sample.rfind(b"\n") + 1]  # the lines of the sample that ended in it
    lines = whole.count(b"\n")
    if lines <= header:  # not one row in the first MiB: rows longer than the sample
        return 1, True
    body = len(whole) - (whole.index(b"\n") + 1 if header else 0)
    return max(round((size - (len(whole) - body)) * (lines - header) / body), 1), True
