"""A small, strict reader of the protobuf text format (pipeline.config, label_map.pbtxt) without the .proto.

    parse(text)  -> Message: {field name: [value, ...]} in file order (every field is a list, so repeated
                    fields and several fields on one line read the same way)
    load(path)   -> the same, or a one-line UserError naming the file and line

Values: a nested Message for ``name { ... }`` / ``name: { ... }`` / ``name < ... >``; a str for a quoted
string ('' or "", C escapes, adjacent strings joined); an int or float for a number; the bare word
for an identifier (enums, true / false, inf / nan). ``name: [a, b]`` appends each element. ``#`` starts a
comment; ``,`` and ``;`` between fields are allowed. Types are checked where a value is read
(:func:`scalar`, :func:`ints`, ...), since without the .proto the reader cannot know them.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Union

from utils.errors import UserError

Value = Union["Message", str, int, float]
Message = dict[str, list]


class PbtxtError(ValueError):
    """The text is not protobuf text format; ``line`` is 1-based."""

    def __init__(self, message: str, line: int):
        super().__init__(f"line {line}: {message}")
        self.line = line


_TOKEN = re.compile(r"""
    (?P<space>[ \t\r\f\v]+|\n)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)[fF]?)(?![\w.])
  | (?P<word>-?[A-Za-z_][\w.]*|-?\[[\w./]+\])
  | (?P<symbol>[{}<>\[\]:,;])
""", re.VERBOSE)


class _Token:
    __slots__ = ("kind", "text", "line")

    def __init__(self, kind: str, text: str, line: int):
        self.kind, self.text, self.line = kind, text, line


def _tokens(text: str) -> list[_Token]:
    tokens, line, pos = [], 1, 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise PbtxtError(f"unexpected {text[pos:pos + 10].split()[0] if text[pos:].strip() else 'character'!r}",
                             line)
        kind, value = match.lastgroup, match.group()
        if kind == "space":
            line += value == "\n"
        elif kind != "comment":
            tokens.append(_Token(kind, value, line))
        pos = match.end()
    return tokens


def _string(token: _Token) -> str:
    body = token.text[1:-1]
    try:
        return codecs.escape_decode(body.encode("utf-8"))[0].decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise PbtxtError(f"bad escape in the string {token.text}", token.line) from None


def _number(token: _Token) -> int | float:
    text = token.text.rstrip("fF") if not token.text.lower().startswith(("0x", "-0x", "+0x")) else token.text
    try:
        if re.fullmatch(r"[-+]?(0[xX][0-9a-fA-F]+)", text):
            return int(text, 16)
        if re.fullmatch(r"[-+]?\d+", text):
            return int(text)
        return float(text)
    except ValueError:
        raise PbtxtError(f"bad number {token.text}", token.line) from None


class _Parser:
    def __init__(self, text: str):
        self.tokens = _tokens(text)
        self.pos = 0
        self.last_line = text.count("\n") + 1

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise PbtxtError("unexpected end of file (a '}' missing?)", self.last_line)
        self.pos += 1
        return token

    def message(self, closing: str | None) -> Message:
        fields: Message = {}
        while True:
            token = self.peek()
            if token is None:
                if closing is not None:
                    raise PbtxtError(f"unexpected end of file: a '{closing}' is missing", self.last_line)
                return fields
            if token.kind == "symbol" and token.text == closing:
                self.pos += 1
                return fields
            if token.kind != "word" or token.text.startswith("-"):
                raise PbtxtError(f"expected a field name, found {token.text!r}", token.line)
            self.pos += 1
            self.field(token.text, fields)
            following = self.peek()
            if following is not None and following.kind == "symbol" and following.text in ",;":
                self.pos += 1

    def field(self, name: str, fields: Message) -> None:
        token = self.take()
        values = fields.setdefault(name, [])
        if token.kind == "symbol" and token.text in "{<":
            values.append(self.message("}" if token.text == "{" else ">"))
            return
        if not (token.kind == "symbol" and token.text == ":"):
            raise PbtxtError(f"expected ':' or '{{' after {name}, found {token.text!r}", token.line)
        token = self.take()
        if token.kind == "symbol" and token.text in "{<":
            values.append(self.message("}" if token.text == "{" else ">"))
        elif token.kind == "symbol" and token.text == "[":
            while True:
                token = self.take()
                if token.kind == "symbol" and token.text == "]":
                    break
                if token.kind == "symbol" and token.text in "{<":
                    values.append(self.message("}" if token.text == "{" else ">"))
                else:
                    values.append(self.scalar(token, name))
                token = self.take()
                if token.kind == "symbol" and token.text == "]":
                    break
                if not (token.kind == "symbol" and token.text == ","):
                    raise PbtxtError(f"expected ',' or ']' in the list of {name}, found {token.text!r}", token.line)
        else:
            values.append(self.scalar(token, name))

    def scalar(self, token: _Token, name: str) -> str | int | float:
        if token.kind == "string":
            parts = [_string(token)]
            while (following := self.peek()) is not None and following.kind == "string":
                parts.append(_string(self.take()))
            return "".join(parts)
        if token.kind == "number":
            return _number(token)
        if token.kind == "word":
            return token.text
        raise PbtxtError(f"expected a value for {name}, found {token.text!r}", token.line)


def parse(text: str) -> Message:
    """The fields of a protobuf text-format document (see the module docstring); PbtxtError if malformed."""
    return _Parser(text).message(None)


def load(path: Path, what: str = "file") -> Message:
    """parse() of a file; a one-line UserError (exit 2) when it cannot be read or is malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the {what} '{path}': {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return parse(text)
    except PbtxtError as exc:
        raise UserError(f"'{path}' is not a valid {what} (protobuf text format): {exc}") from None


# --- reading values -----------------------------------------------------------------------------

def message(fields: Message | None, *path: str) -> Message | None:
    """The first nested message along ``path`` (e.g. "model", "ssd"), or None when a step is absent."""
    for name in path:
        if fields is None:
            return None
        found = [value for value in fields.get(name, []) if isinstance(value, dict)]
        fields = found[0] if found else None
    return fields


def values(fields: Message | None, name: str) -> list:
    """Every scalar value of ``name`` (a repeated field), in file order; [] when absent."""
    return [value for value in (fields or {}).get(name, []) if not isinstance(value, dict)]


def last(fields: Message | None, name: str):
    """The value of a singular scalar field (the last one given, as protobuf does), or None."""
    found = values(fields, name)
    return found[-1] if found else None
