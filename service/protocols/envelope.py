"""JSON request envelopes, decoded with each field left as raw bytes of the body.

msgspec checks the whole document is well-formed JSON in one pass, but hands back the value of
each field as a `Raw` slice of the body (lists of objects, such as V2's `inputs`, one level
down): small fields are then decoded on their own, and tensor data by `arrays`, without ever
becoming Python lists of numbers.
"""

import codecs
import re
from typing import Any

import msgspec

from service.errors import InvalidInput

# Documents up to this depth always decode; the decoder's own limit lies somewhat beyond it.
MAX_JSON_DEPTH = 512

_UTF8_CHUNK_BYTES = 1 << 20
_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_FIELDS_AND_OBJECTS = msgspec.json.Decoder(dict[str, list[dict[str, msgspec.Raw]] | msgspec.Raw])
_VALUE = msgspec.json.Decoder()
_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])
_OBJECTS = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])
_OPENING_BRACE, _OPENING_BRACKET = ord("{"), ord("[")
_NOT_AN_OBJECT = frozenset(b"[-0123456789]")
_FIRST_ITEM_IS_OBJECT = re.compile(rb"\[\s*\{")


def _too_deep() -> InvalidInput:
    return InvalidInput(f"request JSON is nested more than {MAX_JSON_DEPTH} levels deep")


Body = bytes | bytearray | memoryview
Field = list[dict[str, msgspec.Raw]] | msgspec.Raw


def fields_and_objects(body: Body, not_an_object: str) -> dict[str, Field]:
    """The fields of a JSON object, undecoded but for lists of objects, whose items come as
    their own fields; in one pass over the body."""
    if body and bytes(body[:1]) == b"{":
        _check_utf8(body)
        try:
            return _FIELDS_AND_OBJECTS.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            pass  # told apart, with the right message, below
    return dict(fields(body, not_an_object))


def fields(body: Body, not_an_object: str) -> dict[str, msgspec.Raw]:
    """The fields of a JSON object, undecoded; `not_an_object` is the error if it is not one."""
    if not body:
        raise InvalidInput("request body is not valid JSON: empty document")
    _check_utf8(body)
    try:
        return _FIELDS.decode(body)
    except msgspec.ValidationError:
        raise InvalidInput(not_an_object) from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {_reason(exc)}") from None
    except RecursionError:
        raise _too_deep() from None


def _check_utf8(body: Body) -> None:
    """msgspec leaves what it skips unchecked: a body must be UTF-8 as a whole, as JSON is."""
    text = body if isinstance(body, bytes | bytearray) else bytes(body)
    if text.isascii():
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(text)
    for start in range(0, len(view), _UTF8_CHUNK_BYTES):
        try:
            decoder.decode(
                view[start : start + _UTF8_CHUNK_BYTES],
                final=start + _UTF8_CHUNK_BYTES >= len(view),
            )
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"request body is not valid UTF-8: {exc.reason} at byte {start + exc.start}"
            ) from None


def objects(raw: msgspec.Raw, what: str) -> list[dict[str, msgspec.Raw]] | None:
    """A JSON list of objects, each with its fields undecoded; None if `raw` is not a list."""
    if not is_list(raw):
        return None
    try:
        return _OBJECTS.decode(raw)
    except msgspec.ValidationError:
        items = _ITEMS.decode(raw)
    except RecursionError:
        raise _too_deep() from None
    index = next(i for i, item in enumerate(items) if not is_object(item))
    raise InvalidInput(f"{what}[{index}] must be a JSON object")


def is_object(raw: msgspec.Raw) -> bool:
    view = memoryview(raw)
    return bool(view) and view[0] == _OPENING_BRACE


def is_list(raw: msgspec.Raw) -> bool:
    view = memoryview(raw)
    return bool(view) and view[0] == _OPENING_BRACKET


def first_item_is_object(raw: msgspec.Raw) -> bool | None:
    """Whether a JSON list's first item is an object (rows keyed by name); None if `raw` is
    not a list."""
    view = memoryview(raw)
    if not view or view[0] != _OPENING_BRACKET:
        return None
    if len(view) > 1 and view[1] in _NOT_AN_OBJECT:
        return False
    return _FIRST_ITEM_IS_OBJECT.match(view) is not None


def value(field: Field) -> Any:
    """A small field's value, decoded."""
    if isinstance(field, list):
        return [{key: value(item) for key, item in fields.items()} for fields in field]
    return _VALUE.decode(field)


def _reason(exc: msgspec.DecodeError) -> str:
    return str(exc).removeprefix("JSON is malformed: ")
