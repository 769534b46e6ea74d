"""Locations: the task data folder (MLC_DATA), `${VAR}` expansion, and atomic writes."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from mlc.errors import MlcError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def data_root() -> Path:
    """The task data folder: $MLC_DATA, else ../shared/data beside the project checkout."""
    env = os.environ.get("MLC_DATA")
    if env:
        return Path(env).expanduser()
    return (PROJECT_ROOT.parent / "shared" / "data").resolve()


def expand(value: str, where: str | None = None) -> str:
    """Expand ``${VAR}`` (MLC_DATA defaults to :func:`data_root`) and ``~``; an unset variable is an error."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name == "MLC_DATA":
            return str(data_root())
        if name not in os.environ:
            raise MlcError(f"environment variable ${{{name}}} is not set", where)
        return os.environ[name]

    return os.path.expanduser(_VAR.sub(sub, value))


@contextlib.contextmanager
def atomic_dir(final: Path | str):
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    On an exception the temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write a text file through a temporary name and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path | str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
