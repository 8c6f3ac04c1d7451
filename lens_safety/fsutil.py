"""Writing a directory so that nothing half-written ever carries its final name.

:func:`require_free` is the one "output exists" check: a writer calls it before any work, so a
taken ``--out`` fails at once instead of after a long run.

:func:`staged_directory` is the one way lens-safety writes an output or cache directory:

1. a lock, ``.{name}.lock`` next to the target, taken with ``flock`` for the whole build and
   removed at the end: a second process writing the same target fails at once with one line
   naming the first one's pid (or, with ``wait``, waits for it);
2. stale staging directories of the same target (``.{name}.tmp-{pid}-…`` whose process is gone:
   the leftovers of a killed run) are removed;
3. the caller builds everything in a fresh ``.{name}.tmp-{pid}-…`` sibling (same filesystem, so the
   final rename is atomic);
4. on success the sibling is renamed onto the target. If the target exists by then: ``overwrite``
   moves it aside, renames, and only then deletes the old one; ``keep_existing`` (caches: another
   process built the same thing first) discards ours; otherwise it is an error and nothing is
   overwritten.

On any exception the sibling is removed and the target is untouched; an ``OSError`` (disk full,
read-only directory) becomes one :class:`~lens_safety.errors.LensSafetyError` line. A ``kill -9``
leaves at most the clearly temporary sibling and the lock file; the next run removes both.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lens_safety.errors import LensSafetyError


def _directory_mode() -> int:
    """The mode ``mkdir`` would give a new directory under the current umask (read from
    ``/proc/self/status`` where it exists: setting and restoring the umask is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o777 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o777 & ~umask


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts: it cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _stale_siblings(target: Path) -> list[Path]:
    prefix = f".{target.name}.tmp-"
    stale = []
    for path in target.parent.glob(f"{prefix}*"):
        pid_text = path.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            stale.append(path)
    return stale


@contextmanager
def _locked(target: Path, wait: bool) -> Iterator[None]:
    lock = target.parent / f".{target.name}.lock"
    with open(lock, "a+") as handle:  # closing releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            raise LensSafetyError(
                f"another lens-safety process (pid {owner}) is writing {target}",
                "wait for it to finish, or choose another output directory",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            # Removed while still held. A process that opened the old file meanwhile may then lock
            # it alongside a newer one; publishing re-checks the target, so neither overwrites
            # the other's result without overwrite=True.
            lock.unlink(missing_ok=True)


def _share_files(root: Path) -> None:
    """Give every file under ``root`` the mode a new file gets under the umask: writers such as
    safetensors' ``save_file`` create ``0o600`` files, which would make a published output private."""
    mode = _directory_mode() & 0o666
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _publish(tmp: Path, target: Path, overwrite: bool, keep_existing: bool) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    if keep_existing:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if not overwrite:
        raise LensSafetyError(
            f"{target} appeared while this run was writing it; nothing was overwritten",
            "pass --overwrite to replace it, or choose another output directory",
        )
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, aside / target.name)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(aside / target.name, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def require_free(path: str | Path, overwrite: bool, *, option: str = "--out") -> None:
    """Refuse an existing ``path`` unless ``overwrite`` (one line naming ``option`` to change)."""
    if Path(path).exists() and not overwrite:
        raise LensSafetyError(f"{path} already exists", f"pass --overwrite or choose another {option}")


@contextmanager
def staged_directory(
    target: str | Path, *, overwrite: bool = False, keep_existing: bool = False, wait: bool = False
) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``target`` when the block ends without error
    (see the module docstring). ``wait``: block until another writer of ``target`` is done instead
    of failing (for caches, where the caller then finds the other writer's result)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target, wait):
            for stale in _stale_siblings(target):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
            tmp.chmod(_directory_mode())  # mkdtemp's 0o700 would make the published output private
            try:
                yield tmp
                _share_files(tmp)
                _publish(tmp, target, overwrite, keep_existing)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise LensSafetyError(
            f"writing {target} failed ({reason}); nothing was left at {target}",
            "check free disk space and permissions, then retry",
        ) from None


def write_file_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling renamed into place, so a
    reader never sees a partial file; an ``OSError`` becomes one :class:`LensSafetyError` line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LensSafetyError(
            f"cannot write '{path}' ({exc.strerror or exc})", "choose a writable path with free space"
        ) from None
    return path
