"""A fork server for the mutation run: torch, transformers, triton, ray... are imported once, and each
test command forks a child that imports lessserve afresh (the mutant on disk) and runs pytest.
It saves the ~10 s interpreter start of every mutant's test run.

    python tests/mutation/forkserver.py serve SOCKET SRC                 (run.py starts it)
    python -S tests/mutation/forkserver.py run SOCKET TIMEOUT_S ARGS...  (cosmic-ray's test-command)

`run` exits with the child's pytest exit status; a child past TIMEOUT_S is killed (status 124).
The latest run's output is in last-run.log beside the socket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time


def serve(path: str, src: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, src)
    for name in ("torch", "numpy", "transformers", "triton", "triton.language", "safetensors.torch", "pydantic",
                 "pydantic_settings", "redis", "redis.asyncio", "hypothesis", "pytest", "gguf", "yaml", "fastapi",
                 "httpx", "ray", "ray.serve", "transformers.models.llama"):
        try:
            __import__(name)
        except Exception:  # noqa: BLE001  (a missing optional package only costs its import later)
            pass
    assert not any(m == "lessserve" or m.startswith(("lessserve.", "tests")) for m in sys.modules)
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    while True:
        conn, _ = sock.accept()
        with conn:
            req = json.loads(conn.makefile().readline())
            args, timeout_s, log = req["args"], float(req["timeout"]), req["log"]
            pid = os.fork()
            if pid == 0:
                os.setsid()
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # the latest run's output
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                for fd in (1, 2):
                    os.dup2(out, fd)
                os.chdir(src)
                import pytest

                os._exit(int(pytest.main(args)))
            end, status = time.time() + timeout_s, None
            while status is None:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(st)
                elif time.time() > end:
                    os.killpg(pid, signal.SIGKILL)  # the child's own group (setsid above)
                    os.waitpid(pid, 0)
                    status = 124
                else:
                    time.sleep(0.05)
            try:
                conn.sendall(f"{status}\n".encode())
            except OSError:
                pass


def run(path: str, timeout_s: str, args: list[str]) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    log = os.path.join(os.path.dirname(path), "last-run.log")
    sock.sendall((json.dumps({"args": args, "timeout": timeout_s, "log": log}) + "\n").encode())
    return int(sock.makefile().readline() or 125)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        sys.exit(run(sys.argv[2], sys.argv[3], sys.argv[4:]))
