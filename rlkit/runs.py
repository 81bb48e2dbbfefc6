"""What every training command does around its loop so that no run costs the user work.

- The output directory is checked up front (a file, an unwritable path or a parent that is a file is a
  one-line error) and locked (``.rlkit.lock``, an ``flock`` the OS drops when the process dies, even on
  SIGKILL), so two runs cannot write into one directory.
- ``rlkit_run.json`` records the config a run started with. Resuming with a config that differs in
  anything that changes the result (see :data:`rlkit.config.RESULT_NEUTRAL`; ``train.max_steps`` and
  ``train.epochs`` may change to extend a run) is refused with the differences listed, unless the user
  says ``--resume-anyway`` (continue with the new settings) or ``--overwrite`` (discard the checkpoints and
  start over).
- SIGTERM and SIGINT stop a run at the end of the current step, after a checkpoint of that step is saved;
  a second signal stops at once (the last checkpoint is kept either way). The run then exits with one line
  and 143 (SIGTERM) or 130 (SIGINT).
- A worker of ``accelerate launch`` / ``torchrun`` whose launcher dies (SIGKILL, the OOM killer) stops the
  same way: torchrun starts each worker in a session of its own, so killing the launcher's process group
  leaves the workers running, holding the lock. :class:`LauncherWatch` notices the launcher is gone
  (the worker's parent changes) within a second and sends the worker SIGTERM; if the run has not stopped
  ``LAUNCHER_GRACE_S`` seconds later (30 s, or ``RLKIT_LAUNCHER_GRACE_S``; a long step, or a collective
  waiting on a peer that is gone), SIGTERM again (stop at once), and after as long again the process exits. The lock goes with it; the same command resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from rlkit.errors import RlkitError, RunInterrupted

if TYPE_CHECKING:  # the config (and the algos its schema names, with torch) loads when a command runs
    from rlkit.config import RunConfig

RESUME_MODES = ("auto", "anyway", "overwrite")
RUN_FILE = "rlkit_run.json"
LOCK_FILE = ".rlkit.lock"


class OutputError(RlkitError):
    """An output directory that cannot be used."""


def is_main_process() -> bool:
    """Rank 0 of a launch (accelerate/torchrun set RANK), or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


# What a run writes at the top of its output directory (a model card, weights, tokenizer, logs): a directory
# that holds any of them and was not written by rlkit is someone else's.
RUN_OUTPUTS = ("README.md", "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "generation_config.json", "chat_template.jinja", "metrics.jsonl",
               "training.png", "data.jsonl", "report.json", "manifest.json")


RLKIT_MARKERS = (LOCK_FILE, RUN_FILE, "rlkit_result.json")  # any of them: a directory rlkit wrote (or a copy of one)


def check_foreign_dir(out: Path, markers: tuple[str, ...] = RLKIT_MARKERS, what: str = "--output-dir") -> None:
    """Refuse an existing directory that rlkit did not write (no ``markers`` in it) when it is the current
    directory or one above it (``--output-dir .``, ``..``, or an unset variable's ``""``) and holds anything,
    or when it holds files a run would overwrite (its README.md, config.json, ...)."""
    if not out.is_dir() or any((out / m).exists() for m in markers):
        return
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    here = Path.cwd().resolve()
    resolved = out.resolve()
    clobbered = [n for n in RUN_OUTPUTS if n in names]
    if resolved == here or resolved in here.parents or resolved == Path.home().resolve():
        shown = ", ".join((clobbered or names)[:3]) + (" ..." if len(clobbered or names) > 3 else "")
        raise OutputError(f"{out}: refusing to write a run into {resolved} (the current directory, or one above it or "
                          f"home): it holds files rlkit did not write ({shown}); give a new or empty {what}")
    if clobbered:
        raise OutputError(f"{out}: holds {', '.join(clobbered[:3])} that rlkit did not write (no {' or '.join(markers)} "
                          f"there); a run would overwrite them: give a new or empty {what}")


def prepare_output_dir(out: Path, markers: tuple[str, ...] = RLKIT_MARKERS) -> None:
    """Create ``out`` or fail with one line saying why (a file in the way, no permission, a directory of
    someone else's files, ...)."""
    check_foreign_dir(out, markers)
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "the output directory" if parent == out else f"its parent {parent}"
                raise OutputError(f"{out}: cannot use it as the output directory: {what} is a file")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    probe = out / f".rlkit-write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{out}: the output directory is not writable ({e.strerror or e})") from None


def check_output_file(path: Path, flag: str) -> None:
    """A file the command will write at the end (``rlkit eval --output``): checked before the work, so that a
    directory, a parent that is a file or an unwritable place fails in one line, not after the work is done."""
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory; give a file name, e.g. {path / 'report.json'}")
    parent = path.parent
    for p in [parent, *parent.parents]:
        if p.exists():
            if not p.is_dir():
                raise OutputError(f"{flag} {path}: cannot write it: {p} is a file")
            if not os.access(p, os.W_OK | os.X_OK):
                raise OutputError(f"{flag} {path}: cannot write it: {p} is not writable")
            break
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{flag} {path}: the file is not writable")


