"""The r2d2 line protocol as a cilia L7 parser plugin: the whole plugin API in one small file.

Policy half (``R2D2``): ``name``, ``request_fields``, ``validate_rule`` and ``matches`` (the one
matcher ``cilia policy trace`` and the data path share), and ``describe`` for traces. Data-path
half (``R2D2Connection``, set as ``R2D2.connection``): a sans-I/O ``L7Connection`` fed the bytes
each side sends.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cilia.l7parsers.base import (
    DEFAULT_MAX_BUFFER,
    Check,
    L7Connection,
    Output,
    ProtocolError,
    Record,
    ReplyQueue,
    decide,
)
from cilia.policy.flows import GenericL7Request
from cilia.policy.l7.base import FieldProblem

COMMANDS = ("READ", "WRITE", "HALT", "RESET")
_WITH_FILE = ("READ", "WRITE")
MAX_LINE = 1024
DENIED = b"ERROR access denied\r\n"


class R2D2Connection(L7Connection):
    """Requests are lines; so are replies, one per request, in order."""

    protocol = "r2d2"

    def __init__(self, check: Check, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        super().__init__(check, max_buffer)
        self._client = b""
        self._server = b""
        self._replies = ReplyQueue()

    def receive_client(self, data: bytes) -> Output:
        self._client += data
        out = Output()
        while b"\r\n" in self._client:
            line, self._client = self._client.split(b"\r\n", 1)
            words = line.decode("ascii", "replace").split(" ")
            if words[0] not in COMMANDS or len(words) != (2 if words[0] in _WITH_FILE else 1):
                raise ProtocolError("client", f"not an r2d2 command: {line[:40]!r}")
            fields = {"cmd": words[0], **({"file": words[1]} if len(words) == 2 else {})}
            decision = decide(self.check, [GenericL7Request.of("r2d2", fields)])
            record = (Record(fields, decision),)
            if decision.allowed:
                self._replies.forwarded()
                out = out + Output(to_server=line + b"\r\n", records=record)
            else:
                out = out + Output(to_client=self._replies.denied(DENIED), records=record)
        if len(self._client) > MAX_LINE:
            raise ProtocolError("client", "line too long")
        return out

    def receive_server(self, data: bytes) -> Output:
        self._server += data
        out = Output()
        while b"\r\n" in self._server:
            line, self._server = self._server.split(b"\r\n", 1)
            out = out + Output(to_client=line + b"\r\n" + self._replies.replied())
        if len(self._server) > MAX_LINE:
            raise ProtocolError("server", "line too long")
        return out


class R2D2:
    name = "r2d2"
    request_fields = ("cmd", "file")
    connection = R2D2Connection

    def validate_rule(self, rule: Mapping[str, str]) -> list[FieldProblem]:
        problems = [FieldProblem(k, f"unknown key {k!r} (r2d2 rules take cmd, file)")
                    for k in rule if k not in self.request_fields]
        cmd = rule.get("cmd", "")
        if cmd and cmd not in COMMANDS:
            problems.append(FieldProblem("cmd", f"unknown command {cmd!r} (one of {', '.join(COMMANDS)})"))
        if "file" in rule:
            try:
                re.compile(rule["file"])
            except re.error as e:
                problems.append(FieldProblem("file", f"bad regex: {e}"))
        return problems

    def matches(self, rule: Mapping[str, str], request: Mapping[str, str]) -> bool:
        if rule.get("cmd") and rule["cmd"] != request.get("cmd"):
            return False
        if "file" in rule:
            return "file" in request and re.fullmatch(rule["file"], request["file"]) is not None
        return True

    def describe(self, rule: Mapping[str, str]) -> str:
        return " ".join(f"{k}={rule[k]}" for k in self.request_fields if k in rule) or "any r2d2 command"
