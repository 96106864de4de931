"""Where deepsim may write: it deletes or replaces only what it made, and one process writes into a folder at a time.

The rule, enforced here and nowhere else (docs/reliability.md, "Your files are never touched"):

- **Output folders are owned.** A folder deepsim writes its results into (``run``, ``sweep``, ``reproduce``,
  ``compare`` and ``register`` ``--out``) carries a marker, :data:`MARKER`, written when deepsim creates the folder or
  takes an empty one. A non-empty folder without the marker (the user's project folder, another tool's output) is
  refused with one line, unless the user passes ``--overwrite``; a folder owned by another deepsim command is refused
  likewise. :func:`own_output_folder` checks, creates, marks and locks.
- **Folders replaced as a whole list their files.** A prepared dataset (``<out>/data``) is built in a staging folder
  and renamed into place; the folder it replaces must be empty or hold exactly the files its marker lists
  (:func:`replace_folder`). A file deepsim did not write there is never deleted, ``--overwrite`` or not.
- **Single outputs never replace an input, a folder or a file deepsim did not write.** ``register`` moves its files
  into its folder only after checking every target (:func:`check_targets`, :func:`publish_files`); ``warp --out``
  must differ from its inputs and may replace an existing file only with ``--overwrite`` (:func:`check_output_file`).
- **One writer per folder.** :func:`own_output_folder` holds an exclusive ``flock`` on ``<folder>/.deepsim.lock``
  for the whole command: a second run into the same folder stops at once with one line naming the first. The kernel
  releases the lock when its process dies (even by SIGKILL), so a stale lock never blocks. :func:`store_lock` does
  the same, waiting, around the creation and migration of a SQLite tracking store.

Every refusal is an :class:`~deepsim.errors.OutputError` (exit 1) raised before anything is written.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deepsim.errors import OutputError, UsageError

__all__ = ["MARKER", "LOCK", "own_output_folder", "check_output_folder", "check_replaceable", "replace_folder",
           "check_targets",
           "publish_files", "check_output_file", "check_apart", "store_lock", "NIFTI_SUFFIXES"]

MARKER = ".deepsim-output.json"
LOCK = ".deepsim.lock"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_OWN_FILES = {MARKER, LOCK}


def _read_marker(folder: Path) -> dict | None:
    """The marker's content, or None when the folder has no (readable) marker."""
    try:
        content = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and content.get("written_by") == "deepsim" else None


