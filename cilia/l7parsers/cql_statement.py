"""A CQL statement as Cilium's cassandra policy sees it: a ``query_action`` (``select``,
``create-table``, ...) and the object it names: a table, a keyspace, or nothing.

Only the head of a statement is read, as far as that name, but through a real lexer: comments
(``--``, ``//``, ``/* */``), string literals (``'...'``, ``$$...$$``), quoted identifiers and
case-insensitive keywords, so that nothing inside a string or a comment is ever taken for a
keyword or a name. A statement that does not fit the grammar below raises StatementError, and the
parser denies it (fail closed): CQL this module cannot read is never passed.

Names follow CQL: unquoted identifiers fold to lower case, quoted ones keep their case (``""``
is a quote). ``BEGIN BATCH ... APPLY BATCH`` in one query string yields its statements.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from enum import Enum


class StatementError(Exception):
    """A statement that cannot be classified (the message says why)."""


@dataclass(frozen=True, slots=True)
class Statement:
    """``table`` is None for keyspace actions (``keyspace`` names the keyspace) and for actions
    without a table (both None); ``keyspace`` is None for a table the session keyspace qualifies."""

    action: str
    keyspace: str | None = None
    table: str | None = None

    @property
    def needs_keyspace(self) -> bool:
        return self.table is not None and self.keyspace is None

    def query_table(self, session_keyspace: str | None = None) -> str:
        """``keyspace.table``; the keyspace for keyspace actions; "" without a table. With no
        session keyspace an unqualified table reads ``.table``, as in Cilium."""
        if self.table is None:
            return self.keyspace or ""
        keyspace = self.keyspace if self.keyspace is not None else session_keyspace or ""
        return f"{keyspace}.{self.table}"


class _Kind(Enum):
    WORD = "word"  # identifiers, keywords, numbers: [A-Za-z0-9_]+
    NAME = "quoted name"
    STRING = "string"
    PUNCT = "punctuation"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    text: str  # a word as written, a quoted name or string unescaped, one punctuation character

    def is_word(self, *words: str) -> bool:
        return self.kind is _Kind.WORD and self.text.lower() in words

    def is_punct(self, char: str) -> bool:
        return self.kind is _Kind.PUNCT and self.text == char


_SPACE = frozenset(" \t\n\r\f\v")
_PUNCT = frozenset(".,;()[]{}<>=!+-*/%?:")

# Cassandra's reserved keywords: never a bare table or keyspace name.
_RESERVED = frozenset("""
    add allow alter and apply asc authorize batch begin by columnfamily create delete desc describe drop
    entries execute from full grant if in index infinity insert into keyspace limit modify nan norecursive
    not null of on or order primary rename replace revoke schema select set table to token truncate
    unlogged update use using view where with
