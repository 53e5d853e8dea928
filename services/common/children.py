"""Child processes that die with their parent (Linux).

``outrider up`` and the ``--workers`` supervisor start long-running children (Envoy,
Redis, the sidecars, the workers). Stopped gracefully, they stop their children
themselves; killed (SIGKILL, a crash, the OOM killer), they cannot, and the children
would live on, re-parented to init, holding their ports and sockets: the next
``make up`` then fails with "address in use".

:func:`dies_with_parent` wraps a command line so that the child asks the kernel for
SIGTERM when its parent goes away (``prctl(PR_SET_PDEATHSIG)``), then execs the real
program: same pid, same file descriptors, and the setting survives the exec. It is a
wrapper process rather than ``preexec_fn`` because ``preexec_fn`` is not safe in a
process with threads (the supervisor has asyncio's executor threads), and it takes
``subprocess`` off its fast ``vfork``/``posix_spawn`` path.

The kernel sends the signal when the *thread* that forked the child exits, not the
process: spawn from a thread that lives as long as the process (the main thread, or
the event loop's thread under ``asyncio.run``), never from a worker thread
(``asyncio.to_thread``, a thread pool), or the child gets SIGTERM when that thread
ends. The parent may also die between the fork and the ``prctl``: the wrapper then
sees a different parent pid and exits instead of exec'ing.

Elsewhere than on Linux the command line is returned unchanged.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Sequence

#: Run with ``python -I -S -c``: no site-packages or environment variables shape the
#: wrapper itself (the exec'd program gets the environment unchanged), so it starts fast.
#: argv: the pid of the intended parent, the signal, the program's path, its argv.
WRAPPER = """\
import ctypes, os, sys
_, parent, sig, path, *argv = sys.argv
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
    sys.exit("prctl(PR_SET_PDEATHSIG): " + os.strerror(ctypes.get_errno()))
if os.getppid() != int(parent):  # the parent died before the prctl: never start
    os._exit(1)
try:
    os.execv(path, argv)
except OSError as exc:
    sys.exit(f"cannot run {path}: {exc}")
"""


def supported() -> bool:
    return sys.platform.startswith("linux")


def dies_with_parent(
    argv: Sequence[str],
    sig: int = signal.SIGTERM,
    env: dict[str, str] | None = None,
) -> list[str]:
    """``argv`` wrapped to receive ``sig`` when the calling process dies (Linux).

    The program is looked up on ``PATH`` (``env``'s, as :class:`subprocess.Popen` does)
    here, so a missing one raises :class:`FileNotFoundError` in the caller as before.
    """
    argv = [os.fspath(a) for a in argv]
    if not supported():
        return argv
    program = argv[0]
    if os.sep in program:
        path = program
    else:
        found = shutil.which(program, path=(env or os.environ).get("PATH", os.defpath))
        if found is None:
            raise FileNotFoundError(f"No such file or directory: {program!r}")
        path = found
    return [sys.executable, "-I", "-S", "-c", WRAPPER, str(os.getpid()), str(int(sig)), path, *argv]
