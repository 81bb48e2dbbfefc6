"""Run model-written Python in a throw-away sandbox: a separate process, limited, isolated as far as Linux allows.

    result = run_python("print(1 + 1)", timeout=5.0)
    result.ok, result.stdout        # True, "2\\n"

Each run is a fresh ``python -I -S -`` process (isolated mode: no ``PYTHON*`` variables, no user or site
packages; the standard library only; the program on stdin) in its own temporary directory, which is deleted
afterwards, with:

- **resource limits** (``setrlimit``): CPU seconds, address space (memory), the size of any file it writes,
  open files, no core dumps, and (as ``nobody``) 64 processes;
- **a new session**: the wall-clock limit kills the whole process group (children and grandchildren too);
- **an empty environment** but ``PATH``, ``HOME`` (its directory) and ``LANG``: no inherited secrets (tokens,
  keys);
- **as root** (as CI runs): a private mount namespace whose ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are fresh
  tmpfs mounts discarded at exit (the script runs in the new ``/tmp``), no network (a new network namespace),
  then it drops to an unprivileged user (``nobody``) with no supplementary groups. The only places ``nobody``
  may write are those tmpfs mounts, so nothing it writes outlives it and the trainer's files cannot be
  touched;
- **not root**: the limits, the session and the environment as above, plus no network where unprivileged user
  namespaces are allowed; the process runs as the trainer's user and could write wherever that user can
  (``protections`` in the result says what applied).

What it does not protect against: a process that leaves its session (``setsid`` after a fork) outlives the
wall-clock kill, until its CPU seconds run out; reading files that ``nobody`` (or, not as root, the trainer's user) may read
(``/etc/passwd``, world-readable data); CPU and memory of the machine up to the limits; kernel exploits. Run
untrusted code on a machine you do not mind it reading.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from rlkit.errors import RlkitError

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x10000000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
NOBODY = 65534
_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")


class SandboxError(RlkitError):
    """The sandbox cannot run here (no Python that its unprivileged user may run)."""


@dataclass
class SandboxResult:
    returncode: int | None          # None: killed at the wall-clock limit
    stdout: str
    stderr: str
    timed_out: bool
    protections: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
    return _libc().unshare(flags) == 0


def _isolate_as_root() -> list[str]:
    """In the child, before exec (root): private mounts with fresh scratch tmpfs (it runs in the new /tmp), no
    network, then nobody."""
    done = []
    libc = _libc()
    if _unshare(CLONE_NEWNS | CLONE_NEWNET):
        done.append("no network")
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0:
            for d in _SCRATCH:
                if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=64m,mode=1777") == 0:
                    done.append(f"private {d}")
    if "private /tmp" in done:  # the parent's run directory is hidden now: it runs in the new /tmp
        os.makedirs("/tmp/run", mode=0o700)
        os.chown("/tmp/run", NOBODY, NOBODY)
        os.chdir("/tmp/run")
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    done.append("user nobody")
    return done


def _limits(cpu_s: int, memory_mb: int, file_mb: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _world_usable(path: str) -> bool:
    """Whether ``nobody`` can run ``path``: the file and every directory above it are world-executable."""
    path = os.path.realpath(path)
    parts = [path] + [os.path.dirname(path)]
    while parts[-1] != "/":
        parts.append(os.path.dirname(parts[-1]))
    return all(os.stat(p).st_mode & 0o001 for p in parts)


def interpreter(root: bool) -> str:
    """The Python the sandbox runs: this one; as root (the child becomes ``nobody``) one that ``nobody`` can
    run (a pyenv under /root is not), such as the system's /usr/bin/python3. The standard library is all a
    sandboxed script gets (``-I -S``)."""
    if not root:
        return sys.executable
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if candidate and os.path.exists(candidate) and _world_usable(candidate):
            return candidate
    raise SandboxError("the code sandbox runs as user nobody and found no Python it can run (this one lives where "
                       "nobody cannot read); install python3 under /usr/bin")


def run_python(code: str, *, timeout: float = 5.0, cpu_s: int | None = None, memory_mb: int = 512,
               file_mb: int = 16) -> SandboxResult:
    """Run ``code`` as a script in a sandbox (see the module docstring); ``timeout``: wall seconds for the whole
    process group; ``cpu_s``: CPU seconds (default: the timeout, rounded up)."""
    cpu = cpu_s or max(1, int(timeout + 0.999))
    root = os.geteuid() == 0
    workdir = tempfile.mkdtemp(prefix="rlkit-sandbox-")
    if root:
        os.chown(workdir, NOBODY, NOBODY)
    report = os.pipe()  # the child says which protections it got

    def preexec() -> None:
        os.close(report[0])
        done = ["rlimits", "new session", "empty environment"]
        if root:
            done += _isolate_as_root()
        elif _unshare(CLONE_NEWUSER | CLONE_NEWNET):
            done.append("no network")
        _limits(cpu, memory_mb, file_mb)
        if root:  # nobody's processes, all of them: a fork bomb stops at this many
            resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
        os.write(report[1], ",".join(done).encode())
        os.close(report[1])

    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
    try:
        # the program comes on stdin, so it is not a file the code could read back
        proc = subprocess.Popen([interpreter(root), "-I", "-S", "-"], cwd=workdir, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=preexec, pass_fds=(report[1],), close_fds=True)
        os.close(report[1])
        timed_out = False
        try:
            out, err = proc.communicate(code.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        with os.fdopen(report[0], "rb") as r:
            protections = r.read().decode().split(",")
        return SandboxResult(None if timed_out else proc.returncode, out.decode(errors="replace")[-4000:],
                             err.decode(errors="replace")[-4000:], timed_out, [p for p in protections if p])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