def _write_marker(folder: Path, command: str, files: Iterable[str] | None = None) -> None:
    from deepsim.io import atomic_write

    content = {"written_by": "deepsim", "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if files is not None:
        content["files"] = sorted(files)
    atomic_write(folder / MARKER, lambda tmp: Path(tmp).write_text(json.dumps(content, indent=1) + "\n"))


def _some(names: Iterable[str], n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(path: Path) -> None:
    """OutputError unless ``path`` (a folder, or the nearest existing folder above it) can be written into."""
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise OutputError(f"{path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write into {existing} (permission denied)")


def check_output_folder(folder: str | Path, command: str, overwrite: bool = False) -> None:
    """OutputError unless ``command`` may write into ``folder`` (see the module docstring); writes nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a folder; --out takes a folder")
    _check_writable(folder)
    if not folder.is_dir():
        return
    marker = _read_marker(folder)
    if marker is None:
        entries = [p.name for p in folder.iterdir() if p.name not in _OWN_FILES]
        if entries and not overwrite:
            raise OutputError(f"{folder} is not empty and was not created by deepsim (it holds {_some(entries)}); "
                              "choose a new or empty folder, or pass --overwrite to write deepsim's outputs into it "
                              "(files of the same names are replaced)")
    elif marker.get("command") != command and not overwrite:
        raise OutputError(f"{folder} holds the output of `{marker.get('command')}`, not of `{command}`; choose "
                          "another folder (or pass --overwrite)")


def _lock(path: Path, blocking: bool, what: str, timeout_s: float = 300.0) -> int:
    """An exclusive ``flock`` on ``path`` (created if needed): its file descriptor. Non-blocking: OutputError
    naming the holder when another process has it; blocking: wait up to ``timeout_s``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not blocking or time.monotonic() > deadline:
                holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise OutputError(f"{what}: {holder} is writing there now; wait for it to finish or choose another "
                                  "folder") from None
            time.sleep(0.1)
    note = f"deepsim (pid {os.getpid()}, since {time.strftime('%H:%M:%S')})".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, note, 0)
    return fd


@contextmanager
def own_output_folder(folder: str | Path, command: str, overwrite: bool = False, wait: bool = False) -> Iterator[Path]:
    """Check that ``command`` may write into ``folder`` (:func:`check_output_folder`), create and mark it, and hold
    its lock until the block ends. A second process entering the same folder meanwhile gets an OutputError at once
    (``wait``: waits for the lock instead, for short holds such as moving finished files in).

    If the block fails before writing anything into a folder this call created, the folder is removed again, so a
    command refused at start-up (an unreachable tracking server, a bad dataset) leaves nothing behind.
    """
    folder = Path(folder).absolute()
    check_output_folder(folder, command, overwrite)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the folder ({exc.strerror})") from None
    fd = _lock(folder / LOCK, blocking=wait, what=str(folder))
    try:
        if _read_marker(folder) is None or overwrite:
            _write_marker(folder, command)
        yield folder
    except BaseException:
        if created and {p.name for p in folder.iterdir()} <= _OWN_FILES:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        os.close(fd)  # releases the flock


def check_apart(source: str | Path, out_dir: str | Path, what: str) -> None:
    """OutputError when ``out_dir`` (a folder deepsim fills or replaces) is ``source`` or holds it: prepared data
    never lands where the user's data live. ``source``: a folder of input files, or a datalist file (its folder)."""
    source, out_dir = Path(source).resolve(), Path(out_dir).resolve()
    folder = source.parent if source.is_file() else source
    if folder == out_dir or folder.is_relative_to(out_dir):
        raise OutputError(f"{what} {source} lies in {out_dir}, where deepsim writes its prepared copy; keep your "
                          "data outside the output folder (choose another --out)")


def check_replaceable(out_dir: str | Path) -> None:
    """OutputError unless :func:`replace_folder` may replace ``out_dir``: absent, empty, or holding only files its
    marker lists. Writes nothing."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir} is a file, not a folder deepsim can prepare data in")
    marker = _read_marker(out_dir)
    listed = set(marker.get("files", [])) if marker is not None else set()
    foreign = {p.name for p in out_dir.iterdir()} - listed - _OWN_FILES
    if foreign:
        raise OutputError(f"{out_dir} holds files deepsim did not write ({_some(foreign)}); deepsim never "
                          "deletes them: move them away, or choose another output folder")


def replace_folder(staging: Path, out_dir: Path, command: str = "prepare dataset") -> None:
    """Put the finished ``staging`` folder in place of ``out_dir`` with renames only, listing its files in its marker.

    ``out_dir`` may be absent, empty, or a folder this function wrote before whose files are all listed in its
    marker; anything else is refused (OutputError naming the foreign files) and nothing is deleted.
    """
    staging, out_dir = Path(staging), Path(out_dir)
    check_replaceable(out_dir)
    _write_marker(staging, command, [p.name for p in staging.iterdir() if p.name not in _OWN_FILES])
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "d")
        os.replace(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_targets(out_dir: str | Path, names: Iterable[str], inputs: Iterable[str | Path | None],
                  command: str, overwrite: bool = False) -> None:
    """OutputError unless files ``names`` may be written into ``out_dir``: the folder is ours or empty (or
    ``overwrite``), no target is a folder or one of the command's ``inputs``, and an existing target is a file this
    command wrote there before (listed in the marker) or ``overwrite`` is given. Writes nothing."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir, command, overwrite)
    marker = _read_marker(out_dir) if out_dir.is_dir() else None
    listed = set(marker.get("files", [])) if marker is not None else set()
    inputs = [Path(p) for p in inputs if p is not None]
    for name in names:
        target = out_dir / name
        if any(_same_file(target, source) for source in inputs):
            raise OutputError(f"{target} is one of this command's inputs; deepsim never overwrites its inputs "
                              "(choose another --out)")
        if target.is_dir():
            raise OutputError(f"{target} is a folder; deepsim writes a file of that name there (move it away)")
        if target.exists() and name not in listed and not overwrite:
            raise OutputError(f"{target} exists and was not written by deepsim; pass --overwrite to replace it "
                              "or choose another --out")


def publish_files(files: dict[str, Path], out_dir: str | Path, inputs: Iterable[str | Path | None], command: str,
                  overwrite: bool = False) -> dict[str, Path]:
    """Move finished files (name -> staged path) into ``out_dir`` under its lock, after :func:`check_targets` on
    all of them, so a refusal moves none; the marker then lists them. Returns name -> final path."""
    out_dir = Path(out_dir)
    inputs = list(inputs)
    names = [path.name for path in files.values()]
    with own_output_folder(out_dir, command, overwrite, wait=True):
        check_targets(out_dir, names, inputs, command, overwrite)
        final = {}
        for name, path in files.items():
            final[name] = out_dir / path.name
            os.replace(path, final[name])
        marker = _read_marker(out_dir) or {}
        _write_marker(out_dir, command, set(marker.get("files", [])) | set(names))
    return final


def check_output_file(out: str | Path, inputs: Iterable[str | Path | None], overwrite: bool = False) -> Path:
    """``out`` if a single NIfTI output may be written there: a NIfTI name (UsageError otherwise), not a folder, not
    one of ``inputs`` (even with ``overwrite``), and not an existing file unless ``overwrite``. Writes nothing."""
    out = Path(out)
    if not out.name.endswith(NIFTI_SUFFIXES):
        raise UsageError(f"--out {out}: the output must be a NIfTI file name ending in .nii.gz or .nii")
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give a file name such as {out / 'warped.nii.gz'}")
    for source in (Path(p) for p in inputs if p is not None):
        if _same_file(out, source):
            raise OutputError(f"--out {out} is one of this command's inputs; deepsim never overwrites its inputs")
    if out.exists() and not overwrite:
        raise OutputError(f"--out {out} exists; pass --overwrite to replace it")
    _check_writable(out.parent)
    return out


@contextmanager
def store_lock(database: str | Path, timeout_s: float = 300.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<database>.lock`` (waiting for other processes, at most ``timeout_s``): the
    creation and schema migration of a SQLite store run once, by one process, never concurrently."""
    database = Path(database)
    fd = _lock(database.with_name(database.name + ".lock"), blocking=True, what=f"tracking store {database}",
               timeout_s=timeout_s)
    try:
        yield
    finally:
        os.close(fd)
