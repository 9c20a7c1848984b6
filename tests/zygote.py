"""A parent, with Baton already imported, for the services the tests start.

Most of a service's start is the interpreter importing Baton and its libraries (about 0.6 s of CPU
here), and the suite starts some three hundred of them. The harness asks this process, which has
imported them once, to fork each one instead. A forked service is still a process of its own, with
its own environment, working directory, log file and exit status; real signals reach it, and it
runs the same `baton` command line (`cli.main`) as `python -m cli` would.

JSON lines. The harness writes `{"argv": [...], "env": {...}, "cwd": "...", "log": "..."}` (and
`"err": "..."` for a command whose standard error is read apart from its output); this answers
`{"pid": N}`, then, once that process has ended, `{"exited": N, "returncode": R}` (negative for a
signal, as `subprocess` says). It stops at the end of its input. One thread only: the fork
copies no lock another thread holds.

    python -u -m tests.zygote
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import traceback

import cli
import executor.service  # noqa: F401 - imported here so that no service imports it again
import worker.service  # noqa: F401

# Every command: the tests run the command line's other commands through here too.
cli.load_commands()


def _answer(message: dict[str, object]) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def _become(request: dict[str, object], keep: set[int]) -> None:
    """In the child: take the request's environment, directory and log, and run the command."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(request["env"]).items()})
        os.chdir(str(request["cwd"]))
        log = os.open(str(request["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err = os.open(str(request["err"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if "err" in request else log
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(err, 2)
        for fd in {log, err, devnull, *keep}:
            os.close(fd)
        # Fresh streams over the new descriptors, written through at once (tests read the log).
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.argv = ["baton", *[str(a) for a in request["argv"]]]
        cli.main()  # registers the commands this command line needs, as `baton` does
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a child reports whatever ended it, as an interpreter would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    pending = b""
    while True:
        try:
            readable, _, _ = select.select([0, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in readable:
            os.read(wake_r, 4096)
            for pid in list(children):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children.discard(pid)
                    _answer({"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})
        if 0 in readable:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _become(request, keep={wake_r, wake_w})
                children.add(pid)
                _answer({"pid": pid})


if __name__ == "__main__":
    main()
