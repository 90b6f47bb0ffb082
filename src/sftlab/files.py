"""Atomic file writes (a reader never sees a half-written report, config or run.json), and
file names given by a user that must stay inside their folder."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from sftlab.errors import SftlabError


def inside(folder: str | Path, name: str, what: str = "name") -> Path:
    """`folder / name` for a user-given `name` that must name a file directly inside `folder`."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
        raise SftlabError(f"{what} '{name}' must be a plain file name (no '/', '\\' or '..'): it names a file "
                          f"inside {folder}")
    return Path(folder) / name


def atomic_write(path: str | Path, content: str | bytes) -> None:
    """Write `content` (text as UTF-8) to a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain open (not mkstemp) so the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def staging_name(name: str) -> str:
    """The temporary name beside a folder `name` while it is being written."""
    return f".{name}.saving"


def replace_folder(new: Path, final: Path) -> None:
    """Put the folder `new` in place of `final` (which may exist) with renames only, so `final`
    is at every moment either the old folder or the new one."""
    if final.exists():
        old = new.with_name(new.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=True, default=str) + "\n")
