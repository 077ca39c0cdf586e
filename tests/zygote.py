"""A fork server for the tests' `llm` runs: interpreter start-up (importing torch: about 2 s of CPU) paid once per
pytest worker instead of once per run.

`python tests/zygote.py serve SOCKET` imports what `python -m llmcli` commands import, without running a single torch
op (forking a process whose OpenMP threads exist is unsafe), then listens on the Unix socket. Each request carries the
arguments, working directory and environment of one `llm` run and three file descriptors (SCM_RIGHTS) for its stdin,
stdout and stderr. The server forks a waiter, the waiter forks the run: the run puts the descriptors on 0, 1 and 2,
changes directory, takes the environment and runs `llmcli` exactly as `python -m llmcli` does, ending through the
interpreter's own exit (exit code, atexit, flushing, uncaught exceptions and signals as in a fresh process). The waiter
sends back the run's pid, then its wait status. So each run is a real process with real descriptors, exit codes and
signals; only start-up is shared.

A run whose environment differs from the server's in something read when modules are imported (OMP_*, PYTHON*, ...)
cannot be forked from it: the server answers "fallback" and the caller starts `python -m llmcli` itself.

Callers: run() (conftest.run_cli), and llm(): `python -S tests/zygote.py run ARGS` for a process the test starts
itself (the `llm` of the README tests' bash, the pipes of tests/test_exact_text.py), which hands its own stdin, stdout
and stderr to the run and exits as the run did. Tests that time, signal or watch the process itself, or check what
start-up imports, start `python -m llmcli` themselves. LLM_TEST_NO_ZYGOTE=1 turns the server off: every run is then a
fresh process, as before.

Measured on the 2-core test machine: `llm finetune` of a nano model 0.7 s instead of 4-5 s (torch, and torch._dynamo
which the first optimizer imports), `llm generate` 0.26 s instead of 0.72 s, `llm --help` 0.16 s instead of 0.4 s.
"""

import json
import os
import signal
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# environment variables a run may change without a fresh interpreter: those read only while a command runs
RUNTIME_PREFIXES = ("LLM_", "PYTEST_")
RUNTIME_NAMES = ("PWD", "OLDPWD", "SHLVL", "_", "TORCHINDUCTOR_CACHE_DIR")  # the last: set by torch when it first compiles


def _forkable(env: dict, base: dict) -> bool:
    changed = {name for name in env.keys() | base.keys() if env.get(name) != base.get(name)}
    return all(name.startswith(RUNTIME_PREFIXES) or name in RUNTIME_NAMES for name in changed)


# --- the server --------------------------------------------------------------------------------------------------

def serve(path: str, lifeline: int):
    """Import, listen, and return only in a forked run: (args, cwd, env) of the request it is to run."""
    base = dict(os.environ)
    # what llmcli.cli.main() sets before any command imports torch or NumPy, set before we import them
    from llmcli.runtime import configure

    configure()
    import importlib
    import pkgutil

    import llmcli

    # what the commands import when they run: every llmcli module (their heavy imports are inside functions), the
    # libraries those functions import, typer's and rich's help, error and option machinery, and what torch imports
    # the first time a model is built on the meta device
    for module in ["numpy", "torch", "safetensors.torch", "safetensors.numpy", "sentencepiece", "yaml", "tokenizers",
                   "gguf", "jinja2", "jinja2.sandbox", "typer._adapters", "typer.rich_utils", "rich.markdown",
                   "torch.fx.experimental.symbolic_shapes", "torch._dynamo",  # 2 s, by torch.optim's first optimizer
                   *(m.name for m in pkgutil.walk_packages(llmcli.__path__, "llmcli.") if m.name != "llmcli.__main__")]:
        importlib.import_module(module)

    assert len(os.listdir("/proc/self/task")) == 1, "threads after the imports: forking would be unsafe"
    import gc

    # the imported objects to a generation the collector never visits: a run that collects (or the refcounting of
    # a shutdown) would otherwise write to, and so copy, every page of the server's heap
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # callers wait for the path: it exists once we accept
    import select

    while True:
        ready, _, _ = select.select([listener, lifeline], [], [])
        while True:  # reap finished waiters
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if lifeline in ready:  # the pytest worker is gone
            os._exit(0)
        conn, _ = listener.accept()
        try:
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(message)
        except (OSError, ValueError):  # a caller gone before it asked: it does not wait for an answer
            conn.close()
            continue
        if len(fds) != 3 or not _forkable(request["env"], base):
            print("fallback:", sorted(n for n in request["env"].keys() | base.keys()
                                      if request["env"].get(n) != base.get(n)), request["args"], file=sys.stderr)
            conn.send(b'{"fallback": true}')
            conn.close()
            for fd in fds:
                os.close(fd)
            continue
        if os.fork() == 0:  # the waiter
            listener.close()
            os.close(lifeline)
            run = os.fork()
            if run == 0:
                conn.close()
                for i, fd in enumerate(fds):
                    os.dup2(fd, i)
                for fd in fds:
                    os.close(fd)
                return request
            for fd in fds:
                os.close(fd)
            try:
                conn.send(json.dumps({"pid": run}).encode())
            except OSError:
                pass
            status = os.waitpid(run, 0)[1]
            try:
                conn.send(json.dumps({"status": status}).encode())
            except OSError:
                pass
            os._exit(0)
        conn.close()
        for fd in fds:
            os.close(fd)


