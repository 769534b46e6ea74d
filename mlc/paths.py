"""Locations: the task data folder (MLC_DATA), `${VAR}` expansion, and atomic writes that never replace a
folder mlc did not write (unless told to)."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from mlc.errors import DataError, MlcError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_UMASK = os.umask(0o022)  # read once, at import (setting it is the only way to read it), and put back
os.umask(_UMASK)


def file_mode() -> int:
    """The mode a plain ``open`` gives a new file under the process's umask (0644 under the usual 022)."""
    return 0o666 & ~_UMASK


def make_readable(path: Path | str) -> None:
    """Give a file the mode of :func:`file_mode`: safetensors (and ``mkstemp``) create files 0600, which
    other users of a shared model folder or teacher cache could not read."""
    os.chmod(path, file_mode())


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


OUTPUT_MARKER = ".mlc-output"
# what folders written by mlc before the marker existed hold: a pipeline stage's marker, a model folder's
# mlc summary (mlc_vocab.json, mlc_student.json, mlc_prune.json, mlc_source.json, mlc_distill.json), a
# shard folder's manifest or a report's results
_LEGACY_STAGE_MARKER = ".mlc-stage.json"


def _written_by_mlc(folder: Path) -> bool:
    """Whether ``folder`` is one mlc wrote: it has mlc's marker, or (written before the marker existed)
    the summary file mlc leaves in that kind of folder."""
    if (folder / OUTPUT_MARKER).is_file() or (folder / _LEGACY_STAGE_MARKER).is_file():
        return True
    if any(folder.glob("mlc_*.json")):
        return True
    manifest = folder / "manifest.json"
    if manifest.is_file():
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "shards" in data and "tokenizer" in data:
                return True
    return (folder / "results.json").is_file() and (folder / "report.md").is_file()


def add_overwrite_flag(parser) -> None:
    """The ``--overwrite`` flag of every command that writes a folder (what :func:`check_replaceable` allows)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output folder even if mlc did not write it (its contents are deleted)")


def check_replaceable(final: Path | str, overwrite: bool = False) -> Path:
    """Refuse an output folder whose replacement would delete what mlc did not write.

    The current folder or one above it is never replaced (its removal would pull the ground from under
    the process). An existing non-empty folder is replaced only when mlc wrote it (see
    :func:`_written_by_mlc`) or ``overwrite`` (``--overwrite``) says its contents may go."""
    final = Path(final)
    resolved = final.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise MlcError("is the current folder or contains it, and an output folder is replaced as a whole; "
                       "give a new folder (e.g. a subfolder)", str(final))
    if final.exists() or final.is_symlink():
        if not final.is_dir() or final.is_symlink():
            raise MlcError("exists and is not a folder; give a folder to write", str(final))
        if not overwrite and any(final.iterdir()) and not _written_by_mlc(final):
            raise MlcError(f"exists, is not empty and was not written by mlc (no {OUTPUT_MARKER} in it); "
                           "mlc replaces the whole folder, so pass --overwrite to delete what is there, "
                           "or give a new folder", str(final))
    return final


@contextlib.contextmanager
def atomic_dir(final: Path | str, *, overwrite: bool = False, what: str = "mlc"):
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    ``final`` must pass :func:`check_replaceable` (checked before anything is made); the new folder gets
    the marker :data:`OUTPUT_MARKER` naming ``what`` wrote it, so a later run may replace it again.
    On an exception the temporary folder is removed and ``final`` is left as it was.
    """
    final = check_replaceable(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"written_by": what}) + "\n", encoding="utf-8")
        for f in tmp.rglob("*"):  # what safetensors wrote 0600, readable as any file this process writes
            if f.is_file() and not f.is_symlink() and f.stat().st_mode & 0o777 == 0o600:
                make_readable(f)
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


def remove_stale_temporaries(final: Path | str) -> list[Path]:
    """Remove the ``.<name>.tmp-*`` folders :func:`atomic_dir` left beside ``final`` when it was killed
    (nothing else removes them); returns what was removed. Call it only where no other process is writing
    ``final`` now."""
    final = Path(final)
    gone = []
    if final.parent.is_dir():
        for p in sorted(final.parent.glob(f".{glob.escape(final.name)}.tmp-*")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write a text file through a temporary name and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path | str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path | str):
    """A JSON file's value, or an :class:`MlcError` naming the file and the line that does not parse."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MlcError(f"invalid JSON at line {e.lineno}: {e.msg}", str(path)) from None
    except UnicodeDecodeError as e:
        raise MlcError(f"not UTF-8 text: byte offset {e.start} cannot be decoded", str(path)) from None


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (shards, checkpoint manifests)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_GLOB = re.compile(r"[*?\[]")


def source_files(pattern: Path | str) -> list[Path]:
    """The files one source reads, in a fixed (sorted) order: a file; every file under a folder (recursively,
    hidden ones skipped); or every file a glob pattern (``*``, ``?``, ``[...]``, ``**``) matches."""
    import glob

    text = str(pattern)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError("the folder has no file", text)
        return files
    if _GLOB.search(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError("no file matches this pattern", text)
        return files
    if not path.is_file():
        raise DataError("file not found", text)
    return [path]
