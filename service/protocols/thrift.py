"""Thrift's compact protocol, as much as a Parquet footer needs: read a struct, change it, write it.

A struct is read into `Struct` (field id → type and value) whatever its schema, so fields this
module knows nothing of are written back as they were read. The footer's schema is the
parquet-format project's `parquet.thrift`; the caller names its fields by number.
"""

from dataclasses import dataclass, field

TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(1, 13)
_INTEGERS = (I16, I32, I64)


class ThriftError(ValueError):
    """Bytes that are not a struct in the compact protocol."""


@dataclass
class Items:
    """A list or set: its elements' type and the elements."""

    type: int
    values: list["Value"]
    kind: int = LIST


@dataclass
class Pairs:
    key_type: int
    value_type: int
    pairs: list[tuple["Value", "Value"]]


@dataclass
class Field:
    type: int
    value: "Value"


@dataclass
class Struct:
    fields: dict[int, Field] = field(default_factory=dict)  # in the order they were read

    def get(self, number: int) -> "Value | None":
        found = self.fields.get(number)
        return None if found is None else found.value

    def set_int(self, number: int, value: int) -> None:
        self.fields[number].value = value


Value = bool | int | bytes | Items | Pairs | Struct


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def byte(self) -> int:
        if self.at >= len(self.data):
            raise ThriftError("the struct ends before its last field")
        self.at += 1
        return self.data[self.at - 1]

    def take(self, count: int) -> bytes:
        if count < 0 or self.at + count > len(self.data):
            raise ThriftError("a value runs past the end of the struct")
        self.at += count
        return self.data[self.at - count : self.at]

    def varint(self) -> int:
        result = shift = 0
        while True:
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        number = self.varint()
        return (number >> 1) ^ -(number & 1)

    def value(self, kind: int) -> Value:
        if kind in (TRUE, FALSE):  # an element of a list: one byte each
            return self.byte() == TRUE
        if kind == BYTE:
            return int.from_bytes(self.take(1), "little", signed=True)
        if kind in _INTEGERS:
            return self.zigzag()
        if kind == DOUBLE:
            return self.take(8)
        if kind == BINARY:
            return self.take(self.varint())
        if kind in (LIST, SET):
            header = self.byte()
            size = header >> 4 if header >> 4 != 15 else self.varint()
            return Items(header & 0x0F, [self.value(header & 0x0F) for _ in range(size)], kind)
        if kind == MAP:
            size = self.varint()
            types = self.byte() if size else 0
            key, value = types >> 4, types & 0x0F
            return Pairs(key, value, [(self.value(key), self.value(value)) for _ in range(size)])
        if kind == STRUCT:
            return self.struct()
        raise ThriftError(f"unknown compact type {kind}")

    def struct(self) -> Struct:
        result = Struct()
        last = 0
        while (header := self.byte()) != 0:
            kind, delta = header & 0x0F, header >> 4
            number = last + delta if delta else self.zigzag()
            if kind in (TRUE, FALSE):  # a field's boolean lives in its type
                result.fields[number] = Field(TRUE, kind == TRUE)
            else:
                result.fields[number] = Field(kind, self.value(kind))
            last = number
        return result


def read_struct(data: bytes) -> Struct:
    reader = _Reader(data)
    found = reader.struct()
    if reader.at != len(data):
        raise ThriftError("bytes follow the struct")
    return found


def _varint(number: int, out: bytearray) -> None:
    while number > 0x7F:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)


def _zigzag(number: int, out: bytearray) -> None:
    _varint((number << 1) ^ (number >> 63), out)


def _write_value(kind: int, value: Value, out: bytearray) -> None:
    if kind in (TRUE, FALSE):
        out.append(TRUE if value else FALSE)
    elif kind == BYTE:
        assert isinstance(value, int)
        out += value.to_bytes(1, "little", signed=True)
    elif kind in _INTEGERS:
        assert isinstance(value, int)
        _zigzag(value, out)
    elif kind == DOUBLE:
        assert isinstance(value, bytes)
        out += value
    elif kind == BINARY:
        assert isinstance(value, bytes)
        _varint(len(value), out)
        out += value
    elif isinstance(value, Items):
        size = len(value.values)
        out.append((size if size < 15 else 15) << 4 | value.type)
        if size >= 15:
            _varint(size, out)
        for item in value.values:
            _write_value(value.type, item, out)
    elif isinstance(value, Pairs):
        _varint(len(value.pairs), out)
        if value.pairs:
            out.append(value.key_type << 4 | value.value_type)
        for key, item in value.pairs:
            _write_value(value.key_type, key, out)
            _write_value(value.value_type, item, out)
    else:
        assert isinstance(value, Struct)
        _write_struct(value, out)


def _write_struct(struct: Struct, out: bytearray) -> None:
    last = 0
    for number, found in struct.fields.items():
        kind = (TRUE if found.value else FALSE) if found.type in (TRUE, FALSE) else found.type
        if 0 < number - last <= 15:
            out.append((number - last) << 4 | kind)
        else:
            out.append(kind)
            _zigzag(number, out)
        if kind not in (TRUE, FALSE):
            _write_value(kind, found.value, out)
        last = number
    out.append(0)


def write_struct(struct: Struct) -> bytes:
    out = bytearray()
    _write_struct(struct, out)
    return bytes(out)
