"""The shape of a JSON array of numbers, read from its brackets and commas alone.

What is left of `[[5.1,3.5],[1.4,0.2]]` without its numbers and whitespace, `[[,],[,]]`, is its
skeleton. A rectangular array's skeleton is its first row's repeated, so the skeleton can be
checked piece by piece as the text is read, keeping only that row: ragged data never matches.
"""

from service.errors import InvalidInput

MAX_DIMENSIONS = 64


def ragged(where: str) -> InvalidInput:
    return InvalidInput(f"{where}: rows have different lengths (ragged data)")


class Skeleton:
    """Fed the skeleton of an array in pieces; `shape` checks the end and gives the shape."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.head = b""  # the skeleton until its first row is whole
        self.unit = b""  # the first row's skeleton and a comma: what the rest repeats
        self.row = b""
        self.checked = 0  # bytes after the opening bracket matched against repeated units
        self.last = b""  # the latest byte, held back: the last of all is "]", not ","

    def feed(self, piece: bytes) -> None:
        if not self.unit:
            self.head += piece
            if not self._find_row():
                return
            piece, self.head = self.head[1:], b""
        if not piece:
            return
        text, self.last = self.last + piece[:-1], piece[-1:]
        offset = self.checked % len(self.unit)
        repeats = (offset + len(text)) // len(self.unit) + 1
        if (self.unit * repeats)[offset : offset + len(text)] != text:
            raise ragged(self.where)
        self.checked += len(text)

    def shape(self, has_numbers: bool) -> tuple[int, ...]:
        """The shape, once every piece is fed; refuses a skeleton that does not close rows."""
        if not self.unit or self.last != b"]" or (self.checked + 1) % len(self.unit):
            raise ragged(self.where)
        rows = (self.checked + 1) // len(self.unit)
        if not self.row:  # one dimension: the "rows" are the numbers themselves
            return (rows if has_numbers else 0,)
        return (rows, *shape_of(self.row, has_numbers, self.where))

    def _find_row(self) -> bool:
        depth = len(self.head) - len(self.head.lstrip(b"["))
        if depth > MAX_DIMENSIONS:
            raise InvalidInput(f"{self.where}: data nested more than {MAX_DIMENSIONS} levels deep")
        if depth == len(self.head):
            return False  # all brackets so far: the depth is not known yet
        if depth > 1:
            end = self.head.find(b"]" * (depth - 1), 1)
            if end < 0:
                return False
            self.row = self.head[1 : end + depth - 1]
        self.unit = self.row + b","
        return True


def shape_of(skeleton: bytes, has_numbers: bool, where: str) -> tuple[int, ...]:
    """The shape of a rectangular array from its whole skeleton.

    The shape is read off the first list at each level, then the skeleton is compared with the
    one that shape makes.
    """
    depth = len(skeleton) - len(skeleton.lstrip(b"["))
    first = skeleton[depth - 1 : skeleton.find(b"]") + 1]
    width = len(first) - 1 if has_numbers else 0
    block = b"[" + b"," * (width - 1) + b"]" if width else b"[]"
    dims = [width]
    for level in range(depth - 1, 0, -1):
        # The first list at this level closes with the lists it holds first.
        closing = depth - level + 1
        end = skeleton.find(b"]" * closing, level - 1)
        count, rest = divmod(end + closing - level, len(block) + 1)
        if end < 0 or rest or count < 1:
            raise ragged(where)
        block = b"".join((b"[", (block + b",") * (count - 1), block, b"]"))
        dims.insert(0, count)
    if block != skeleton:
        raise ragged(where)
    return tuple(dims)