""".split())

_PERMISSIONS = frozenset({"all", "create", "alter", "drop", "select", "modify", "authorize", "describe",
                          "execute", "unmask", "select_masked"})

# Schema objects without a table in policy, and the verbs each takes.
_TABLELESS_OBJECTS = {
    "index": ("create", "drop"),
    "role": ("create", "alter", "drop"),
    "user": ("create", "alter", "drop"),
    "type": ("create", "alter", "drop"),
    "function": ("create", "drop"),
    "aggregate": ("create", "drop"),
    "trigger": ("create", "drop"),
}

_DML = ("insert", "update", "delete")


def _lex(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        two = text[i:i + 2]
        if c in _SPACE:
            i += 1
        elif two in ("--", "//"):  # to the end of the line
            while i < n and text[i] not in "\r\n":
                i += 1
        elif two == "/*":
            end = text.find("*/", i + 2)
            if end < 0:
                raise StatementError("unterminated /* comment")
            i = end + 2
        elif two == "$$":
            end = text.find("$$", i + 2)
            if end < 0:
                raise StatementError("unterminated $$ string")
            tokens.append(_Token(_Kind.STRING, text[i + 2:end]))
            i = end + 2
        elif c in "'\"":
            body, i = _quoted(text, i)
            if c == '"' and not body:
                raise StatementError("empty quoted identifier")
            tokens.append(_Token(_Kind.STRING if c == "'" else _Kind.NAME, body))
        elif c.isascii() and (c.isalnum() or c == "_"):
            start = i
            while i < n and text[i].isascii() and (text[i].isalnum() or text[i] == "_"):
                i += 1
            tokens.append(_Token(_Kind.WORD, text[start:i]))
        elif c in _PUNCT:
            tokens.append(_Token(_Kind.PUNCT, c))
            i += 1
        else:
            raise StatementError(f"unexpected character {c!r} at offset {i}")
    return tokens


def _quoted(text: str, start: int) -> tuple[str, int]:
    """The body of the literal opening at ``start`` (a doubled quote is one) and the offset after it."""
    quote = text[start]
    parts: list[str] = []
    i = start + 1
    while True:
        end = text.find(quote, i)
        if end < 0:
            raise StatementError("unterminated " + ("string" if quote == "'" else "quoted identifier"))
        parts.append(text[i:end])
        if text[end + 1:end + 2] == quote:
            parts.append(quote)
            i = end + 2
        else:
            return "".join(parts), end + 1


class _Cursor:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.i = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def next(self, what: str) -> _Token:
        token = self.peek()
        if token is None:
            raise StatementError(f"statement ends where {what} was expected")
        self.i += 1
        return token

    def keyword(self) -> str:
        token = self.next("a keyword")
        if token.kind is not _Kind.WORD:
            raise StatementError(f"expected a keyword, found {token.kind.value} {token.text!r}")
        return token.text.lower()

    def accept(self, *words: str) -> bool:
        token = self.peek()
        if token is not None and token.is_word(*words):
            self.i += 1
            return True
        return False

    def expect(self, word: str) -> None:
        if not self.accept(word):
            token = self.peek()
            found = "the end" if token is None else repr(token.text)
            raise StatementError(f"expected {word.upper()}, found {found}")

    def ident(self) -> str:
        token = self.next("a name")
        if token.kind is _Kind.NAME:
            return token.text
        if token.kind is _Kind.WORD and token.text[0].isalpha() and token.text.lower() not in _RESERVED:
            return token.text.lower()
        raise StatementError(f"expected a name, found {token.text!r}")

    def name(self) -> tuple[str | None, str]:
        """``[keyspace.]name``."""
        first = self.ident()
        token = self.peek()
        if token is not None and token.is_punct("."):
            self.i += 1
            return first, self.ident()
        return None, first

    def if_exists(self, negated: bool) -> None:
        """Skip ``IF EXISTS`` (``IF NOT EXISTS`` when ``negated``) if present."""
        if self.accept("if"):
            if negated:
                self.expect("not")
            self.expect("exists")

    def skip_to(self, *words: str) -> _Token | None:
        """Advance to the next ``;`` or bare keyword in ``words`` (not consumed); None at the end."""
        while (token := self.peek()) is not None:
            if token.is_punct(";") or token.is_word(*words):
                return token
            self.i += 1
        return None


CACHED_TEXT = 4096  # query strings up to this long are classified once (clients repeat them)


def classify(text: str) -> tuple[Statement, ...]:
    """The statements of one query string: one, or those of a ``BEGIN BATCH`` (maybe none)."""
    return _classify_cached(text) if len(text) <= CACHED_TEXT else _classify(text)


@lru_cache(maxsize=1024)
def _classify_cached(text: str) -> tuple[Statement, ...]:
    return _classify(text)  # statements are frozen: sharing them is safe; errors are not cached


def _classify(text: str) -> tuple[Statement, ...]:
    c = _Cursor(_lex(text))
    if c.peek() is None:
        raise StatementError("empty statement")
    if c.accept("begin"):
        statements = _batch(c)
    else:
        statements = (_statement(c),)
        c.skip_to()
    while (token := c.peek()) is not None and token.is_punct(";"):
        c.i += 1
    if c.peek() is not None:
        raise StatementError("more than one statement in a query")
    return statements


def _batch(c: _Cursor) -> tuple[Statement, ...]:
    c.accept("unlogged", "counter")
    c.expect("batch")
    if c.accept("using"):
        c.skip_to(*_DML, "apply")
    statements: list[Statement] = []
    while True:
        token = c.peek()
        if token is None:
            raise StatementError("BEGIN BATCH without APPLY BATCH")
        if token.is_punct(";"):
            c.i += 1
        elif c.accept("apply"):
            c.expect("batch")
            return tuple(statements)
        elif token.is_word(*_DML):
            c.i += 1
            statements.append(_dml(c, token.text.lower(), stop=(*_DML, "apply")))
            c.skip_to(*_DML, "apply")
        else:
            raise StatementError(f"a batch holds INSERT, UPDATE and DELETE, not {token.text!r}")


def _dml(c: _Cursor, verb: str, stop: tuple[str, ...] = ()) -> Statement:
    if verb == "insert":
        c.expect("into")
    elif verb == "delete":
        _from(c, stop)
    keyspace, table = c.name()
    return Statement(verb, keyspace, table)


def _from(c: _Cursor, stop: tuple[str, ...]) -> None:
    """Skip to just after the statement's FROM (a reserved word: never a bare column name)."""
    token = c.skip_to("from", *stop)
    if token is None or not token.is_word("from"):
        raise StatementError("no FROM clause")
    c.i += 1


