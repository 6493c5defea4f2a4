"""What a CUDA library's device code holds, read from the bytes: the SASS and PTX images of a fatbin or a
cubin, the CUDA release each needs from the driver, and whether a given driver can load them.

A SASS image is a CUDA ELF (`e_machine` 190): its architecture is in `e_flags`. CUDA 13 toolkits write ELF
ABI version 8, which drivers before CUDA 13 cannot read, and name their release in a `.note.nv.tkinfo`
note; CUDA 12 compilers (NVRTC 12.2 checked) write ABI 7 and no note, so such a cubin does not say which
12.x built it (the library's build record does). A PTX image carries its PTX ISA version: a driver JITs
PTX up to the ISA version of its release. A fatbin (magic 0xBA55ED50) is a list of such images, each
behind a header.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

FATBIN_MAGIC = 0xBA55ED50
ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190

# PTX ISA version -> the CUDA release that introduced it (NVIDIA's PTX ISA release notes)
PTX_ISA_RELEASES = {
    (7, 0): "11.0", (7, 1): "11.1", (7, 2): "11.2", (7, 3): "11.3", (7, 4): "11.4", (7, 5): "11.5",
    (7, 6): "11.6", (7, 7): "11.7", (7, 8): "11.8", (8, 0): "12.0", (8, 1): "12.1", (8, 2): "12.2",
    (8, 3): "12.3", (8, 4): "12.4", (8, 5): "12.5", (8, 6): "12.7", (8, 7): "12.8", (8, 8): "12.9",
    (9, 0): "13.0",
}  # fmt: skip


# CUDA ELF ABI version -> the oldest CUDA release whose driver reads it (7: every driver this project targets)
ELF_ABI_RELEASES = {7: None, 8: "13.0"}


class CudaImageError(ValueError):
    """The bytes are not a fatbin or cubin this reader understands."""


@dataclass(frozen=True)
class CudaImage:
    kind: str  # "sass" or "ptx"
    arch: str  # "sm_87" (SASS) or "compute_90" (PTX)
    cuda: str | None  # the oldest CUDA release whose driver loads it, e.g. "12.2"; None: not in the image

    def __str__(self) -> str:
        return f"{self.kind} {self.arch} ({f'CUDA {self.cuda}' if self.cuda else 'CUDA release not recorded'})"


def release_key(release: str) -> tuple[int, ...]:
    return tuple(int(p) for p in release.split("."))


def release_of(version: str) -> str:
    """A toolkit version's CUDA release: "12.2.140" -> "12.2"."""
    return ".".join(version.split(".")[:2])


def ptx_release(major: int, minor: int) -> str:
    try:
        return PTX_ISA_RELEASES[(major, minor)]
    except KeyError:
        raise CudaImageError(f"PTX ISA {major}.{minor} is not in the table of CUDA releases") from None


def cubin_image(elf: bytes) -> CudaImage:
    """The SASS image of one CUDA ELF (cubin)."""
    if len(elf) < 64 or elf[:4] != ELF_MAGIC or elf[4] != 2:
        raise CudaImageError("not a 64-bit ELF cubin")
    machine, flags = struct.unpack_from("<H", elf, 18)[0], struct.unpack_from("<I", elf, 48)[0]
    if machine != EM_CUDA:
        raise CudaImageError(f"ELF machine {machine}, not CUDA ({EM_CUDA})")
    abi = elf[8]  # CUDA ELF ABI version: 8 moved the SM number from bits 0-7 of e_flags to bits 8-15
    if abi not in ELF_ABI_RELEASES:
        raise CudaImageError(f"CUDA ELF ABI version {abi}, expected one of {sorted(ELF_ABI_RELEASES)}")
    sm = (flags >> 8) & 0xFF if abi >= 8 else flags & 0xFF
    found = re.search(rb"Cuda compilation tools, release (\d+)\.(\d+)", elf)
    releases = [r for r in (ELF_ABI_RELEASES[abi], found and f"{int(found[1])}.{int(found[2])}") if r]
    return CudaImage("sass", f"sm_{sm}", max(releases, key=release_key, default=None))


def fatbin_images(data: bytes) -> list[CudaImage]:
    """Every image of a CUDA fatbin, in file order. A compressed SASS image is known by its entry header
    alone (architecture; the release then comes from the build record)."""
    if len(data) < 16:
        raise CudaImageError("not a CUDA fatbin (shorter than its header)")
    magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, 0)
    if magic != FATBIN_MAGIC:
        raise CudaImageError("not a CUDA fatbin")
    images, pos, end = [], header_size, header_size + fat_size
    if end > len(data):
        raise CudaImageError(f"fatbin of {fat_size} bytes in {len(data) - header_size}: truncated")
    while pos < end:
        if pos + 48 > end:
            raise CudaImageError(f"fatbin entry at {pos}: truncated header")
        kind, _, entry_header, padded_size = struct.unpack_from("<HHIQ", data, pos)
        if entry_header < 48 or pos + entry_header + padded_size > end:
            raise CudaImageError(f"fatbin entry at {pos}: header {entry_header} + {padded_size} bytes out of bounds")
        minor, major, sm = struct.unpack_from("<HHI", data, pos + 24)
        compressed = struct.unpack_from("<Q", data, pos + 40)[0] & 0x2000
        payload = data[pos + entry_header : pos + entry_header + padded_size]
        if kind == 1:  # PTX: the header holds its ISA version
            images.append(CudaImage("ptx", f"compute_{sm}", ptx_release(major, minor)))
        elif kind == 2 and compressed:
            images.append(CudaImage("sass", f"sm_{sm}", None))
        elif kind == 2:
            found = cubin_image(payload)
            if found.arch != f"sm_{sm}":
                raise CudaImageError(f"fatbin entry for sm_{sm} holds a {found.arch} cubin")
            images.append(found)
        else:
            raise CudaImageError(f"fatbin entry of kind {kind} for sm_{sm}")
        pos += entry_header + padded_size
    return images


def device_images(fmt: str, data: bytes) -> list[CudaImage]:
    """The images of a TVM CUDA module's data in format `fmt` ("fatbin", "cubin"); [] for source."""
    if fmt == "fatbin":
        return fatbin_images(data)
    if fmt == "cubin":
        return [cubin_image(data)]
    return []


def oldest_driver(images: list[CudaImage], toolkit: str | None = None) -> str | None:
    """The oldest CUDA release whose driver loads every image; `toolkit` (the build record's release)
    stands in for images that do not record theirs. None: no images."""
    releases = [i.cuda or toolkit for i in images]
    return max((r for r in releases if r), key=release_key, default=None)


def driver_problems(images: list[CudaImage], archs: tuple[str, ...], driver: str | None) -> list[str]:
    """Why the images are not what a device of `archs` with a CUDA `driver` loads ([]: they are): SASS
    for exactly `archs`, PTX (if any) only for the newest of them, none that needs a newer driver."""
    problems = []
    sass = sorted(i.arch for i in images if i.kind == "sass")
    if sass != sorted(archs):
        problems.append(f"SASS for {', '.join(sass) or 'no architecture'}, expected {', '.join(archs)}")
    for image in images:
        if image.kind == "ptx" and image.arch != f"compute_{archs[-1][3:]}":
            problems.append(f"PTX for {image.arch}, expected compute_{archs[-1][3:]} or none")
        if driver and image.cuda and release_key(image.cuda) > release_key(driver):
            problems.append(f"{image} needs a CUDA {image.cuda} driver; the target's is CUDA {driver}")
    return problems
