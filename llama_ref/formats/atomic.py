"""The one way this project writes a file: all of it or none of it.

Each file is written to a temporary file in its target directory (same file system, so the rename is atomic),
flushed and fsynced, then renamed over the target with ``os.replace``; the directory is fsynced after the renames.
A failure at any point removes the temporary files and leaves the targets as they were.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Optional, Union

Writer = Callable[[BinaryIO], object]  # writes the file's content to the open binary file it is given
Content = Union[bytes, str, Writer]


def atomic_write(path: Union[str, os.PathLike], content: Content) -> Path:
    """Write ``content`` (bytes, text as UTF-8, or a function writing to a binary file) to ``path`` atomically."""
    path = Path(path)
    return atomic_write_files(path.parent, {path.name: content}) / path.name


def write_json(path: Union[str, os.PathLike], data: object) -> Path:
    """``data`` as JSON indented by 2, with a final newline, written to ``path`` atomically (a run's records)."""
    return atomic_write(path, json.dumps(data, indent=2) + "\n")


def atomic_write_files(directory: Union[str, os.PathLike], files: Mapping[str, Content]) -> Path:
    """Write several files of ``directory`` (created if missing): every temporary file first, then the renames in
    ``files``' order (so the file that marks a directory as complete, e.g. a config, goes last). Returns
    ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    temps: dict[str, Optional[Path]] = {}
    try:
        for name, content in files.items():
            temps[name] = _write_temp(directory, name, content)
        for name in files:
            os.replace(temps[name], directory / name)
            temps[name] = None
    finally:
        for tmp in temps.values():
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    _fsync_dir(directory)
    return directory


def _write_temp(directory: Path, final_name: str, content: Content) -> Path:
    """A new file ``.<final_name>.<random>.tmp`` in ``directory`` holding ``content``, fsynced. Created with mode
    0o666 so the umask applies as for any new file; removed again if writing fails."""
    path = directory / f".{final_name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode())
            elif isinstance(content, (bytes, bytearray, memoryview)):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the renames durable on POSIX; directories cannot be opened this way on Windows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