def _become_fresh(request: dict):
    """Make this forked process look like `python -m llmcli ARGS` started in the request's directory."""
    import io
    import random

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["-m", *request["args"]]  # runpy puts the module's path first, as -m does
    sys.orig_argv = [sys.executable, "-m", "llmcli", *request["args"]]
    sys.path[0] = os.getcwd()  # -m puts the working directory first
    # a fresh process draws fresh seeds (torch's default generator starts from a fixed one: untouched here)
    random.seed()
    sys.modules["numpy"].random.seed()
    # the standard streams as the interpreter makes them at start-up, now on the run's descriptors
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        old = getattr(sys, name)
        buffer = open(fd, mode + "b", -1, closefd=False)
        buffer.raw.name = f"<{name}>"
        stream = io.TextIOWrapper(buffer, old.encoding, old.errors, "\n",
                                  line_buffering=buffer.raw.isatty() or fd == 2)
        stream.mode = mode
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


# --- callers -----------------------------------------------------------------------------------------------------

def _request(path: str, args, cwd, env, fds):
    """Send one run; return (connection, pid), or None where the caller must start a fresh process itself."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(path)
        socket.send_fds(conn, [json.dumps({"args": list(args), "cwd": cwd, "env": env}).encode()], fds)
        reply = json.loads(conn.recv(1 << 16))
    except (OSError, ValueError):
        return None
    if "pid" not in reply:
        conn.close()
        return None
    return conn, reply["pid"]


def _status(conn) -> int:
    """The run's wait status, as os.waitpid gives it."""
    while True:
        try:
            return json.loads(conn.recv(1 << 16))["status"]
        except InterruptedError:
            continue


class Server:
    """One fork server for this process (a pytest worker), started by the first call."""

    def __init__(self):
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="llm-zygote-")
        self.path = os.path.join(self.dir, "socket")
        theirs, self.lifeline = os.pipe()  # the server's end reads EOF when we are gone
        import subprocess

        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", self.path, str(theirs)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=open(os.path.join(self.dir, "log"), "wb"), pass_fds=[theirs],
                                        env={**os.environ, "PYTHONPATH": ROOT})
        os.close(theirs)
        import atexit

        atexit.register(self.close)

    def ready(self, timeout: float = 300) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self):
        import shutil

        os.close(self.lifeline)
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


_server = None


def start():
    """Start this process's server (once), without waiting for it; LLM_TEST_NO_ZYGOTE=1 turns it off."""
    global _server
    if _server is None and not os.environ.get("LLM_TEST_NO_ZYGOTE"):
        _server = Server()


def server() -> Server | None:
    """This process's server, started if need be, once it accepts; None where it is off or failed to start."""
    start()
    return _server if _server is not None and _server.ready() else None


def llm(env: dict) -> list[str]:
    """The command line of `llm` for a process the caller starts itself, with env as its environment: this file's
    client of the fork server, which hands its stdin, stdout and stderr to the run and exits as it did (signals it
    gets, SIGKILL aside, are passed on), where there is a server; `python -m llmcli` where there is not."""
    zygote = server()
    if zygote is None:
        return [sys.executable, "-m", "llmcli"]
    env["LLM_TEST_ZYGOTE"] = zygote.path
    return [sys.executable, "-S", os.path.abspath(__file__), "run"]


