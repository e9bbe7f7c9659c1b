"""L7 requests as policy sees them: the fields rules match on.

The same types describe a request coming from a parser in the data path and one
given to ``cilia policy trace``, so the trace and enforcement share one matcher.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HTTPRequest:
    method: str
    path: str
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # (name, value); names compare case-insensitively

    protocol = "http"

    def header(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self.headers if k.lower() == low]


@dataclass(frozen=True, slots=True)
class KafkaRequest:
    api_key: int
    api_version: int
    client_id: str = ""
    topics: tuple[str, ...] = ()
    # Without topics: does it ask about every topic (Metadata v0's empty list, a null list) or
    # about none (Metadata v1+'s empty list, which clients send to learn the brokers)?
    all_topics: bool = True

    protocol = "kafka"


@dataclass(frozen=True, slots=True)
class DNSRequest:
    name: str  # the query name, with or without the trailing dot

    protocol = "dns"


@dataclass(frozen=True, slots=True)
class GenericL7Request:
    """A request of an ``l7proto`` parser: its name and the fields it extracted."""

    protocol: str
    fields: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, protocol: str, fields: Mapping[str, str]) -> GenericL7Request:
        return cls(protocol, tuple(sorted(fields.items())))

    def as_dict(self) -> dict[str, str]:
        return dict(self.fields)


L7Request = HTTPRequest | KafkaRequest | DNSRequest | GenericL7Request
