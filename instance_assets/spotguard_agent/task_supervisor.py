"""The parent of one command-mode task, so the task never outlives the agent.

    python -I -S task_supervisor.py WATCH_FD COMMAND_LINE

Started by the agent in a new session (its own process group, whose leader it is) with
the read end of a pipe as WATCH_FD. It runs ``/bin/sh -c COMMAND_LINE`` as its child (stdin,
stdout, stderr inherited) and exits with the child's status. When the pipe reports EOF
before that — the agent died without stopping the task (crash, SIGKILL, a hard kill in the
drill) — it SIGKILLs its whole group: nobody would delete or release the message, the
control plane requeues it, and a copy running on would duplicate side effects.

SIGTERM from the agent (to the group) reaches the command; the supervisor itself only
waits on (its own handler is a no-op, and handlers do not survive exec, so the command gets
SIGTERM's default disposition). Standard library only; no imports of the agent.
"""

from __future__ import annotations

import os
import select
import signal
import sys


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def main(argv: list[str]) -> int:
    watch_fd, command = int(argv[0]), argv[1]
    # The child's exit wakes select() through this pipe (set before the fork: no race).
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    child = os.fork()
    if child == 0:
        os.close(watch_fd)
        signal.set_wakeup_fd(-1)
        try:
            os.execv("/bin/sh", ["/bin/sh", "-c", command])  # noqa: S606 - the shell is the point
        finally:
            os._exit(127)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    signal.signal(signal.SIGINT, lambda _signum, _frame: None)
    while True:
        pid, wait_status = os.waitpid(child, os.WNOHANG)
        if pid == child:
            return _status(wait_status)
        readable, _, _ = select.select([watch_fd, wake_read], [], [])
        if wake_read in readable:
            os.read(wake_read, 512)
        if watch_fd in readable and not os.read(watch_fd, 1):  # EOF: the agent is gone
            os.killpg(os.getpgid(0), signal.SIGKILL)


if __name__ == "__main__":
    # os._exit: skip the interpreter's shutdown (it adds milliseconds per task).
    os._exit(main(sys.argv[1:]))
