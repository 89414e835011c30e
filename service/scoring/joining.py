"""The parts of a scored file joined in order, without decoding them again.

CSV and NDJSON parts are bytes end to end (only the first part has the CSV header). A Parquet
part is a file of its own: the row groups of the later parts are copied as bytes after the
first part's, and one footer lists them all, their offsets moved to where they now lie. Only
parts that cannot be joined so (their schemas differ, as NDJSON's inferred types may from part
to part) are decoded and cast to the first part's schema. Bytes are copied by the kernel
(copy_file_range) where it can.
"""

import os
import shutil
from pathlib import Path

from service.protocols import thrift
from service.protocols.files import make_encoder, open_parquet, parquet_chunks
from service.protocols.thrift import Items, Struct

_MAGIC = b"PAR1"
_COPY_BYTES = 1 << 30
# FileMetaData fields (parquet.thrift) that must be equal in every part joined as bytes.
_SAME = (1, 2, 5, 7)  # version, schema, key-value metadata (Arrow's schema), column orders


def _copy(source: Path, out: int, start: int, stop: int) -> None:
    """Bytes [start, stop) of `source` written at the position of the descriptor `out`."""
    with source.open("rb") as piece:
        offset = start
        try:
            while offset < stop:
                sent = os.copy_file_range(
                    piece.fileno(), out, min(stop - offset, _COPY_BYTES), offset_src=offset
                )
                if sent == 0:
                    break
                offset += sent
        except OSError:  # not between these files (another file system, an old kernel)
            pass
        piece.seek(offset)
        while offset < stop and (data := piece.read(min(stop - offset, 1 << 22))):
            os.write(out, data)  # a regular file takes all of it
            offset += len(data)


def _append_bytes(first: Path, rest: list[Path]) -> None:
    out = os.open(first, os.O_WRONLY)
    try:
        for path in rest:
            os.lseek(out, 0, os.SEEK_END)
            _copy(path, out, 0, path.stat().st_size)
    finally:
        os.close(out)


def _footer(path: Path) -> tuple[Struct, int]:
    """A Parquet file's metadata and the offset where the footer holding it starts."""
    with path.open("rb") as source:
        size = source.seek(0, os.SEEK_END)
        source.seek(max(size - 8, 0))
        tail = source.read(8)
        length = int.from_bytes(tail[:4], "little")
        if len(tail) < 8 or tail[4:] != _MAGIC or length > size - 12:
            raise thrift.ThriftError(f"{path.name} does not end in a plain Parquet footer")
        source.seek(size - 8 - length)
        return thrift.read_struct(source.read(length)), size - 8 - length


def _groups(metadata: Struct) -> list[Struct]:
    groups = metadata.get(4)
    if not isinstance(groups, Items) or not all(isinstance(g, Struct) for g in groups.values):
        raise thrift.ThriftError("the footer has no row groups")
    return [g for g in groups.values if isinstance(g, Struct)]


def _chunks(group: Struct) -> list[Struct]:
    columns = group.get(1)
    if not isinstance(columns, Items):
        raise thrift.ThriftError("a row group has no column chunks")
    return [c for c in columns.values if isinstance(c, Struct)]


def _movable(metadata: Struct) -> bool:
    """Whether offsets are all the footer holds of where things lie: no encryption, page
    indexes, Bloom filters or column chunks in other files, which hold offsets of their own."""
    if 8 in metadata.fields:
        return False
    for group in _groups(metadata):
        for chunk in _chunks(group):
            details = chunk.get(3)
            if not isinstance(details, Struct) or any(n in chunk.fields for n in (1, 4, 6, 8, 9)):
                return False
            if 14 in details.fields:
                return False
    return True


def _move(group: Struct, shift: int, ordinal: int) -> None:
    """A row group's offsets moved by `shift` bytes, and its position among the groups."""
    if isinstance(offset := group.get(5), int):  # RowGroup.file_offset
        group.set_int(5, offset + shift)
    if 7 in group.fields:  # RowGroup.ordinal, an i16 that only encryption uses
        if ordinal < 1 << 15:
            group.set_int(7, ordinal)
        else:
            del group.fields[7]
    for chunk in _chunks(group):
        if isinstance(offset := chunk.get(2), int) and offset > 0:  # ColumnChunk.file_offset
            chunk.set_int(2, offset + shift)
        details = chunk.get(3)
        assert isinstance(details, Struct)
        for number in (9, 10, 11):  # data, index and dictionary page offsets
            if isinstance(offset := details.get(number), int):
                details.set_int(number, offset + shift)


def _same(first: Struct, other: Struct) -> bool:
    return all(first.fields.get(n) == other.fields.get(n) for n in _SAME)


def _append_parquet(first: Path, rest: list[Path]) -> bool:
    """Appends the row groups of `rest` to `first` as bytes; False (and `first` untouched) when
    the parts cannot be joined so."""
    try:
        metadata, end = _footer(first)
        others = [(path, *_footer(path)) for path in rest]
        parts = [metadata] + [other for _, other, _ in others]
        if not all(_movable(m) and _same(metadata, m) for m in parts):
            return False
    except thrift.ThriftError:
        return False
    groups = _groups(metadata)
    rows = metadata.get(3)
    assert isinstance(rows, int)
    out = os.open(first, os.O_WRONLY)
    try:
        position = end
        for path, other, start in others:
            os.lseek(out, position, os.SEEK_SET)
            _copy(path, out, len(_MAGIC), start)
            for group in _groups(other):
                _move(group, position - len(_MAGIC), len(groups))
                groups.append(group)
            other_rows = other.get(3)
            assert isinstance(other_rows, int)
            rows += other_rows
            position += start - len(_MAGIC)
        metadata.fields[4] = thrift.Field(thrift.LIST, Items(thrift.STRUCT, list(groups)))
        metadata.set_int(3, rows)
        footer = thrift.write_struct(metadata)
        os.lseek(out, position, os.SEEK_SET)
        os.write(out, footer + len(footer).to_bytes(4, "little") + _MAGIC)
        os.ftruncate(out, position + len(footer) + 8)
    finally:
        os.close(out)
    return True


def _reencode_parquet(first: Path, rest: list[Path], chunk_rows: int) -> None:
    """Every part decoded and cast to the first part's schema, into `first`."""
    joined = first.with_name(first.name + ".joined")
    encoder = make_encoder("parquet")
    with joined.open("wb") as out:
        for path in [first, *rest]:
            if not path.stat().st_size:
                continue
            for chunk in parquet_chunks(open_parquet(path), chunk_rows):
                out.write(encoder.encode(chunk.table))
        out.write(encoder.close())
    os.replace(joined, first)


def append_parts(file_format: str, first: Path, rest: list[Path], chunk_rows: int) -> None:
    """Appends the parts `rest` to the part `first`, in order: `first` becomes the whole file.
    A part without rows may be an empty file (a Parquet part then has no footer)."""
    rest = [path for path in rest if path.stat().st_size]
    if not rest:
        return
    if file_format != "parquet":
        _append_bytes(first, rest)
    elif not (first.stat().st_size and _append_parquet(first, rest)):
        _reencode_parquet(first, rest, chunk_rows)


def join_parts(file_format: str, paths: list[Path], target: Path, chunk_rows: int) -> None:
    """The parts written in order into `target`, leaving them as they are."""
    shutil.copyfile(paths[0], target)
    append_parts(file_format, target, paths[1:], chunk_rows)