def run(args, input, cwd, env, timeout):
    """subprocess.run([python, -m, llmcli, *args], input=input, capture_output=True, text=not bytes, cwd, env,
    timeout) through the fork server; None where it cannot serve this run."""
    import locale
    import subprocess
    import threading
    import time

    zygote = server()
    if zygote is None:
        return None
    text = not isinstance(input, bytes)
    encoding = locale.getpreferredencoding(False)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if input is not None else (0, None)
    started = _request(zygote.path, args, os.path.abspath(cwd or os.getcwd()), env, [in_r, out_w, err_w])
    for fd in (out_w, err_w) + ((in_r,) if in_w is not None else ()):
        os.close(fd)
    if started is None:
        for fd in (out_r, err_r) + ((in_w,) if in_w is not None else ()):
            os.close(fd)
        return None
    conn, pid = started
    if in_w is not None:
        data = input.encode(encoding) if text else input

        def feed():
            try:
                with open(in_w, "wb") as f:
                    f.write(data)
            except BrokenPipeError:  # the run did not read it all, as subprocess allows
                pass

        threading.Thread(target=feed, daemon=True).start()
    import selectors

    chunks = {out_r: [], err_r: []}
    deadline = time.monotonic() + timeout
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            ready = selector.select(max(0.0, deadline - time.monotonic()) if not timed_out else None)
            if not ready and not timed_out:
                timed_out = True
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                continue
            for key, _ in ready:
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    chunks[key.fd].append(chunk)
                else:
                    selector.unregister(key.fd)
                    os.close(key.fd)
    returncode = os.waitstatus_to_exitcode(_status(conn))
    conn.close()
    stdout, stderr = (b"".join(chunks[fd]) for fd in (out_r, err_r))
    if text:
        stdout, stderr = (b.decode(encoding).replace("\r\n", "\n").replace("\r", "\n") for b in (stdout, stderr))
    command = [sys.executable, "-m", "llmcli", *args]
    if timed_out:
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
    return subprocess.CompletedProcess(command, returncode, stdout, stderr)


def client(args):
    """`llm ARGS` for a shell: this process's stdin, stdout and stderr go to the run; exit as it did."""
    path = os.environ.get("LLM_TEST_ZYGOTE")
    started = _request(path, args, os.getcwd(), dict(os.environ), [0, 1, 2]) if path else None
    if started is None:
        os.execv(sys.executable, [sys.executable, "-m", "llmcli", *args])
    conn, pid = started

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forward)
    status = _status(conn)
    if os.WIFSIGNALED(status):  # die of the same signal, as a shell expects of the process it started
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__" and sys.argv[1] == "run":
    client(sys.argv[2:])
if __name__ == "__main__" and sys.argv[1] == "serve":
    sys.path.pop(0)  # this file's folder: not on the path of `python -m llmcli`
    _request_to_run = serve(sys.argv[2], int(sys.argv[3]))
    del serve, client, run, Server
    _become_fresh(_request_to_run)
    import runpy
    import types

    _server_module = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    # from here on as `python -m llmcli`, and ended as the interpreter ends it: only the teardown of every module
    # (0.7 s: it writes to, and so copies, every page the server imported) is skipped
    import threading

    signal_to_die_of = None
    try:
        runpy._run_module_as_main("llmcli")
        _code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            _code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            _code = 1
    except BaseException as e:
        sys.excepthook(type(e), e, e.__traceback__)
        _code = 1
        if isinstance(e, KeyboardInterrupt):  # the interpreter dies of the SIGINT, so its parent knows why
            signal_to_die_of = signal.SIGINT
    threading._shutdown()
    import atexit

    atexit._run_exitfuncs()
    for _stream in (sys.stdout, sys.stderr):
        try:
            _stream.flush()
        except Exception as e:  # as the interpreter's own last flush: said, and exit 120
            print(f"Exception ignored in: {_stream!r}\n{type(e).__name__}: {e}", file=sys.__stderr__)
            _code = 120
    if signal_to_die_of is not None:
        signal.signal(signal_to_die_of, signal.SIG_DFL)
        os.kill(os.getpid(), signal_to_die_of)
    os._exit(_code & 0xFF)
