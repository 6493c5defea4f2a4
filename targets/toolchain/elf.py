"""64-bit little-endian ELF objects, read as far as the tools need: the machine, the defined data symbols."""

from __future__ import annotations

import platform
import struct

ELF_MACHINES = {62: "x86-64", 183: "AArch64"}


def host_machine() -> str:
    """This machine's ELF machine name, as `elf_machine` spells it."""
    arch = platform.machine()
    return {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "AArch64", "arm64": "AArch64"}.get(arch.lower(), arch)


def elf_machine(data: bytes) -> str:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF object")
    code = struct.unpack_from("<H", data, 18)[0]
    return ELF_MACHINES.get(code, f"machine {code}")


def elf_symbols(data: bytes) -> dict[str, bytes]:
    """Every defined data symbol of a 64-bit little-endian ELF file (shared object or relocatable),
    name -> its bytes in the file."""
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    is_relocatable = struct.unpack_from("<H", data, 16)[0] == 1
    symbols = {}
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type not in (2, 11) or entsize != 24:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab_offset = sections[link][4]
        for pos in range(offset, offset + size, 24):
            name_at, _, _, shndx, value, sym_size = struct.unpack_from("<IBBHQQ", data, pos)
            if shndx == 0 or shndx >= len(sections) or sym_size == 0 or sections[shndx][1] == 8:  # undefined / NOBITS
                continue
            end = data.index(b"\0", strtab_offset + name_at)
            name = data[strtab_offset + name_at : end].decode()
            section = sections[shndx]
            start = section[4] + (value if is_relocatable else value - section[3])
            symbols[name] = data[start : start + sym_size]
    return symbols
