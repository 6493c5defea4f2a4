"""CUDA fatbin containers: which SASS and PTX images one holds."""

from __future__ import annotations

import struct

FATBIN_MAGIC = 0xBA55ED50


def fatbin_entries(data: bytes) -> list[tuple[str, str]]:
    """(kind, arch) of each image in a CUDA fatbin, e.g. ("sass", "sm_80"), ("ptx", "compute_90")."""
    magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, 0)
    if magic != FATBIN_MAGIC:
        raise ValueError("not a CUDA fatbin")
    entries, pos, end = [], header_size, header_size + fat_size
    while pos < end:
        kind, _, entry_header, padded_size = struct.unpack_from("<HHII", data, pos)
        sm = struct.unpack_from("<I", data, pos + 28)[0]
        entries.append(("ptx", f"compute_{sm}") if kind == 1 else ("sass", f"sm_{sm}"))
        pos += entry_header + padded_size
    return entries
