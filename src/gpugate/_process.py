"""This process's id, kept current across forks without a system call per read.

``os.getpid()`` is a system call (0.2 µs on a VM), and every decision asks
whether its gate (and the scripts' lane) still belongs to this process. The
id is read once at import and again in every child right after a fork
(``os.register_at_fork``, which ``os.fork``, ``os.forkpty`` and
multiprocessing's fork start method all run).
"""

from __future__ import annotations

import os

pid = os.getpid()


def _after_fork_in_child() -> None:
    global pid
    pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
