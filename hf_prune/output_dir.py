"""One save protocol for every output directory hf_prune writes: model exports (`save_pretrained`, `save_pruned`,
offloaded one-shot runs), the CLI's outputs (weights, config, card *and* tokenizer) and ONNX exports.

Everything a writer puts in the directory is written into a hidden build directory first; only a complete build is
moved into place ([`atomic_output_dir`]). What the target holds at any moment:

- **Parent writable (the usual case)**: the build is `.NAME.hf_prune-tmp-<pid>-*` beside the target and is swapped
  in whole (`rename`, or `renameat2(RENAME_EXCHANGE)` over an existing directory): the target is the complete old
  content, the complete new one, or absent (a fresh save), never a mix, even after `kill -9`.
- **Parent not writable, or the target is a mount point** (a container volume at `/output` under a read-only root):
  the build is `TARGET/.hf_prune-tmp-<pid>-*` and its files are moved in one by one after it is complete and
  verified. The old export is taken down first, `config.json` first, and the new files move in with `config.json`
  last, so the target holds a `config.json` only while it holds one complete export (old or new); a crash during the
  moves leaves a directory without `config.json`, which does not load (never a mix that loads).

In both modes: a symlinked target is saved where the link points (the link stays a link; a dangling one is an
error); with `overwrite=False` concurrent saves to one target are serialised by a lock on its parent and the
"exists" check is repeated under it, so exactly one wins; modes follow the umask; hidden build directories that an
interrupted save left are removed by the next save of the same target; an `OSError` (a full disk) while building
is re-raised as [`OutputWriteError`] saying that the target was left as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = "config.json"  # present only while the target holds one complete export
_INSIDE_PREFIX = ".hf_prune-tmp-"


class OutputWriteError(OSError):
    """Writing an output directory failed (e.g. the disk is full); the target was left as it was."""


# -------------------------------------------------------------------------------------------------- checks
def resolve_output(target: str | os.PathLike, what: str = "output") -> Path:
    """The real path a save writes to: symlinks followed (a link to a directory is saved into), a dangling link
    refused, a path that exists and is not a directory refused."""
    path = Path(target)
    real = Path(os.path.realpath(path))
    if path.is_symlink() and not real.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} is a symlink to {os.readlink(path)!r}, which does not exist")
    if real.exists() and not real.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} exists and is not a directory")
    return real


def check_disjoint(source: str | os.PathLike | None, output: str | os.PathLike, *, source_name: str = "source",
                   output_name: str = "output") -> None:
    """Refuses an output that is, contains, or is inside the source directory (symlinks resolved): replacing it
    would delete the source (or a sibling of it)."""
    if source is None:
        return
    src, out = Path(os.path.realpath(source)), Path(os.path.realpath(output))
    if out == src:
        relation = "is"
    elif out in src.parents:
        relation = "contains"
    elif src in out.parents:
        relation = "is inside"
    else:
        return
    raise ValueError(f"{output_name} {str(output)!r} {relation} the {source_name} {str(source)!r} (after resolving "
                     f"symlinks: {str(out)!r} vs {str(src)!r}); writing there would replace the {source_name}. "
                     f"Choose an {output_name} outside it")


def non_empty(directory: Path) -> list[str]:
    """`conflicts` of writers that own their whole directory (the ONNX export): any entry."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(_INSIDE_PREFIX))


def check_output(target: str | os.PathLike, overwrite: bool, *, conflicts: Callable[[Path], list[str]] = non_empty,
                 sources: Iterable[str | os.PathLike | None] = (), what: str = "output") -> Path:
    """Every check of an output before any work; returns the resolved target. `conflicts(dir)` names what an
    existing directory holds that only `overwrite=True` may replace."""
    real = resolve_output(target, what)
    for source in sources:
        check_disjoint(source, target, output_name=what)
    if not overwrite and real.is_dir():
        _refuse_existing(target, conflicts(real), what)
    return real


