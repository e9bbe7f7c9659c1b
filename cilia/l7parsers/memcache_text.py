"""Memcached's text protocol (classic and meta commands, doc/protocol.txt), framed as memcached
1.6 frames it and named for policy; the server's replies are followed so that a denial is
answered in request order.

Requests: a line ending in ``\\n`` (memcached drops a ``\\r`` before it), words split on spaces,
then a data block of ``<bytes>`` + ``\\r\\n`` for the storage commands and ``ms``. The parser is
stricter than memcached wherever memcached would reject a line without reading its data block:
then memcached would run the data as commands nobody checked, so such lines (bad numbers, keys
over 250 bytes, ``ms`` with more than 16 flags, control characters) are ProtocolErrors here.

Names: a classic command is named by itself; ``mg`` is ``get`` (``gets`` with the c flag,
``gat``/``gats`` with T, and also ``add`` with N, which creates the item), ``ms`` by its mode
(``set``, ``add``, ``append``, ``prepend``, ``replace``; ``cas`` with C in set or replace mode),
``md`` is ``delete``, ``ma`` ``incr`` or ``decr``, ``me`` (metadata of one key) ``get`` and
``mn`` ``noop``. Base64 keys (the b flag) are decoded before policy sees them.

Replies: a request with ``noreply`` (and ``quit``) is never answered; a meta request with the q
flag is answered only on some outcomes (a hit for ``mg``, a failure for the others), so which
reply belongs to which request can be ambiguous until the server answers an ``mn``. A denial
that must wait behind such a request is preceded by an ``mn`` the parser sends itself (its ``MN``
is not passed on), so the denial goes out exactly when every earlier reply has.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .base import DEFAULT_MAX_BUFFER, Check, FramedConnection, Output, ProtocolError, Record, ReplyQueue
from .memcache_framing import MAX_KEY, MAX_LINE, Answer, Buffer, decided, key_text

__all__ = [
    "BARRIER", "DENIED", "MemcacheTextConnection", "Reply", "ReplyPart", "ReplyReader", "RequestReader",
    "TextRequest",
]

DENIED = b"CLIENT_ERROR access denied\r\n"
BARRIER = b"mn\r\n"  # sent to the server to learn that every earlier reply has come

_INT_MAX = 2**31 - 1
_MAX_META_WORDS = 19  # memcached 1.6 rejects a longer meta line without reading an ms data block
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# At most 32 digits: enough for any 64-bit value with leading zeros, and int() never sees a
# number long enough to make it raise.
_DIGITS = re.compile(rb"[0-9]{1,32}")
_SIGNED = re.compile(rb"-?[0-9]{1,32}")


class Reply(enum.Enum):
    """The kind of reply a request gets (which replies fit it)."""

    RETRIEVAL = "retrieval"  # VALUE ... END
    STATS = "stats"  # STAT ... END, or one line
    STORE = "store"
    DELETE = "delete"
    ARITH = "arith"
    TOUCH = "touch"
    OK = "ok"
    VERSION = "version"
    LINE = "line"  # any one line (slabs, lru, cache_memlimit)
    MG = "mg"
    MS = "ms"
    MD = "md"
    MA = "ma"
    ME = "me"
    MN = "mn"


@dataclass(frozen=True, slots=True)
class TextRequest:
    """One request as read: its bytes (command line and data block) and what policy needs."""

    frame: bytes
    verb: str
    commands: tuple[str, ...]
    keys: tuple[str, ...]
    reply: Reply
    answer: Answer


@dataclass(frozen=True, slots=True)
class _Command:
    """A parsed command line; ``data`` is the length of the data block that follows it."""

    commands: tuple[str, ...]
    keys: tuple[str, ...]
    reply: Reply
    answer: Answer = Answer.ALWAYS
    data: int | None = None


def _bad(message: str) -> ProtocolError:
    return ProtocolError("client", message)


def _show(word: bytes) -> str:
    return repr(word[:40])


def _key(word: bytes) -> bytes:
    if len(word) > MAX_KEY:
        raise _bad(f"a key longer than {MAX_KEY} bytes")
    return word


def _number(word: bytes, what: str, low: int, high: int, pattern: re.Pattern[bytes] = _DIGITS) -> int:
    # Only values memcached accepts too: a number it rejects would make it skip reading the data block.
    if pattern.fullmatch(word) is None or not low <= int(word) <= high:
        raise _bad(f"bad {what} {_show(word)}")
    return int(word)


def _exptime(word: bytes) -> None:
    _number(word, "exptime", -(2**31), _INT_MAX, _SIGNED)


def _noreply(args: Sequence[bytes], fields: int, verb: str) -> Answer:
    """``args`` has ``fields`` words, maybe followed by ``noreply``."""
    if len(args) == fields:
        return Answer.ALWAYS
    if len(args) == fields + 1 and args[-1] == b"noreply":
        return Answer.NEVER
    raise _bad(f"{verb} takes {fields} arguments and an optional noreply, not {len(args)}")


def _storage(verb: str, args: Sequence[bytes]) -> _Command:
    """``set|add|replace|append|prepend <key> <flags> <exptime> <bytes> [noreply]``, ``cas`` with
    ``<cas unique>`` before noreply."""
    answer = _noreply(args, 5 if verb == "cas" else 4, verb)
    key = _key(args[0])
    _number(args[1], "flags", 0, 2**32 - 1)
    _exptime(args[2])
    size = _number(args[3], "data length", 0, _INT_MAX - 2)
    if verb == "cas":
        _number(args[4], "cas unique", 0, 2**64 - 1)
    return _Command((verb,), (key_text(key),), Reply.STORE, answer, size)


def _retrieval(verb: str, args: Sequence[bytes]) -> _Command:
    """``get|gets <key>+``, ``gat|gats <exptime> <key>+``."""
    keys = args
    if verb in ("gat", "gats"):
        if not args:
            raise _bad(f"{verb} needs an exptime")
        _exptime(args[0])
        keys = args[1:]
    if not keys:
        raise _bad(f"{verb} needs a key")
    return _Command((verb,), tuple(key_text(_key(k)) for k in keys), Reply.RETRIEVAL)


def _delete(verb: str, args: Sequence[bytes]) -> _Command:
    """``delete <key> [0] [noreply]`` (the 0 is an old hold time memcached still accepts)."""
    if not args:
        raise _bad("delete needs a key")
    rest = list(args[1:])
    answer = Answer.ALWAYS
    if rest and rest[-1] == b"noreply":
        answer = Answer.NEVER
        rest.pop()
    if rest not in ([], [b"0"]):
        raise _bad("delete takes a key, an optional 0 and an optional noreply")
    return _Command((verb,), (key_text(_key(args[0])),), Reply.DELETE, answer)


def _arith(verb: str, args: Sequence[bytes]) -> _Command:
    """``incr|decr <key> <delta> [noreply]``."""
    answer = _noreply(args, 2, verb)
    _number(args[1], "delta", 0, 2**64 - 1)
    return _Command((verb,), (key_text(_key(args[0])),), Reply.ARITH, answer)


def _touch(verb: str, args: Sequence[bytes]) -> _Command:
    """``touch <key> <exptime> [noreply]``."""
    answer = _noreply(args, 2, verb)
    _exptime(args[1])
    return _Command((verb,), (key_text(_key(args[0])),), Reply.TOUCH, answer)


def _stats(verb: str, args: Sequence[bytes]) -> _Command:
    """``stats [group [args]]``: a list ending in END, or one line."""
    return _Command((verb,), (), Reply.STATS)


def _bare(reply: Reply, answer: Answer = Answer.ALWAYS) -> Callable[[str, Sequence[bytes]], _Command]:
    """A command without arguments (``version``, ``quit``)."""

    def parse(verb: str, args: Sequence[bytes]) -> _Command:
        if args:
            raise _bad(f"{verb} takes no arguments")
        return _Command((verb,), (), reply, answer)

    return parse


def _verbosity(verb: str, args: Sequence[bytes]) -> _Command:
    """``verbosity <level> [noreply]``."""
    answer = _noreply(args, 1, verb)
    _number(args[0], "verbosity level", 0, 2**32 - 1)
    return _Command((verb,), (), Reply.OK, answer)


def _flush_all(verb: str, args: Sequence[bytes]) -> _Command:
    """``flush_all [delay] [noreply]``."""
    rest = list(args)
    answer = Answer.ALWAYS
    if rest and rest[-1] == b"noreply":
        answer = Answer.NEVER
        rest.pop()
    if len(rest) > 1:
        raise _bad("flush_all takes an optional delay and an optional noreply")
    if rest:
        _exptime(rest[0])
    return _Command((verb,), (), Reply.OK, answer)


def _admin(verb: str, args: Sequence[bytes]) -> _Command:
    """``slabs ...``, ``lru ...``: one line back. A noreply here is refused rather than guessed."""
    if not args or b"noreply" in args:
        raise _bad(f"{verb} needs a subcommand and takes no noreply")
    return _Command((verb,), (), Reply.LINE)


def _cache_memlimit(verb: str, args: Sequence[bytes]) -> _Command:
    """``cache_memlimit <megabytes> [noreply]``."""
    answer = _noreply(args, 1, verb)
    _number(args[0], "memory limit", 0, 2**64 - 1)
    return _Command((verb,), (), Reply.LINE, answer)


def _meta_flags(words: Sequence[bytes], verb: str) -> dict[int, bytes]:
    """Meta flags by their first character (memcached looks only at that one); a repeated flag is
    an error, so the meaning of a line is never a guess about which copy counts."""
    flags: dict[int, bytes] = {}
    for word in words:
        if not 0x21 <= word[0] <= 0x7E or word[0] in flags:
            raise _bad(f"{verb}: bad or repeated flag {_show(word)}")
        flags[word[0]] = word[1:]
    return flags


def _meta_key(word: bytes, flags: dict[int, bytes]) -> str:
    """The key policy checks: base64-decoded with the b flag (memcached limits the encoded form)."""
    _key(word)
    if ord("b") not in flags:
        return key_text(word)
    try:
        raw = base64.b64decode(word, validate=True)
    except binascii.Error:
        raise _bad(f"bad base64 key {_show(word)}") from None
    # Only canonical base64: one spelling per key, whatever memcached's decoder tolerates.
    if not raw or base64.b64encode(raw) != word:
        raise _bad(f"bad base64 key {_show(word)}")
    return key_text(raw)


def _meta_answer(flags: dict[int, bytes]) -> Answer:
    return Answer.MAYBE if ord("q") in flags else Answer.ALWAYS


def _mode(flags: dict[int, bytes], modes: dict[bytes, str], default: str, verb: str) -> str:
    if ord("M") not in flags:
        return default
    mode = modes.get(flags[ord("M")])
    if mode is None:
        raise _bad(f"{verb}: bad mode M{flags[ord('M')]!r}")
    return mode


def _meta_args(verb: str, args: Sequence[bytes], fixed: int) -> tuple[bytes, dict[int, bytes]]:
    """The key and flags of ``<verb> <key> [<fixed words>] <flag>*``."""
    if len(args) < 1 + fixed:
        raise _bad(f"{verb} needs a key")
    if len(args) + 1 > _MAX_META_WORDS:
        raise _bad(f"{verb}: more than {_MAX_META_WORDS - 2 - fixed} flags")
    return args[0], _meta_flags(args[1 + fixed:], verb)


def _mg(verb: str, args: Sequence[bytes]) -> _Command:
    """``mg <key> <flag>*``: T touches (a gat), c returns the CAS (a gets), N creates a missing item."""
    word, flags = _meta_args(verb, args, 0)
    command = ("gat" if ord("T") in flags else "get") + ("s" if ord("c") in flags else "")
    commands = (command, "add") if ord("N") in flags else (command,)
    return _Command(commands, (_meta_key(word, flags),), Reply.MG, _meta_answer(flags))


_MS_MODES = {b"E": "add", b"A": "append", b"P": "prepend", b"R": "replace", b"S": "set"}
_MS_MODES |= {mode.lower(): name for mode, name in _MS_MODES.items()}
_MA_MODES = {b"I": "incr", b"i": "incr", b"+": "incr", b"D": "decr", b"d": "decr", b"-": "decr"}


def _ms(verb: str, args: Sequence[bytes]) -> _Command:
    """``ms <key> <datalen> <flag>*`` and a data block; memcached turns set and replace with a
    C (compare CAS) flag into cas."""
    word, flags = _meta_args(verb, args, 1)
    size = _number(args[1], "data length", 0, _INT_MAX - 2)
    command = _mode(flags, _MS_MODES, "set", verb)
    if ord("C") in flags and command in ("set", "replace"):
        command = "cas"
    return _Command((command,), (_meta_key(word, flags),), Reply.MS, _meta_answer(flags), size)


def _md(verb: str, args: Sequence[bytes]) -> _Command:
    word, flags = _meta_args(verb, args, 0)
    return _Command(("delete",), (_meta_key(word, flags),), Reply.MD, _meta_answer(flags))


def _ma(verb: str, args: Sequence[bytes]) -> _Command:
    word, flags = _meta_args(verb, args, 0)
    command = _mode(flags, _MA_MODES, "incr", verb)
    return _Command((command,), (_meta_key(word, flags),), Reply.MA, _meta_answer(flags))


def _me(verb: str, args: Sequence[bytes]) -> _Command:
    """``me <key> [b]``: an item's metadata, which a get of it would show too."""
    if len(args) not in (1, 2) or args[1:] not in ([], [b"b"]):
        raise _bad("me takes a key and an optional b")
    flags = {ord("b"): b""} if len(args) == 2 else {}
    return _Command(("get",), (_meta_key(args[0], flags),), Reply.ME)


