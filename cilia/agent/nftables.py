"""nftables through libnftables' JSON API (the library the ``nft`` command is built on), by ctypes.

One call is one transaction: every command in the batch applies, or none does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from typing import Any

_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON: also makes the input be read as JSON


class NftError(OSError):
    """libnftables is missing or refused the batch; the message is its own words."""


_LOADED: list[ctypes.CDLL] = []  # loaded once: find_library runs ldconfig, milliseconds a call


def _library() -> ctypes.CDLL:
    if _LOADED:
        return _LOADED[0]
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise NftError(f"libnftables is not installed (Debian package nftables): {e}") from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    _LOADED.append(lib)
    return lib


def available() -> bool:
    """Whether libnftables can be loaded (without it, no table was ever made)."""
    try:
        _library()
    except NftError:
        return False
    return True


def run(commands: list[dict[str, Any]]) -> Any:
    """Apply ``commands`` (libnftables-json(5) objects: {"add": {...}}, {"delete": {...}}, ...) in
    one transaction, in the calling thread's network namespace; what nft printed, parsed."""
    lib = _library()
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise NftError("libnftables: cannot create a context")
    try:
        lib.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        if lib.nft_run_cmd_from_buffer(ctx, json.dumps({"nftables": commands}).encode()) != 0:
            error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode("utf-8", "replace").strip()
            raise NftError(f"nftables refused the rules: {error or 'no reason given'}")
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode("utf-8", "replace").strip()
        return json.loads(out) if out else None
    finally:
        lib.nft_ctx_free(ctx)
