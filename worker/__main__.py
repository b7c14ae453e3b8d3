"""`python -m worker` is `kembali`, and ``main`` is the ``kembali`` console script: a SIGTERM is noted from the
first line (``worker.launch``), before the half second Python takes to import the command's modules."""

import os
import signal
import sys

from worker import launch


def _closed_output_to_devnull() -> None:
    """Standard output or error the command was started without (`kembali run --once >&-`): /dev/null in its place,
    its text discarded. Python leaves ``sys.stdout`` None then (every command ended in a traceback, after its work),
    and the free descriptor would be the next file opened: the SQLite database as descriptor 1. (A closed standard
    input is left closed: ``import -`` says so.)"""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:  # the lowest free descriptor: standard input's, when that is closed too
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "w", encoding="utf-8", closefd=False))  # noqa: SIM115 (for the process)


def main() -> int:
    launch.note_sigterm()  # first: everything below takes time to import
    _closed_output_to_devnull()
    try:
        from worker.cli import main as command
    except KeyboardInterrupt:  # Ctrl-C while Python loads kembali (later, the command says it itself)
        print("kembali: stopped by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT.value
    try:
        code = command()
    except SystemExit:  # --help, --version, a usage error
        if not launch.unanswered():
            raise
        code = 0
    if launch.unanswered():  # no handler took it: it came before anything began that could stop gracefully
        print("kembali: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM.value
    return code


if __name__ == "__main__":
    sys.exit(main())