def _refuse_existing(target, existing: list[str], what: str) -> None:
    if existing:
        shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
        flag = "--overwrite" if what.startswith("--") else "overwrite=True"
        raise FileExistsError(f"{what} {str(target)!r} already holds {shown}; pass {flag} to replace it or choose "
                              "another directory")


# -------------------------------------------------------------------------------------------- the protocol
@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, *, overwrite: bool,
                      conflicts: Callable[[Path], list[str]] = non_empty,
                      keep: Callable[[Path], bool] | None = None, sources: Iterable = (),
                      what: str = "output") -> Iterator[Path]:
    """Yields an empty build directory; when the block ends without an error, its content replaces the target's.

    Args:
        target: the output directory (created if missing; a symlink is followed).
        overwrite: replace what `conflicts` finds there; checked before the block and again, under a lock, at the
            swap (a concurrent save that got there first wins, this one raises `FileExistsError`).
        conflicts: names what an existing target holds that needs `overwrite` (default: anything).
        keep: which entries of an existing target survive the save (those the build does not replace); default
            none: the target ends up holding exactly the build.
        sources: directories the output must not be, contain or be inside.

    On an error the build is deleted and the target is untouched (in the read-only-parent mode, an error while the
    files are moved in leaves a target without `config.json`: see the module docstring); an `OSError` of the build
    is re-raised as [`OutputWriteError`].
    """
    build = OutputBuild(target, overwrite=overwrite, conflicts=conflicts, keep=keep, sources=sources, what=what)
    with build.building() as path:
        yield path


