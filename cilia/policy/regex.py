"""RE2 regexes, checked and matched the way Envoy does.

Envoy compiles policy regexes with RE2 and rejects programs larger than its
``re2.max_program_size.error_level`` (100 by default); a regex Python's ``re``
accepts (backreferences, lookaround) may still make Envoy NACK the config, so
policy regexes are validated here with RE2 itself.
"""

from __future__ import annotations

from functools import lru_cache

import re2

# Envoy's default re2.max_program_size.error_level.
ENVOY_MAX_PROGRAM_SIZE = 100


_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # errors are reported to the user, not RE2's stderr log


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re2._Regexp:
    return re2.compile(pattern, _OPTIONS)


def check_re2(pattern: str, max_program_size: int = ENVOY_MAX_PROGRAM_SIZE) -> str | None:
    """None if Envoy would accept ``pattern``, else a message saying why not."""
    try:
        compiled = _compile(pattern)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        return f"invalid RE2 regex {pattern!r}: {reason}"
    size = compiled.programsize
    if size > max_program_size:
        return f"regex {pattern!r} is too complex for Envoy (RE2 program size {size} > {max_program_size})"
    return None


def full_match(pattern: str, text: str) -> bool:
    """Envoy ``safe_regex`` semantics: the regex must match the whole text."""
    return _compile(pattern).fullmatch(text) is not None


def search(pattern: str, text: str) -> bool:
    """Go ``regexp.MatchString`` semantics (unanchored), as Cilium's proxylib parsers use."""
    return _compile(pattern).search(text) is not None
