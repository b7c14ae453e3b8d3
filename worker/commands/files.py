"""Files a command writes for the operator (``preview --out``'s messages, ``insights --plot``'s chart): each whole
or not at all."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

PARTIAL = ".partial"
"""What a file is called while it is written: ``.gaps.png.partial`` beside ``gaps.png``, renamed when whole."""


def write_whole(path: Path, data: bytes) -> None:
    """``data`` in ``path``, whole or not at all: written under a hidden temporary name beside it, then renamed
    over it. A write that fails, or that Ctrl-C or SIGTERM stops (``stopping.Terminated``), removes the temporary
    file; only a kill (SIGKILL) leaves it, and never a file cut short under its own name. An ``OSError`` names
    ``path``, not the temporary file.

    A symbolic link keeps pointing where it did: the file it points to is the one replaced. A path that is no
    regular file nor folder (a named pipe, ``/dev/stdout``, a terminal) is written straight into, as ``cat`` would:
    renamed over, the pipe or device itself was replaced by a file that nobody reads. A link another user made in
    a shared folder (sticky and open to all, as /tmp) is not followed: ``PermissionError``, as ``>`` is refused
    there (Linux's ``fs.protected_symlinks``): followed, it had the operator's own file replaced by the chart."""
    named = path
    if path.is_symlink():
        _may_follow(path)
    try:
        mode = path.stat().st_mode  # through a link: what it points to
    except OSError:  # not there yet (or not reachable: the writing below says why)
        mode = 0
    if path.is_symlink() and not (real := Path(os.path.realpath(path))).is_symlink():  # (a loop of links: as it is)
        path = real  # a dangling link too: the file it names is created
    if mode and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        try:
            with open(named, "wb") as f:  # as named: /dev/stdout's link leads to no path of its own
                f.write(data)
        except OSError as exc:
            if exc.errno is not None:
                raise type(exc)(exc.errno, exc.strerror, str(named)) from None
            raise
        return
    partial = path.with_name(f".{path.name}{PARTIAL}")
    try:
        with open(_temporary(partial), "wb") as f:
            f.write(data)
        os.replace(partial, path)
    except BaseException as exc:  # KeyboardInterrupt too: the command stops, leaving whole files only
        with contextlib.suppress(OSError):
            partial.unlink()
        if isinstance(exc, OSError) and exc.errno is not None:
            raise type(exc)(exc.errno, exc.strerror, str(named)) from None
        raise


def _may_follow(link: Path) -> None:
    """Refuse (``PermissionError``, naming ``link``) a chain of links one of which lies in a sticky folder anyone may
    write, owned neither by this user nor by the folder's owner: the kernel's rule for ``fs.protected_symlinks``,
    kept whatever the setting (``os.path.realpath`` reads links without it)."""
    at = link
    for _ in range(40):  # (a loop of links: the writing says so)
        try:
            own = at.lstat()
        except OSError:
            return
        if not stat.S_ISLNK(own.st_mode):
            return
        folder = at.parent.stat()
        shared = folder.st_mode & stat.S_ISVTX and folder.st_mode & stat.S_IWOTH
        if shared and own.st_uid not in (os.geteuid(), folder.st_uid):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES) + " (a link another user made in a "
                                  "shared folder: not followed)", str(link))
        at = at.parent / os.readlink(at)


_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def _temporary(partial: Path) -> int:
    """The temporary file opened for writing, never through a link in its place (one another user made in a shared
    folder, its name being no secret, had the data written into the file it pointed to): such a link is removed."""
    try:
        return os.open(partial, _WRITE, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
    partial.unlink()  # the link itself, not what it points to
    return os.open(partial, _WRITE | os.O_EXCL, 0o666)
