"""Warm stage processes: a fork server that imports torch, timm, peft, MLflow and the project's code once, so that
each ``dvc repro`` stage forks from it instead of paying ~5 s of imports (32 stage processes for the 5-task demo).

How a stage runs (``pipelines/_stage.py``): the stage process (the *client*, which has imported nothing heavy)
connects to the server of its project and code version over a Unix socket in a private folder, and sends its
argv, working directory, environment and its stdin/stdout/stderr (file descriptors, ``SCM_RIGHTS``). The server
forks a child that becomes the stage: same arguments, folder, environment and output streams, its own process
group. The client waits for the child's exit status and exits with it; SIGINT/SIGTERM are forwarded, and a client
that dies (``kill -9`` of ``dvc repro``) takes its child with it. No server yet: the stage runs in its own process
as before and starts one in the background for the stages that follow.

Why it is safe to reuse: the server is keyed by the interpreter and every source file of ``lorax/`` and
``pipelines/`` (path and content hash, so any edit, even one that keeps a file's size and mtime, starts a new server;
the old one exits when idle and removes its socket); it runs
no torch operation and starts no Python thread before forking (children start from freshly imported modules, as
DataLoader workers forked after ``import torch`` do); it serves only
its own user (the socket's folder is private and every peer's uid is checked). The environment that libraries read
when they load (thread counts, devices, hub and tracking settings) is part of the key too. ``LORAX_WARM=0``
switches it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

IDLE_S = 90.0  # with no stage running, exit after this long idle
PRELOAD = ("torch", "timm", "peft", "mlflow", "pandas", "pyarrow.parquet", "PIL.Image", "sklearn.linear_model",
           "matplotlib", "lorax.config", "lorax.continual.trainer", "lorax.continual.evaluation",
           "lorax.continual.selection", "lorax.serving.openset", "lorax.data.prepare", "lorax.data.zoo",
           "pipelines.steps", "pipelines.publish", "pipelines.tracking.tracker", "pipelines.tracking.model_registry",
           "pipelines.serving.pyfunc", "pipelines.serving.card")
CHILD_ENV = "LORAX_WARM_CHILD"  # set in a forked stage: it runs, never delegates again


def enabled() -> bool:
    return os.environ.get("LORAX_WARM", "1") != "0" and not os.environ.get(CHILD_ENV) and sys.platform == "linux"


# environment read when libraries load (thread pools, devices, hub and tracking settings): part of the key
IMPORT_ENV = ("OMP_", "MKL_", "OPENBLAS_", "CUDA_", "TORCH", "PYTORCH_", "NCCL_", "HF_", "TRANSFORMERS_", "MLFLOW_",
              "PYTHON", "LD_", "PREFECT_")


def source_key(root: Path) -> str:
    """The interpreter, the environment libraries read when they load, and every source file of the project's
    code: a server serves exactly this version."""
    h = hashlib.sha256(f"{sys.executable}\0{root}\0".encode())
    for k in sorted(k for k in os.environ if k.startswith(IMPORT_ENV)):
        h.update(f"{k}={os.environ[k]}\0".encode())
    for pkg in ("lorax", "pipelines"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f"{f.relative_to(root)}\0".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())  # the content: ~10 ms for the whole tree
    return h.hexdigest()[:24]


def runtime_dir() -> Path:
    """A folder only this user can enter (the socket's permissions are not enough on every system)."""
    d = Path(tempfile.gettempdir()) / f"lorax-warm-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.lstat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not d.is_dir() or d.is_symlink():
        raise PermissionError(f"{d}: not a private folder of this user; remove it or set LORAX_WARM=0")
    return d


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    conn.sendall(struct.pack("!I", len(data)) + data)


def _recv(conn: socket.socket) -> dict[str, Any] | None:
    head = _recv_exact(conn, 4)
    if head is None:
        return None
    body = _recv_exact(conn, struct.unpack("!I", head)[0])
    return None if body is None else json.loads(body)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


# ------------------------------------------------------------------------------------------------ the client
def run_warm(module: str, argv: list[str]) -> int | None:
    """Run stage ``module`` (e.g. ``pipelines.train``) in a child of the warm server; its exit status, or None
    when there is no server (one is started for the next stages and the caller runs the stage itself)."""
    root = Path.cwd().resolve()
    try:
        path = runtime_dir() / f"{source_key(root)}.sock"
    except OSError:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        _start_server(path, root)
        return None
    request = {"module": module, "argv": argv, "cwd": str(root), "env": dict(os.environ)}
    data = json.dumps(request).encode()
    socket.send_fds(conn, [struct.pack("!I", len(data)) + data], [0, 1, 2])
    forward = lambda signum, _frame: _send(conn, {"signal": signum})  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            msg = _recv(conn)
            if msg is None:
                print(f"stage {module}: the warm stage server ended while the stage ran; run it again "
                      "(LORAX_WARM=0 runs stages without it)", file=sys.stderr)
                return 1
            if "exit" in msg:
                return int(msg["exit"])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        conn.close()


def _start_server(path: Path, root: Path) -> None:
    """A detached server (own session, no inherited output: ``dvc repro``'s pipes close when the stages end)."""
    import subprocess

    lock = path.with_suffix(".starting")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)  # one starter at a time
    except FileExistsError:
        if time.time() - lock.stat().st_mtime < 120:
            return
        lock.unlink(missing_ok=True)
        return
    os.close(fd)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAX_STAGE_")}
    subprocess.Popen([sys.executable, "-m", "pipelines.warm", str(path)], cwd=root, env=env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


# ------------------------------------------------------------------------------------------------ the server
def serve(path: Path) -> int:
    """Import PRELOAD, then fork one child per request until idle for IDLE_S."""
    import importlib
    import threading

    lock = path.with_suffix(".starting")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stop is an exit: the socket is removed (finally)
    listener: socket.socket | None = None
    bound: os.stat_result | None = None  # the socket file this server made (a socket's fstat is not its file's inode)
    children: dict[int, socket.socket] = {}  # pid -> client connection
    try:
        try:
            for name in PRELOAD:
                try:
                    importlib.import_module(name)
                except ImportError:
                    pass  # an optional extra (e.g. open_clip) is imported by the stage that needs it
            if threading.active_count() != 1:  # forking with other threads alive is unsafe: serve nobody
                return 1
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            path.unlink(missing_ok=True)
            old_umask = os.umask(0o177)
            # a stop between the bind and knowing the file would leave the socket behind: hold it until both are done
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                listener.bind(str(path))
                bound = path.stat()
            finally:
                os.umask(old_umask)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            listener.listen(16)
        finally:
            lock.unlink(missing_ok=True)
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        idle_since = time.monotonic()
        while children or time.monotonic() - idle_since < IDLE_S:
            for key, _ in sel.select(timeout=0.1):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    pid = _fork_stage(conn, listener, list(children.values()))
                    if pid is not None:
                        children[pid] = conn
                        sel.register(conn, selectors.EVENT_READ, pid)
                    else:
                        conn.close()
                else:
                    _client_message(key.fileobj, key.data)
            for pid, conn in list(children.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    with contextlib.suppress(OSError):
                        _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
                    sel.unregister(conn)
                    conn.close()
                    del children[pid]
                    idle_since = time.monotonic()
            if not path.exists():  # removed by hand: stop serving
                break
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        if bound is not None:
            with contextlib.suppress(OSError):  # our socket only: a newer server may have bound the path since
                now = path.stat()
                if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
                    path.unlink()
        if listener is not None:
            listener.close()
    return 0


def _client_message(conn: socket.socket, pid: int) -> None:
    """A forwarded signal, or the client gone (its stage must not outlive it)."""
    try:
        msg = _recv(conn)
    except OSError:
        msg = None
    with contextlib.suppress(OSError):
        if msg is None:
            os.killpg(pid, signal.SIGKILL)
        elif "signal" in msg:
            os.killpg(pid, int(msg["signal"]))


def _die_with_server() -> None:
    """A stage forked by the server is killed with it (Linux ``PR_SET_PDEATHSIG``; the server is single-threaded)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _fork_stage(conn: socket.socket, listener: socket.socket, others: list[socket.socket]) -> int | None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    if struct.unpack("3i", creds)[1] != os.getuid():
        return None
    head, fds, _, _ = socket.recv_fds(conn, 4, 3)
    if len(head) != 4 or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    body = _recv_exact(conn, struct.unpack("!I", head)[0])
    if body is None:
        return None
    req = json.loads(body)
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return pid
    # the child: becomes the stage process
    try:
        _die_with_server()
        os.setpgid(0, 0)
        listener.close()
        conn.close()
        for c in others:
            c.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        os.environ[CHILD_ENV] = "1"
        sys.argv = [req["module"], *req["argv"]]
        import runpy

        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1])))