def _statement(c: _Cursor) -> Statement:
    verb = c.keyword()
    if verb in _DML:
        return _dml(c, verb)
    if verb == "select":
        _from(c, ())
        keyspace, table = c.name()
        return Statement("select", keyspace, table)
    if verb == "use":
        return Statement("use", keyspace=c.ident())
    if verb == "truncate":
        c.accept("table", "columnfamily")
        keyspace, table = c.name()
        return Statement("truncate-table", keyspace, table)
    if verb in ("create", "alter", "drop"):
        return _schema(c, verb)
    if verb in ("grant", "revoke"):
        return _access_control(c, verb)
    if verb == "list":
        return _list(c)
    if verb in ("describe", "desc"):
        return Statement("describe")  # not a policy action: only a rule without query_action allows it
    raise StatementError(f"unknown statement {verb.upper()}")


def _schema(c: _Cursor, verb: str) -> Statement:
    replace = verb == "create" and c.accept("or")
    if replace:
        c.expect("replace")
    thing = c.keyword()
    if replace and thing not in ("function", "aggregate"):
        raise StatementError(f"CREATE OR REPLACE {thing.upper()}")
    if thing in ("table", "columnfamily"):
        c.if_exists(negated=verb == "create")
        keyspace, table = c.name()
        return Statement(f"{verb}-table", keyspace, table)
    if thing in ("keyspace", "schema"):
        c.if_exists(negated=verb == "create")
        return Statement(f"{verb}-keyspace", keyspace=c.ident())
    if thing == "materialized":
        c.expect("view")
        return Statement(f"{verb}-materialized-view")
    if thing == "custom" and verb == "create":
        c.expect("index")
        return Statement("create-index")
    if verb in _TABLELESS_OBJECTS.get(thing, ()):
        return Statement(f"{verb}-{thing}")
    raise StatementError(f"unknown statement {verb.upper()} {thing.upper()}")


def _access_control(c: _Cursor, verb: str) -> Statement:
    # GRANT perm ON resource TO role | GRANT role TO role (and REVOKE ... FROM): ON is reserved.
    token = c.skip_to("on")
    return Statement(f"{verb}-permission" if token is not None and token.is_word("on") else f"{verb}-role")


def _list(c: _Cursor) -> Statement:
    what = c.keyword()
    if what in ("roles", "users"):
        return Statement(f"list-{what}")
    if what in _PERMISSIONS:
        return Statement("list-permissions")
    raise StatementError(f"unknown statement LIST {what.upper()}")