def _mn(verb: str, args: Sequence[bytes]) -> _Command:
    """``mn``: the meta no-op, answered MN after every earlier reply."""
    if args:
        raise _bad("mn takes no arguments")
    return _Command(("noop",), (), Reply.MN)


_COMMANDS: dict[bytes, Callable[[str, Sequence[bytes]], _Command]] = {
    **{verb: _storage for verb in (b"set", b"add", b"replace", b"append", b"prepend", b"cas")},
    **{verb: _retrieval for verb in (b"get", b"gets", b"gat", b"gats")},
    b"delete": _delete,
    b"incr": _arith,
    b"decr": _arith,
    b"touch": _touch,
    b"stats": _stats,
    b"version": _bare(Reply.VERSION),
    b"quit": _bare(Reply.LINE, Answer.NEVER),
    b"verbosity": _verbosity,
    b"flush_all": _flush_all,
    b"slabs": _admin,
    b"lru": _admin,
    b"cache_memlimit": _cache_memlimit,
    b"mg": _mg,
    b"ms": _ms,
    b"md": _md,
    b"ma": _ma,
    b"me": _me,
    b"mn": _mn,
}


def _parse(line: bytes) -> tuple[str, _Command]:
    content = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    if _CONTROL.search(content):
        raise _bad("a control character in a command line")
    words = content.split()
    if not words:
        raise _bad("an empty command line")
    parse = _COMMANDS.get(words[0])
    if parse is None:
        raise _bad(f"unknown command {_show(words[0])}")
    verb = words[0].decode("ascii")
    return verb, parse(verb, words[1:])


