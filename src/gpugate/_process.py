"""Who this process is: its id, kept current across forks without a system
call per read, and the operator name it records on what it changes.

``os.getpid()`` is a system call (0.2 µs on a VM), and every decision asks
whether its gate (and the scripts' lane) still belongs to this process. The
id is read once at import and again in every child right after a fork
(``os.register_at_fork``, which ``os.fork``, ``os.forkpty`` and
multiprocessing's fork start method all run).
"""

from __future__ import annotations

import getpass
import os
import socket

pid = os.getpid()


def operator_name() -> str:
    """``user@host``: who this process acts for, recorded on an override or an
    ended lease when the caller names nobody (``who=``, ``--who``). The user
    is the login name (``getpass.getuser()``: ``$LOGNAME``, ``$USER``, … then
    the password database), ``unknown`` when there is none."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _after_fork_in_child() -> None:
    global pid
    pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
