"""The keeper: a tiny parent per engine that outlives the daemon and records how the engine ended.

Room: engine. This file is also a standalone program, run as
``python -I -S keeper.py --report-fd N --exits DIR --name ENGINE --tag TAG -- ARGV...``;
it imports nothing but the standard library's built-in modules (``-S`` skips site-packages, so
it costs a bare interpreter: see README "The keeper" for the measured figure).

Only a process's parent can read its exit status, and a daemon that was restarted is no longer its
engines' parent: without a keeper an adopted engine's death reads "status unknown", so a Metal
abort, an OOM kill and a clean exit look alike. The keeper, like a container monitor (conmon),
stays the engine's parent for the engine's whole life:

1. It forks the engine into a session of its own (``setsid``: the engine's pgid is its pid, so
   the daemon's ``killpg`` reaches the engine's tree and never the keeper), with the engine's tag
   added to the environment (the keeper itself carries no tag, so tag sweeps never pick it as the
   engine's root), and reports ``pid N`` (or ``error ERRNO MESSAGE`` when exec failed) on the
   report pipe.
2. It waits for the engine (``waitpid``), writes ``<exits>/<engine>.<pid>.json`` atomically
   (temporary file, fsync, rename, directory fsync) with the code or signal and the wall time,
   and exits. A keeper never outlives its engine.

It never signals the engine: stopping is the daemon's job. It ignores SIGTERM, SIGINT and SIGHUP
(a service manager that signals everything in a scope still reaches the engine, which it does
not hold back), so only SIGKILL ends it early; its engine then lives on and is adopted with its
status unknown, as before keepers existed.
"""

# The C module, not ``signal``: that one imports enum and would add a megabyte to every keeper.
import _signal as signal
import os
import sys
import time

REPORT_FD_FLAG = "--report-fd"
TAG_ENV = "SUPERVISORD_LLM_TAG"
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._/-")


def record_name(engine: str, pid: int) -> str:
    return f"{engine}.{pid}.json"


def _options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    split = argv.index("--")
    head, command = argv[:split], argv[split + 1:]
    return dict(zip(head[0::2], head[1::2], strict=False)), command


def _json_text(text: str) -> str:
    # Names and tags are validated by the daemon; anything else is replaced rather than escaped,
    # so the keeper needs no json module (re and friends would double its memory).
    return '"' + "".join(c if c in _SAFE else "_" for c in text) + '"'


def _write_record(exits_dir: str, engine: str, tag: str, pid: int, status: int | None) -> None:
    code = sig = "null"
    if status is not None and os.WIFSIGNALED(status):
        sig = str(os.WTERMSIG(status))
    elif status is not None and os.WIFEXITED(status):
        code = str(os.WEXITSTATUS(status))
    body = (f'{{"pid": {pid}, "tag": {_json_text(tag)}, "code": {code}, "signal": {sig}, '
            f'"at": {time.time():.3f}}}\n').encode()
    final = os.path.join(exits_dir, record_name(engine, pid))
    temporary = os.path.join(exits_dir, "." + record_name(engine, pid) + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(temporary, final)
    except OSError:
        os.unlink(temporary)
        raise
    dir_fd = os.open(exits_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _spawn(command: list[str], env: dict[str, str]) -> tuple[int, str | None]:
    """Fork and exec ``command`` in a new session; (pid, None), or (0, "ERRNO MESSAGE") if exec failed."""
    errors_r, errors_w = os.pipe()  # close-on-exec: EOF without data means the exec succeeded
    pid = os.fork()
    if pid == 0:
        try:
            os.close(errors_r)
            os.setsid()
            # Ignored dispositions survive exec: give the engine the defaults the keeper set aside.
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.execvpe(command[0], command, env)
        except BaseException as exc:  # noqa: BLE001 - the child must never return into the keeper
            errno = getattr(exc, "errno", None) or 0
            message = getattr(exc, "strerror", None) or str(exc)
            os.write(errors_w, f"{errno} {message}".encode(errors="replace"))
        finally:
            os._exit(127)
    os.close(errors_w)
    chunks = []
    while chunk := os.read(errors_r, 4096):
        chunks.append(chunk)
    os.close(errors_r)
    if chunks:
        os.waitpid(pid, 0)
        return 0, b"".join(chunks).decode(errors="replace")
    return pid, None


def main(argv: list[str]) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    options, command = _options(argv)
    report_fd = int(options[REPORT_FD_FLAG])
    os.set_inheritable(report_fd, False)  # the engine must not hold the daemon's pipe open
    exits_dir, engine, tag = options["--exits"], options["--name"], options["--tag"]
    env = dict(os.environ)
    env[TAG_ENV] = tag
    pid, error = _spawn(command, env)
    os.write(report_fd, (f"error {error}\n" if error is not None else f"pid {pid}\n").encode())
    os.close(report_fd)
    if error is not None:
        return 127
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = None
            break
    try:
        _write_record(exits_dir, engine, tag, pid, status)
    except OSError as exc:
        # The engine's log is the keeper's stderr: say there why the daemon will read "unknown".
        os.write(2, f"supervisord-llm keeper: cannot record the exit of pid {pid}: {exc}\n".encode())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