class RequestReader:
    """Frames a client's text stream into requests: ``feed`` bytes, then ``next()`` until None."""

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER, max_line: int = MAX_LINE) -> None:
        self._buffer = Buffer("client", max_buffer, max_line)
        self._line: tuple[bytes, str, _Command, int] | None = None  # a line waiting for its data block

    def feed(self, data: bytes) -> None:
        self._buffer.feed(data)

    def check_limit(self) -> None:
        self._buffer.check_limit()

    def next(self) -> TextRequest | None:
        if self._line is None:
            line = self._buffer.line()
            if line is None:
                return None
            verb, command = _parse(line)
            if command.data is None:
                return TextRequest(line, verb, command.commands, command.keys, command.reply, command.answer)
            if len(line) + command.data + 2 > self._buffer.max_buffer:
                raise _bad(f"a data block of {command.data} bytes, over the buffer limit")
            self._line = (line, verb, command, command.data + 2)
        line, verb, command, size = self._line
        block = self._buffer.take(size)
        if block is None:
            return None
        self._line = None
        if not block.endswith(b"\r\n"):
            raise _bad("a data block not ended by \\r\\n")
        return TextRequest(line + block, verb, command.commands, command.keys, command.reply, command.answer)


class _In(enum.Enum):
    """Where the server's reply stream is."""

    IDLE = "between replies"
    VALUES = "in VALUE ... END"
    LIST = "in STAT ... END"


