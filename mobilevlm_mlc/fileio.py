"""Reading this tool's JSON inputs, and outputs that never destroy what this tool did not write, and appear whole or not at all.

Every output goes through here: `check_output_dir` / `check_output_file` refuse, before any work, a
path that cannot be written (under a file, a directory where a file goes, a name too long, no write
permission), that overlaps an input, or that holds something this tool did not write. `atomic_dir` /
`atomic_file` then write under a short temporary name beside the target and swap it in at the end
(`renameat2(RENAME_EXCHANGE)` for folders: the old folder is replaced in one step, never missing).
Any OS failure becomes a one-line `MobileVLMError` naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import MobileVLMError, summarize

TEMP_PREFIX = ".mobilevlm-"  # every temporary this tool leaves beside an output starts so
# What an existing folder holds that this tool wrote (relative POSIX paths), or None when it is not ours.
OwnedFiles = Callable[[Path], "set[str] | None"]
# (offset, magic bytes) of the file kinds this tool writes: an existing output file is replaced only if it is one.
FILE_KINDS: dict[str, tuple[tuple[int, bytes], ...]] = {
    "library": ((0, b"\x7fELF"), (257, b"ustar")),  # a .so, or a system-lib .tar
    "json": ((0, b"{"), (0, b"[")),
    "png": ((0, b"\x89PNG\r\n\x1a\n"),),
}


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object file, or raise a MobileVLMError naming the file."""
    if not path.is_file():
        raise MobileVLMError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MobileVLMError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise MobileVLMError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _oserror(path: Path, err: OSError, doing: str) -> MobileVLMError:
    return MobileVLMError(f"{path}: cannot {doing} ({err.strerror or err})")


def _check_writable_location(path: Path) -> None:
    """The folder `path` goes in exists or can be made, is writable, and `path`'s name fits."""
    name_max = 255
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():
            raise MobileVLMError(f"{path}: {parent} is a dangling symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise MobileVLMError(f"{path}: {parent} is a file, not a folder")
    with contextlib.suppress(OSError):
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    for part in path.relative_to(parent).parts:
        if len(os.fsencode(part)) > name_max:
            raise MobileVLMError(
                f"{path}: the name '{part[:40]}…' is {len(os.fsencode(part))} bytes, longer than the {name_max} this file system allows"
            )
    try:  # asked of the file system itself: `os.access` says yes to root, even where it cannot write (/proc)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".probe", dir=parent)
    except OSError as err:
        raise MobileVLMError(f"{path}: {parent} is not writable ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def _overlaps(path: Path, inputs: Iterable[Path]) -> Path | None:
    """The first input that `path` is, lies inside, or contains (symbolic links resolved)."""
    out = path.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if out == source or out.is_relative_to(source) or source.is_relative_to(out):
            return Path(given)
    return None


def foreign_entries(folder: Path, owned: set[str]) -> list[str]:
    """Every file or folder under `folder` (relative paths) not in `owned`; a foreign folder is listed
    once, not file by file."""
    found = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in list(dirs):
            entry = (rel / name).as_posix()
            if not any(o.startswith(entry + "/") for o in owned):
                found.append(entry + "/")
                dirs.remove(name)
        found += [(rel / name).as_posix() for name in files if (rel / name).as_posix() not in owned]
    return sorted(found)


def check_output_dir(target: Path, owned: OwnedFiles, inputs: Iterable[Path] = ()) -> None:
    """Refuse `target` unless it is absent, empty, or holds only what this tool wrote there (`owned`)."""
    target = Path(target)
    _check_writable_location(target)
    clash = _overlaps(target, inputs)
    if clash is not None:
        raise MobileVLMError(f"{target}: the output folder overlaps the input {clash}; choose a folder outside it")
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise MobileVLMError(f"{target}: exists and is not a folder; refusing to replace it")
    if not any(target.iterdir()):
        return
    mine = owned(target)
    if mine is None:
        raise MobileVLMError(
            f"{target}: exists and was not written by mobilevlm-mlc; refusing to replace it "
            "(choose another output folder, or empty this one)"
        )
    foreign = foreign_entries(target, mine)
    if foreign:
        raise MobileVLMError(
            f"{target}: holds what mobilevlm-mlc did not write ({summarize(foreign, 'entry', 'entries')}); "
            "refusing to replace it (move them out, or choose another output folder)"
        )


def check_output_file(target: Path, kind: str, inputs: Iterable[Path] = ()) -> None:
    """Refuse `target` unless it is absent or an existing file of `kind` (see FILE_KINDS), and is none of
    the command's `inputs` (nor inside one)."""
    target = Path(target)
    _check_writable_location(target)
    clash = _overlaps(target, inputs)
    if clash is not None:
        raise MobileVLMError(f"{target}: the output would overwrite or lie inside the input {clash}")
    if not target.exists():
        if target.is_symlink():
            raise MobileVLMError(f"{target}: is a dangling symbolic link; refusing to write through it")
        return
    if target.is_dir():
        raise MobileVLMError(f"{target}: is a folder; expected a file path")
    if not target.is_file():
        raise MobileVLMError(f"{target}: exists and is not a regular file; refusing to replace it")
    with open(target, "rb") as f:
        head = f.read(264)
    if head and not any(head[offset : offset + len(magic)] == magic for offset, magic in FILE_KINDS[kind]):
        raise MobileVLMError(f"{target}: exists and is not a {kind} file; refusing to replace it")


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2`); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def atomic_dir(target: Path, owned: OwnedFiles, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield an empty temp folder next to `target`; on success it replaces `target` in one step.

    `target` is checked (`check_output_dir`) on entry and again just before the swap, so files put
    there while the work ran are never lost."""
    target, inputs = Path(target), list(inputs)
    check_output_dir(target, owned, inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=target.parent))
    except OSError as err:
        raise _oserror(target, err, "create the output folder") from None
    tmp.chmod(0o777 & ~_umask())
    try:
        try:
            yield tmp
        except OSError as err:
            raise _oserror(target, err, "write the output folder") from None
        check_output_dir(target, owned, inputs)
        try:
            if target.exists() and _exchange(tmp, target):
                pass  # tmp now holds the old folder, removed below
            elif target.exists():
                old = tmp.with_suffix(".old")
                os.replace(target, old)
                os.replace(tmp, target)
                tmp = old
            else:
                os.replace(tmp, target)
        except OSError as err:
            raise _oserror(target, err, "move the finished output into place") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path, kind: str, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temp path next to `target` (same suffix); on success it is renamed to `target`."""
    target = Path(target)
    check_output_file(target, kind, inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=target.suffix, dir=target.parent)
        os.close(fd)
    except OSError as err:
        raise _oserror(target, err, "create the output file") from None
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())
    try:
        try:
            yield tmp
        except OSError as err:
            raise _oserror(target, err, "write the output") from None
        check_output_file(target, kind)
        try:
            os.replace(tmp, target)
        except OSError as err:
            raise _oserror(target, err, "move the finished output into place") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(target: Path, text: str, inputs: Iterable[Path] = ()) -> None:
    with atomic_file(target, "json", inputs) as tmp:
        tmp.write_text(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
