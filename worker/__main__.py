"""`python -m worker` is `kembali`, and ``main`` is the ``kembali`` console script: a SIGTERM is noted from the
first line (``worker.launch``), before the half second Python takes to import the command's modules."""

import signal
import sys

from worker import launch


def main() -> int:
    launch.note_sigterm()  # first: everything below takes time to import
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
