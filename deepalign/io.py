"""Files that never lose a record: JSON-lines logs, readers with errors that name the place, atomic writes.

**Logs** (:class:`JsonlLog`) are append-only JSON lines, one record per finished item (an attack
target, a training step, a demo model). The rules:

* an append writes one whole line with one ``write`` under an exclusive file lock
  (``<log>.lock``, the ``filelock`` package) and ``fsync``\\ s it, so two processes appending to one
  log interleave whole lines only;
* a reader never rewrites the file. A last line without its newline (a writer killed mid-append, or
  one still writing) is skipped in memory with a :class:`TornTailWarning`; the next append, under the
  lock, first cuts that torn tail off, then writes. A bad line anywhere else is a
  :class:`~deepalign.errors.FileFormatError` naming ``file:line``;
* one key, one record: when a log has a ``key`` field, the first record under a key is *the* record.
  :meth:`JsonlLog.append` of a key that is already there (for instance written meanwhile by another
  process running the same job) writes nothing and returns ``False``; a file that holds a key twice
  (written by hand, or by an older deepalign) is read with the first record and the later ones
  counted in :attr:`JsonlLog.duplicates`.

**Readers** (:func:`read_text`, :func:`iter_jsonl`, :func:`read_json`, :func:`read_csv`) accept a
UTF-8 byte-order mark (what Excel writes), report an encoding error as ``file:line`` with the byte
offset, refuse JSON nested too deeply for Python and strings with lone surrogates, and lift the
``csv`` module's 128 KiB field limit.

**Atomic writes** (:func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_directory`)
write under a temporary name beside the target, ``fsync`` it, and rename it into place; on any error
the temporary file or folder is removed, so a crash leaves the old file or the new one, never half of
one and never a ``.tmp``.

This module imports nothing of deepalign but its errors, and any layer may use it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from filelock import FileLock, Timeout

from deepalign.errors import FileFormatError, InputError, SettingsMismatchError

NEWLINE = b"\n"
LOCK_TIMEOUT_S = 600.0  # an append holds the lock for milliseconds; ten minutes means a stuck process


class TornTailWarning(UserWarning):
    """A log's last line is incomplete (a writer was killed mid-append, or is still writing)."""


# ----- readers ------------------------------------------------------------------------------------

def read_text(path: str | Path, *, what: str = "file") -> str:
    """The whole file as text: UTF-8, with a leading byte-order mark dropped.
    Raises :class:`FileFormatError` (``file:line: … byte offset N``) when it is not UTF-8 and
    :class:`InputError` when it is missing or not a file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if not path.is_file():
        raise InputError(f"{path}: is a directory, not a {what}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise FileFormatError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at byte offset "
                              f"{error.start}); save the file as UTF-8") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise FileFormatError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise FileFormatError(f"{where}: JSON nested too deeply to read") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise FileFormatError(f"{where}: a string holds a lone surrogate (an escape like \\ud800 that is not "
                              "text)") from None
    except RecursionError:
        raise FileFormatError(f"{where}: JSON nested too deeply to read") from None
    return value


def read_json(path: str | Path, *, what: str = "JSON file") -> Any:
    """One JSON document (a config, a state file)."""
    return _parse_json(read_text(path, what=what), str(path))


def iter_jsonl(path: str | Path, *, what: str = "JSON-lines file", torn_tail: str = "error") -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line. ``torn_tail``: what a last line without
    its newline is: ``"error"`` (a data file: it is parsed like any line, and only an unparsable
    one is an error), or ``"skip"`` (a log: skipped with a :class:`TornTailWarning`)."""
    path = Path(path)
    text = read_text(path, what=what)
    *lines, tail = text.split("\n")  # tail: '' when the text ends with a newline
    if tail.strip():
        if torn_tail == "skip":
            warnings.warn(f"{path}:{len(lines) + 1}: skipping an incomplete last line ({len(tail.encode())} bytes, "
                          "a write that was cut off or is still going on); the next append removes it",
                          TornTailWarning, stacklevel=3)
        else:
            lines.append(tail)
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield number, _parse_json(line, f"{path}:{number}")