class _Word(enum.Enum):
    """A reply line by its first word."""

    VALUE = "VALUE"
    LISTED = "STAT/ITEM/PREFIX"
    END = "END"
    VA = "VA"
    ERROR = "an error"
    OTHER = "a one-line reply"


class _Unit(enum.Enum):
    """A whole reply."""

    VALUES = b"VALUE"
    LIST = b"STAT"
    EMPTY = b"END"
    VA = b"VA"
    LINE = b""  # tagged by its own word


# (where, line) -> (where next, the reply the line completes). A missing pair is a ProtocolError.
_TRANSITIONS: dict[tuple[_In, _Word], tuple[_In, _Unit | None]] = {
    (_In.IDLE, _Word.VALUE): (_In.VALUES, None),
    (_In.IDLE, _Word.LISTED): (_In.LIST, None),
    (_In.IDLE, _Word.END): (_In.IDLE, _Unit.EMPTY),
    (_In.IDLE, _Word.VA): (_In.IDLE, _Unit.VA),
    (_In.IDLE, _Word.ERROR): (_In.IDLE, _Unit.LINE),
    (_In.IDLE, _Word.OTHER): (_In.IDLE, _Unit.LINE),
    (_In.VALUES, _Word.VALUE): (_In.VALUES, None),
    (_In.VALUES, _Word.END): (_In.IDLE, _Unit.VALUES),
    (_In.VALUES, _Word.ERROR): (_In.IDLE, _Unit.VALUES),  # a retrieval that failed part way
    (_In.LIST, _Word.LISTED): (_In.LIST, None),
    (_In.LIST, _Word.END): (_In.IDLE, _Unit.LIST),
}