class RunLock:
    """An exclusive ``flock`` on ``OUTPUT/.rlkit.lock`` for the life of the run."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"{self.path.parent}: another rlkit run is writing to this directory ({holder}); "
                              "wait for it to finish or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:300]}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def clear_run(out: Path) -> None:
    """``--overwrite``: forget the previous run in ``out`` (checkpoints, metrics, run record)."""
    for p in out.iterdir():
        if p.name.startswith("checkpoint-") or p.name in ("runs", "metrics.jsonl", RUN_FILE, "rlkit_result.json"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_resume(out: Path, cfg: RunConfig, resuming: bool, mode: str) -> None:
    """Refuse to resume with a config that changes the result, unless ``mode`` says otherwise; record the
    config a fresh run starts with."""
    from rlkit.config import result_differences, upgrade_dump

    record = out / RUN_FILE
    new = cfg.model_dump(mode="json")
    if resuming and record.is_file():
        try:
            old = upgrade_dump(json.loads(record.read_text())["config"], source=str(record))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            old = None
        if old is None and mode == "auto":  # cannot tell whether the config changed: ask, as for a change
            raise OutputError(f"{record}: unreadable, so whether this config matches the run there is unknown; add "
                              "--resume-anyway to resume it with this config, or --overwrite to start over")
        diffs = result_differences(old, new) if old is not None else []
        if not diffs and old is not None:
            return
        shown = [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs]
        if mode == "auto":
            more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
            raise OutputError(
                f"{out}: the run there was started with a different config ({'; '.join(shown[:4])}{more}); run "
                "the original command to resume it, add --resume-anyway to resume with the new settings, or "
                "--overwrite to start over")
        print(f"resuming with a changed config (--resume-anyway): {'; '.join(shown)}" if old is not None else
              f"resuming (--resume-anyway) with this config: {record.name} was unreadable", flush=True)
    write_run_record(out, cfg)


def write_run_record(out: Path, cfg: RunConfig) -> None:
    """``OUTPUT/rlkit_run.json``: the config the run there was made with (written to a temporary name, renamed)."""
    record = out / RUN_FILE
    tmp = record.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"config": cfg.model_dump(mode="json")}, indent=2) + "\n")
    tmp.replace(record)


LAUNCHER_GRACE_S = float(os.environ.get("RLKIT_LAUNCHER_GRACE_S", "30"))


def launched_worker() -> bool:
    """A worker process started by torchrun (what ``accelerate launch`` runs for several processes)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class LauncherWatch:
    """Stop this worker when its launcher dies: a daemon thread polls ``os.getppid()`` (a dead parent's
    children are re-parented), then SIGTERMs this process (finish the step, save, exit), SIGTERMs it again
    after ``grace`` seconds (stop at once) and ends it after ``grace`` more (a thread blocked in C)."""

    def __init__(self, grace: float = LAUNCHER_GRACE_S, poll: float = 0.5):
        self.parent = os.getppid()
        self.grace, self.poll = grace, poll
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rlkit launcher watch", daemon=True)

    def start(self) -> LauncherWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(self.poll):
            if os.getppid() != self.parent:
                break
        else:
            return
        print(f"\nthe launcher (pid {self.parent}) is gone: stopping as on SIGTERM (finishing this step and saving "
              "a checkpoint)", file=sys.stderr, flush=True)
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
            if self._done.wait(self.grace):
                return
        print("the launcher is gone and the run did not stop: exiting; the last checkpoint is kept",
              file=sys.stderr, flush=True)
        os._exit(143)


class GracefulStop:
    """SIGTERM/SIGINT → ``requested`` is set and the loop stops after saving the current step; a second
    signal raises KeyboardInterrupt at once. Handlers are installed on the main thread only. A worker of
    torchrun also watches its launcher (:class:`LauncherWatch`)."""

    def __init__(self):
        self.requested: int | None = None
        self._old: dict[int, object] = {}
        self._watch: LauncherWatch | None = None

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(send it again to stop now)", file=sys.stderr, flush=True)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
            if launched_worker():
                self._watch = LauncherWatch().start()
        return self

    def __exit__(self, *exc) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def interrupted(self, what: str) -> RunInterrupted:
        """The exception that ends the run once a stop was requested; ``what`` says what was saved."""
        name = signal.Signals(self.requested).name if self.requested else "a signal"
        code = 128 + int(self.requested or signal.SIGINT)
        return RunInterrupted(f"stopped by {name}; {what}; run the same command to resume", exit_code=code)


@contextlib.contextmanager
def guarded_run(cfg: RunConfig, resume: str, has_checkpoint):
    """Around a training run: check and lock the output directory, apply ``resume`` (auto | anyway |
    overwrite), record the config, and catch SIGTERM/SIGINT. ``has_checkpoint(out) -> bool``.
    Yields the :class:`GracefulStop`. Only the main process of a launch touches the directory."""
    if resume not in RESUME_MODES:
        raise RlkitError(f"resume: unknown mode {resume!r}; expected one of {', '.join(RESUME_MODES)}")
    out = Path(cfg.output_dir)
    with locked_output(out):
        if is_main_process():
            if resume == "overwrite":
                clear_run(out)
            check_resume(out, cfg, bool(has_checkpoint(out)), resume)
        with GracefulStop() as stop:
            yield stop


@contextlib.contextmanager
def locked_output(out: Path):
    """The output directory, checked, created and locked for the duration (main process of a launch)."""
    lock = RunLock(out)
    created = not out.exists()
    if is_main_process():
        prepare_output_dir(out)
        lock.acquire()
    failed = True
    try:
        yield out
        failed = False
    finally:
        lock.release()
        if failed and created and is_main_process():  # failed before writing anything: leave no empty dir
            _remove_if_bare(out)


def _remove_if_bare(out: Path) -> None:
    if {p.name for p in out.iterdir()} <= {LOCK_FILE, RUN_FILE}:
        shutil.rmtree(out, ignore_errors=True)