def read_csv(path: str | Path, required: Iterable[str] = (), *, what: str = "CSV file") -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and ``(line, row)`` pairs of a CSV file (``line``: the physical line the row
    starts on, for messages). Missing ``required`` columns, rows with more fields than the header,
    and bad quoting are :class:`FileFormatError` with ``file:line``."""
    path = Path(path)
    text = read_text(path, what=what)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in required if c not in header]
        if missing:
            raise FileFormatError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
        rows, start = [], reader.line_num + 1
        for row in reader:
            if None in row:
                raise FileFormatError(f"{path}:{start}: more fields than the header")
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as error:
        raise FileFormatError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None
    return header, rows


# ----- atomic writes ------------------------------------------------------------------------------

def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def blocking_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (nothing can be created under
    it), else ``None``."""
    for folder in path.parents:
        if folder.exists():
            return None if folder.is_dir() else folder
    return None


def check_writable_file(path: str | Path, *, what: str = "output file") -> Path:
    """``path`` as a file that can be written: not a directory, its parent a directory (created
    when missing). Call it before long work, so that a bad output fails before the work is done."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; the {what} must be a file path")
    _refuse_blocked(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _refuse_blocked(path: Path, what: str) -> None:
    blocker = blocking_ancestor(path)
    if blocker is not None:
        raise InputError(f"{blocker}: is a file, so the {what} {path} cannot be created under it")


def check_writable_dir(path: str | Path, *, what: str = "output folder") -> Path:
    """``path`` as a folder to write into (created when missing); a file there is an error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: is a file; the {what} must be a folder")
    _refuse_blocked(path, what)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = check_writable_file(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any, *, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=indent) + "\n")


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """``with atomic_directory(final) as tmp: write files into tmp`` — on success the folder is
    fsynced and renamed to ``final`` (replacing an older one); on an error it is removed.
    The block runs in every process; only the caller decides who writes (see the trainer)."""
    path = Path(path)
    check_writable_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(tmp: Path, final: Path) -> Path:
    """Fsync the finished folder ``tmp`` and rename it to ``final``, replacing an older ``final``."""
    _fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


# ----- logs ---------------------------------------------------------------------------------------

def _encode(record: dict) -> bytes:
    try:
        return (json.dumps(record, allow_nan=True) + "\n").encode("utf-8")
    except (TypeError, ValueError) as error:
        raise InputError(f"a log record must be JSON data: {error}") from None


