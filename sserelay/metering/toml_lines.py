"""Line numbers for the keys of a TOML document, which tomllib does not keep.

The keys file's errors name `FILE:LINE`; this module finds the LINE.
"""

from __future__ import annotations

import bisect

__all__ = ["TomlLines"]


class TomlLines:
    """Where each key path of a TOML document is first defined, as 1-based line numbers.

    tomllib parses values but keeps no positions, so this small scanner walks the text of a
    document that tomllib has already accepted: table headers, `dotted.key = value` lines and
    the keys of inline tables, skipping strings (all four kinds), arrays and comments. It never
    raises; a path it cannot place gets the line of its closest placed prefix, else line 1.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.newlines = [at for at, char in enumerate(text) if char == "\n"]
        self.lines: dict[tuple[str, ...], int] = {}
        self.pos = 0
        try:
            self._document()
        except (IndexError, ValueError):  # a scanner bug must not hide the real error
            pass

    def line_of(self, path: tuple[str, ...]) -> int:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return 1

    # -- scanning

    def _line(self) -> int:
        return bisect.bisect_right(self.newlines, self.pos - 1) + 1

    def _record(self, path: tuple[str, ...], line: int) -> None:
        for end in range(1, len(path) + 1):
            self.lines.setdefault(path[:end], line)

    def _peek(self, length: int = 1) -> str:
        return self.text[self.pos : self.pos + length]

    def _skip_blank(self, newlines: bool) -> None:
        """Skip spaces and tabs (and newlines and comments when `newlines`)."""
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t\r" or (newlines and char == "\n"):
                self.pos += 1
            elif char == "#" and newlines:
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def _document(self) -> None:
        table: tuple[str, ...] = ()
        while True:
            self._skip_blank(newlines=True)
            if self.pos >= len(self.text):
                return
            line = self._line()
            if self._peek() == "[":
                double = self._peek(2) == "[["
                self.pos += 2 if double else 1
                table = self._key()
                self.pos += 2 if double else 1
                self._record(table, line)
            else:
                path = (*table, *self._key())
                self._record(path, line)
                self.pos += 1  # the '='
                self._value(path)

    def _key(self) -> tuple[str, ...]:
        """A dotted key (bare and quoted parts); stops after its trailing blanks."""
        parts: list[str] = []
        while True:
            self._skip_blank(newlines=False)
            char = self._peek()
            if char == '"':
                parts.append(self._basic_string())
            elif char == "'":
                end = self.text.index("'", self.pos + 1)
                parts.append(self.text[self.pos + 1 : end])
                self.pos = end + 1
            else:
                start = self.pos
                while self.pos < len(self.text) and (
                    self.text[self.pos].isascii()
                    and (self.text[self.pos].isalnum() or self.text[self.pos] in "-_")
                ):
                    self.pos += 1
                parts.append(self.text[start : self.pos])
            self._skip_blank(newlines=False)
            if self._peek() != ".":
                return tuple(parts)
            self.pos += 1

    def _basic_string(self) -> str:
        """A one-line "..." string with its escapes decoded (a quoted key may use them)."""
        self.pos += 1
        out: list[str] = []
        escapes = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
        while (char := self.text[self.pos]) != '"':
            if char == "\\":
                kind = self.text[self.pos + 1]
                if kind in "uU":
                    width = 4 if kind == "u" else 8
                    digits = self.text[self.pos + 2 : self.pos + 2 + width]
                    out.append(chr(int(digits, 16)))
                    self.pos += 2 + width
                else:
                    out.append(escapes.get(kind, kind))
                    self.pos += 2
            else:
                out.append(char)
                self.pos += 1
        self.pos += 1
        return "".join(out)

    def _value(self, path: tuple[str, ...]) -> None:
        """Skip one value; the keys of an inline table are recorded under `path`."""
        self._skip_blank(newlines=False)
        text = self.text
        for quotes in ('"""', "'''"):
            if self._peek(3) == quotes:
                self.pos += 3
                while text[self.pos : self.pos + 3] != quotes:
                    self.pos += 2 if quotes == '"""' and text[self.pos] == "\\" else 1
                self.pos += 3
                while self._peek() == quotes[0]:  # up to two quotes may end the content
                    self.pos += 1
                return
        char = self._peek()
        if char == '"':
            self._basic_string()
        elif char == "'":
            self.pos = text.index("'", self.pos + 1) + 1
        elif char == "[":
            self.pos += 1
            while True:
                self._skip_blank(newlines=True)
                if self._peek() == "]":
                    self.pos += 1
                    return
                if self._peek() == ",":
                    self.pos += 1
                    continue
                self._value(path)
        elif char == "{":
            self.pos += 1
            while True:
                self._skip_blank(newlines=False)
                if self._peek() == "}":
                    self.pos += 1
                    return
                if self._peek() == ",":
                    self.pos += 1
                    continue
                line = self._line()
                inner = (*path, *self._key())
                self._record(inner, line)
                self.pos += 1  # the '='
                self._value(inner)
        else:  # a number, boolean or date-time (which may hold one space): up to a delimiter
            while self.pos < len(text) and text[self.pos] not in ",]}#\n":
                self.pos += 1