_ERRORS = frozenset({b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR"})
_NUMBER = b"<number>"  # the tag of an incr/decr result
_LINE_WORDS = frozenset({
    b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND", b"DELETED", b"TOUCHED", b"OK", b"VERSION", b"RESET",
    b"HD", b"EN", b"NF", b"NS", b"EX", b"MN", b"ME",
    # slabs reassign, cache_memlimit
    b"BUSY", b"BADCLASS", b"NOSPARE", b"NOTFULL", b"UNSAFE", b"SAME", b"MEMLIMIT_TOO_SMALL",
})
_WORDS = {b"VALUE": _Word.VALUE, b"STAT": _Word.LISTED, b"ITEM": _Word.LISTED, b"PREFIX": _Word.LISTED,
          b"END": _Word.END, b"VA": _Word.VA, **{w: _Word.ERROR for w in _ERRORS},
          **{w: _Word.OTHER for w in _LINE_WORDS}}


@dataclass(frozen=True, slots=True)
class ReplyPart:
    """Reply bytes the client may have now: a whole reply (``tag`` says which: its first word,
    ``VALUE``/``STAT`` for a list, ``<number>``) or a VALUE/STAT line of one going on (no tag)."""

    data: bytes
    tag: bytes | None


class ReplyReader:
    """Frames the server's text stream into replies, as ``RequestReader`` does requests."""

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER, max_line: int = MAX_LINE) -> None:
        self._buffer = Buffer("server", max_buffer, max_line)
        self._in = _In.IDLE
        self._line: tuple[bytes, tuple[_In, _Unit | None], bytes, int] | None = None  # waiting for data

    def feed(self, data: bytes) -> None:
        self._buffer.feed(data)

    def check_limit(self) -> None:
        self._buffer.check_limit()

    def next(self) -> ReplyPart | None:
        if self._line is None:
            line = self._buffer.line()
            if line is None:
                return None
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                raise ProtocolError("server", "a reply line not ended by \\r\\n")
            words = line[:-2].split(b" ")
            first = words[0]
            if _DIGITS.fullmatch(first) and len(words) == 1:
                kind, tag = _Word.OTHER, _NUMBER
            elif first in _WORDS:
                kind, tag = _WORDS[first], first
            else:
                raise ProtocolError("server", f"unknown reply {_show(first)}")
            step = _TRANSITIONS.get((self._in, kind))
            if step is None:
                raise ProtocolError("server", f"{kind.value} {self._in.value}")
            size = _reply_data(kind, words)
            if size is None:
                return self._step(line, step, tag)
            if len(line) + size + 2 > self._buffer.max_buffer:
                raise ProtocolError("server", f"a value of {size} bytes, over the buffer limit")
            self._line = (line, step, tag, size + 2)
        line, step, tag, size = self._line
        block = self._buffer.take(size)
        if block is None:
            return None
        self._line = None
        if not block.endswith(b"\r\n"):
            raise ProtocolError("server", "a value not ended by \\r\\n")
        return self._step(line + block, step, tag)

    def _step(self, data: bytes, step: tuple[_In, _Unit | None], tag: bytes) -> ReplyPart:
        self._in, unit = step
        if unit is None:
            return ReplyPart(data, None)
        return ReplyPart(data, tag if unit is _Unit.LINE else unit.value)


def _reply_data(kind: _Word, words: Sequence[bytes]) -> int | None:
    """The length of the data block after ``VALUE <key> <flags> <bytes> [<cas>]`` or ``VA <bytes> ...``."""
    if kind is _Word.VALUE:
        if len(words) not in (4, 5) or not _DIGITS.fullmatch(words[3]):
            raise ProtocolError("server", "a bad VALUE line")
        return int(words[3])
    if kind is _Word.VA:
        if len(words) < 2 or not _DIGITS.fullmatch(words[1]):
            raise ProtocolError("server", "a bad VA line")
        return int(words[1])
    return None


def _accepting(*tags: bytes) -> frozenset[bytes]:
    return frozenset(tags) | _ERRORS


# (reply kind, quiet) -> the replies that can answer it. Quiet meta commands answer only some outcomes.
_ACCEPTS: dict[tuple[Reply, bool], frozenset[bytes]] = {
    (Reply.RETRIEVAL, False): _accepting(b"VALUE", b"END"),
    (Reply.STATS, False): _accepting(b"STAT", b"END", *_LINE_WORDS),
    (Reply.STORE, False): _accepting(b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND"),
    (Reply.DELETE, False): _accepting(b"DELETED", b"NOT_FOUND"),
    (Reply.ARITH, False): _accepting(_NUMBER, b"NOT_FOUND"),
    (Reply.TOUCH, False): _accepting(b"TOUCHED", b"NOT_FOUND"),
    (Reply.OK, False): _accepting(b"OK"),
    (Reply.VERSION, False): _accepting(b"VERSION"),
    (Reply.LINE, False): _accepting(_NUMBER, *_LINE_WORDS),
    (Reply.MG, False): _accepting(b"VA", b"HD", b"EN"),
    (Reply.MG, True): _accepting(b"VA", b"HD"),
    (Reply.MS, False): _accepting(b"HD", b"NS", b"EX", b"NF"),
    (Reply.MS, True): _accepting(b"NS", b"EX", b"NF"),
    (Reply.MD, False): _accepting(b"HD", b"NF", b"EX"),
    (Reply.MD, True): _accepting(b"NF", b"EX"),
    (Reply.MA, False): _accepting(b"VA", b"HD", b"NF", b"NS", b"EX"),
    (Reply.MA, True): _accepting(b"NF", b"NS", b"EX"),
    (Reply.ME, False): _accepting(b"ME", b"EN"),
    (Reply.MN, False): frozenset({b"MN"}),
}


@dataclass(frozen=True, slots=True)
class _Awaited:
    """A forwarded request whose reply has not come yet."""

    accepts: frozenset[bytes]
    quiet: bool  # it may get no reply at all
    mn: bool  # only an MN answers it
    own: bool = False  # the parser's barrier: its MN is not passed on


_BARRIER = _Awaited(_ACCEPTS[(Reply.MN, False)], False, True, own=True)


class MemcacheTextConnection(FramedConnection):
    """The text protocol both ways: requests checked and forwarded or denied, replies passed on
    unchanged with each denial put in its place."""

    protocol = "memcache"

    def __init__(self, check: Check, max_buffer: int = DEFAULT_MAX_BUFFER, *, max_line: int = MAX_LINE) -> None:
        super().__init__(check, max_buffer)
        self._requests = RequestReader(max_buffer, max_line)
        self._replies = ReplyReader(max_buffer, max_line)
        self._awaited: deque[_Awaited] = deque()
        self._quiet = 0  # how many awaited requests may get no reply
        self._drift = False  # a reply may have been credited to the wrong quiet request (until an MN)
        self._queue = ReplyQueue()

    def _from_client(self, data: bytes) -> Output:
        self._requests.feed(data)
        to_server: list[bytes] = []
        to_client: list[bytes] = []
        records: list[Record] = []
        while (request := self._requests.next()) is not None:
            record = decided(self.check, request.commands, request.keys)
            records.append(record)
            if record.decision.allowed:
                to_server.append(request.frame)
                self._await(request)
            elif request.answer is not Answer.NEVER:
                to_server.append(self._barrier())
                to_client.append(self._queue.denied(DENIED))
        self._requests.check_limit()
        return Output(b"".join(to_server), b"".join(to_client), tuple(records))

    def _await(self, request: TextRequest) -> None:
        if request.answer is Answer.NEVER:
            return
        quiet = request.answer is Answer.MAYBE
        self._awaited.append(_Awaited(_ACCEPTS[(request.reply, quiet)], quiet, request.reply is Reply.MN))
        if quiet:
            self._quiet += 1
        else:
            self._queue.forwarded()

    def _barrier(self) -> bytes:
        """An mn of our own ahead of a denial, when replies before it cannot be told apart (an mn
        already last will do)."""
        if not (self._quiet or self._drift) or (self._awaited and self._awaited[-1].mn):
            return b""
        self._awaited.append(_BARRIER)
        self._queue.forwarded()
        return BARRIER

    def _from_server(self, data: bytes) -> Output:
        self._replies.feed(data)
        out: list[bytes] = []
        while (part := self._replies.next()) is not None:
            if not self._awaited:
                raise ProtocolError("server", "a reply to no outstanding request")
            out.append(part.data if part.tag is None else self._settle(part.data, part.tag))
        self._replies.check_limit()
        return Output(to_client=b"".join(out))

    def _settle(self, data: bytes, tag: bytes) -> bytes:
        """A whole reply came: credit it to its request; returns what the client gets now."""
        awaited = self._awaited
        if tag == b"MN":
            # Only an mn gets MN, and replies come in order: everything before the first mn is done.
            at = next((i for i, a in enumerate(awaited) if a.mn), None)
            if at is None:
                raise ProtocolError("server", "MN with no mn outstanding")
            before = self._skip(at)
            own = awaited[0].own
            after = self._done()
            self._drift = False
            return before + (b"" if own else data) + after
        # The reply is the first awaited request's, or a later one's if every request before that
        # is quiet (and got none). Several candidates fitting is the ambiguity an mn resolves.
        fits: list[int] = []
        for i, a in enumerate(awaited):
            if a.mn:
                break
            if tag in a.accepts:
                fits.append(i)
            if not (a.quiet or self._drift):
                break
        if not fits:
            raise ProtocolError("server", f"reply {_show(tag)} fits no outstanding request")
        self._drift = self._drift or len(fits) > 1
        before = self._skip(fits[0])
        after = self._done()
        if not awaited:
            self._drift = False
        return before + data + after

    def _done(self) -> bytes:
        """The oldest awaited request is answered (or known to get nothing): the denials now due."""
        awaited = self._awaited.popleft()
        if awaited.quiet:
            self._quiet -= 1
            return b""
        return self._queue.replied()

    def _skip(self, n: int) -> bytes:
        return b"".join(self._done() for _ in range(n))