class JsonlLog:
    """An append-only JSON-lines log (see the module docstring for the rules).

    ``key``: the field naming a record's item (``None`` for a log without keys); every record
    appended must have it. ``path`` and its lock file ``path.lock`` are created on the first append.
    The log is read when it is opened and again by :meth:`refresh` (and under the lock by every
    append, so appends from other processes are seen)."""

    def __init__(self, path: str | Path, *, key: str | None = "key", fsync: bool = True):
        self.path = check_writable_file(path, what="log file")
        self.key = key
        self.fsync = fsync
        self._lock = FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S)
        self._records: list[dict] = []
        self._keys: set = set()
        self._offset = 0  # bytes of complete lines already read
        self._line = 0  # complete lines already read
        self.duplicates = 0
        self.refresh()

    # reading ---------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the complete lines appended since the last read (by this process or another)."""
        if not self.path.is_file():
            return
        if self.path.stat().st_size < self._offset:
            self._reset()  # rewritten by another process (keep_only): read it again
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1
        complete, tail = data[:end], data[end:]
        if tail.strip():
            where = f"{self.path}:{self._line + complete.count(NEWLINE) + 1}"
            warnings.warn(f"{where}: skipping an incomplete last line "
                          f"({len(tail)} bytes, a write that was cut off or is still going on); the next append "
                          "removes it", TornTailWarning, stacklevel=2)
        try:
            text = complete.decode("utf-8")
        except UnicodeDecodeError as error:
            line = self._line + complete.count(b"\n", 0, error.start) + 1
            raise FileFormatError(f"{self.path}:{line}: not UTF-8 (byte offset {self._offset + error.start})") from None
        for line in text.split("\n")[:-1]:
            self._line += 1
            if line.strip():
                self._add(_parse_json(line, f"{self.path}:{self._line}"), f"{self.path}:{self._line}")
        self._offset += end

    def _add(self, record: Any, where: str) -> bool:
        if not isinstance(record, dict):
            raise FileFormatError(f"{where}: a log record must be a JSON object")
        if self.key is not None:
            if self.key not in record:
                raise FileFormatError(f"{where}: a log record needs a {self.key!r} field")
            try:
                known = record[self.key] in self._keys
            except TypeError:
                raise FileFormatError(f"{where}: the {self.key!r} field must be a string or a number") from None
            if known:
                self.duplicates += 1
                return False
            self._keys.add(record[self.key])
        self._records.append(record)
        return True

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[dict]:
        """The records, in file order (the first record of each key)."""
        return list(self._records)

    # writing ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the log's lock (appends and rewrites by other processes wait)."""
        try:
            with self._lock:
                yield
        except Timeout:
            raise InputError(f"{self.path}: its lock {self._lock.lock_file} was held for {LOCK_TIMEOUT_S:.0f} s; "
                             "is another deepalign process stuck on it?") from None

    def _cut_torn_tail(self) -> None:
        """Under the lock: drop bytes after the last newline (a write that was cut off)."""
        if not self.path.is_file():
            return
        with open(self.path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            chunk = 1 << 16
            position = size
            while position > 0:
                start = max(0, position - chunk)
                handle.seek(start)
                block = handle.read(position - start)
                newline = block.rfind(b"\n")
                if newline >= 0:
                    handle.truncate(start + newline + 1)
                    break
                position = start
            else:
                handle.truncate(0)
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, record: dict) -> bool:
        """Append ``record``; returns ``False`` (and writes nothing) when its key is already in the
        log. The record is whole on disk (fsynced) when this returns."""
        if not isinstance(record, dict):
            raise InputError(f"a log record must be a dict, got {type(record).__name__}")
        if self.key is not None and self.key not in record:
            raise InputError(f"a record of {self.path} needs a {self.key!r} field")
        line = _encode(record)
        with self.locked():
            self._cut_torn_tail()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TornTailWarning)
                self.refresh()
            if self.key is not None and record[self.key] in self._keys:
                return False
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(descriptor, line)
                if written != len(line):
                    raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
                if self.fsync:
                    os.fsync(descriptor)
            finally:
                os.close(descriptor)
            self._offset += len(line)
            self._line += 1
            self._add(json.loads(line), f"{self.path}:{self._line}")
        return True

    def _reset(self) -> None:
        self._records, self._keys, self._offset, self._line, self.duplicates = [], set(), 0, 0, 0

    def keep_only(self, keep: Callable[[dict], bool]) -> int:
        """Rewrite the log (atomically, under the lock) with the records ``keep`` accepts, e.g. the
        training metrics up to the step a run resumes from. Returns how many were dropped."""
        with self.locked():
            self._reset()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TornTailWarning)
                self.refresh()
            kept = [r for r in self._records if keep(r)]
            dropped = len(self._records) - len(kept)
            if dropped or (self.path.is_file() and self.path.stat().st_size != self._offset):
                atomic_write_bytes(self.path, b"".join(_encode(r) for r in kept))
                self._reset()
                self.refresh()
        return dropped


# ----- settings of a resumable output -------------------------------------------------------------

def check_settings(path: str | Path, settings: dict, *, fresh: str) -> None:
    """Record ``settings`` (JSON data) in ``path`` the first time; on a later run, refuse when they
    differ. ``fresh`` tells the user how to start over (e.g. "use another --output").
    Raises :class:`~deepalign.errors.SettingsMismatchError` naming every differing setting."""
    path = Path(path)
    settings = json.loads(json.dumps(settings))  # tuples → lists, as they will read back
    if not path.is_file():
        atomic_write_json(path, settings)
        return
    recorded = read_json(path, what="settings file")
    if recorded == settings:
        return
    names = sorted(set(recorded) | set(settings)) if isinstance(recorded, dict) else sorted(settings)
    changes = [f"{name}: {_short(recorded.get(name, '(unset)'))} → {_short(settings.get(name, '(unset)'))}"
               for name in names if not isinstance(recorded, dict) or recorded.get(name) != settings.get(name)]
    made = path.parent if path.name == "settings.json" else path.with_name(path.name.removesuffix(".settings.json"))
    raise SettingsMismatchError(f"{made} was made with other "
                                f"settings ({'; '.join(changes)}); {fresh}")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def file_fingerprint(path: str | Path) -> dict:
    """``{"path", "sha256"}`` of a file (or of a folder's files, sorted by name), for settings
    records: a data file edited between a run and its resume is a different run."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest()}