class OutputBuild:
    """The steps of [`atomic_output_dir`], for writers whose build spans several calls (`begin` ... `commit`,
    `abort` in every case)."""

    def __init__(self, target, *, overwrite: bool, conflicts: Callable[[Path], list[str]] = non_empty,
                 keep: Callable[[Path], bool] | None = None, sources: Iterable = (), what: str = "output"):
        self.requested = Path(target)
        self.target = check_output(target, overwrite, conflicts=conflicts, sources=sources, what=what)
        self.overwrite, self.conflicts, self.keep, self.what = overwrite, conflicts, keep, what
        self.path: Path | None = None
        self.inside = False  # the build lives inside the target (parent not writable / mount point)
        self.left_as = f"{str(target)!r} was left as it was"

    @contextlib.contextmanager
    def building(self) -> Iterator[Path]:
        """`begin`, then `commit` if the block succeeds (see [`guarded`] for errors)."""
        with self.guarded():
            yield self.begin()
            self.commit()

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        """`abort` on the way out, whatever happens; an `OSError` (or safetensors' I/O error) of the build re-raised
        as `OutputWriteError` saying what became of the target."""
        try:
            yield
        except (FileExistsError, OutputWriteError):
            raise
        except OSError as err:
            raise self._failed(err, err.errno) from err
        except Exception as err:
            if type(err).__name__ != "SafetensorError":  # safetensors' own I/O error (e.g. a full disk)
                raise
            raise self._failed(err, errno.EIO) from err
        finally:
            self.abort()

    def _failed(self, err: Exception, code: int | None) -> OutputWriteError:
        failure = OutputWriteError(f"writing {str(self.requested)!r} failed: {err}; {self.left_as}")
        failure.errno = code
        return failure

    def begin(self) -> Path:
        target = self.target
        parent_writable = _ensure_parent(target)
        _remove_stale(target.parent, _temp_prefix(target))
        if target.is_dir():
            _remove_stale(target, _INSIDE_PREFIX)
        if parent_writable and not (target.is_dir() and os.path.ismount(target)):
            try:
                self.path = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target)}{os.getpid()}-", dir=target.parent))
                return self.path
            except OSError as err:
                if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
        if not target.is_dir():
            target.mkdir()  # raises the parent's EROFS / EACCES: there is nowhere to build
        logger.info("hf_prune: the parent of %s is not writable; building inside it", target)
        self.inside = True
        self.path = Path(tempfile.mkdtemp(prefix=f"{_INSIDE_PREFIX}{os.getpid()}-", dir=target))
        return self.path

    def commit(self) -> None:
        build, target = self.path, self.target
        _apply_umask(build)
        with _locked(target.parent):
            if not self.overwrite and target.is_dir():
                _refuse_existing(self.requested, self.conflicts(target), self.what)
            if self.inside:
                self.left_as = (f"{str(self.requested)!r} may be incomplete (the new files were being moved in; "
                                "it has no config.json until a save completes)")
                _replace_in_place(build, target, self.keep)
            elif not target.exists() or not any(target.iterdir()):
                os.rename(build, target)  # atomic; replaces an empty directory
            else:
                self._swap(build, target)
        self.path = None

    def _swap(self, build: Path, target: Path) -> None:
        new = {p.name for p in build.iterdir()}
        for entry in target.iterdir():  # the user's other files go into the new directory (hard links)
            if entry.name not in new and self.keep is not None and self.keep(entry):
                _link_into(entry, build / entry.name)
        if _exchange(build, target):  # target now holds the new content, build the old one
            shutil.rmtree(build, ignore_errors=True)
            return
        aside = target.parent / f"{_temp_prefix(target)}{os.getpid()}-old"
        os.rename(target, aside)  # target briefly absent, never mixed
        self.left_as = f"the old content of {str(self.requested)!r} is in {str(aside)!r}"
        os.rename(build, target)
        shutil.rmtree(aside, ignore_errors=True)

    def abort(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def _ensure_parent(target: Path) -> bool:
    """Creates the target's parent if needed; whether new entries can be made in it."""
    if not target.parent.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
    return os.access(target.parent, os.W_OK | os.X_OK)


def _replace_in_place(build: Path, target: Path, keep: Callable[[Path], bool] | None) -> None:
    """Moves a complete build (a hidden subdirectory of `target`) in: the old marker goes first, then the old files
    the save replaces, then the new files with the marker last."""
    new = sorted(p.name for p in build.iterdir())
    (target / MARKER).unlink(missing_ok=True)
    for entry in target.iterdir():
        if entry == build or entry.name.startswith(_INSIDE_PREFIX):
            continue
        if entry.name in new or keep is None or not keep(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for name in [n for n in new if n != MARKER] + [n for n in new if n == MARKER]:
        os.replace(build / name, target / name)
    build.rmdir()


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive `flock` on `directory` (read-only open: works on a read-only parent); released on exit or when
    the process dies, so nothing stale is left."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _link_into(src: Path, dst: Path) -> None:
    """Hard-links `src` (a file or a whole tree) at `dst`; copies where the filesystem has no hard links."""
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    else:
        link_or_copy(src, dst)


def link_or_copy(src, dst) -> None:
    try:
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two directories (Linux `renameat2(RENAME_EXCHANGE)`); `False` where that is unavailable.

    Neither `os` nor any library exposes the exchange, so it is called through ctypes; everywhere else the caller
    falls back to two renames (the target is briefly absent, never mixed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


# --------------------------------------------------------------------------------------- interrupted saves
def _temp_prefix(target: Path) -> str:
    return f".{target.name}.hf_prune-tmp-"


def _remove_stale(directory: Path, prefix: str) -> None:
    """Deletes `<prefix><pid>-*` build directories in `directory` whose process no longer runs (names without a
    pid come from older hf_prune versions, also stale)."""
    try:
        candidates = list(directory.glob(f"{glob.escape(prefix)}*"))
    except OSError:
        return
    for path in candidates:
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue  # another process is saving to the same target right now
        logger.info("hf_prune: removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _apply_umask(directory: Path) -> None:
    """The modes a plain `open()` / `mkdir()` would give (`mkdtemp` makes 0700, safetensors writes 0600)."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
