"""Claiming an output folder: the checks before a run may write into it, the lock, and replacing an old run.

A folder is reused only to resume an unfinished run with the same settings, or, with
`--overwrite_output_dir`, to replace a run of esam-hf: exactly the paths its record's manifest lists, and only
those unchanged since the run wrote them. Anything else in the folder is named and the new run refused, before
anything is deleted (`claim_output_dir`, `OutputDirClaim`). The lock is a file created exclusively, so a second
run into the same folder is refused, not raced; one left by a killed run is taken over (`_take_lock`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time

from .record import (LOCK_NAME, PROG, RUN_RECORD, FolderInTheWay, RunFolder, in_the_way_message, read_record,
                     settings_differences)
from .resume import checkpoints, resolve_checkpoint


class OutputDirClaim:
    """This process's hold on an output folder: the lock file, and (`replace`) the old run that
    `--overwrite_output_dir` replaces, deleted only by `clear_old_run()` once the new run's data and model
    are built, so a mistake in the new command costs nothing."""

    def __init__(self, output_dir: str, replace: bool = False, created: list[str] | None = None):
        self.output_dir, self.replace = output_dir, replace
        self.lock = os.path.join(output_dir, LOCK_NAME)
        self.created = created or []  # the folders the claim made, innermost first

    def clear_old_run(self) -> None:
        """Delete the old run's files, checked again now: anything that is not the run's (added since the
        claim) refuses the deletion with FolderInTheWay, before anything is deleted."""
        if self.replace:
            _replaceable(self.output_dir, read_record(self.output_dir)).delete_run()
            self.replace = False

    def release(self) -> None:
        """Drop the lock; a folder the claim made that is still empty (the run failed before writing
        anything, e.g. on a data error) goes too, so a failed command leaves nothing behind."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock)
        for folder in self.created:
            try:
                os.rmdir(folder)  # only ever an empty folder
            except OSError:
                break


def _lock_owner(lock: str) -> tuple[str, int] | str | None:
    """(host, pid) written in the lock file; None when it is gone; else the unreadable text it holds."""
    text = ""
    for _ in range(20):  # a run that has just created the lock writes its owner a moment later
        try:
            with open(lock, errors="replace") as f:
                text = f.read(200)
        except FileNotFoundError:
            return None
        parts = text.split()
        if len(parts) == 2 and parts[1].isdigit():
            return parts[0], int(parts[1])
        time.sleep(0.05)
    return text


def _take_lock(output_dir: str) -> None:
    lock = os.path.join(output_dir, LOCK_NAME)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None:  # released meanwhile
                continue
            if isinstance(owner, str):
                raise ValueError(f"--output_dir {output_dir}: its lock file {lock} cannot be read (it holds {owner!r}, "
                                 "not the host and process id of the run using the folder), so whether a run is "
                                 f"using the folder is unknown. If none is, delete {lock} and start again; otherwise "
                                 "wait for it, or choose another --output_dir.") from None
            host, pid = owner
            if host == socket.gethostname() and not _alive(pid):
                os.unlink(lock)  # left by a run that was killed: take it over
                continue
            raise ValueError(f"--output_dir {output_dir} is in use by another run (process {pid} on {host}; lock file "
                             f"{lock}). Wait for it, or choose another --output_dir. If no such run exists, delete the "
                             "lock file.") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return
    raise ValueError(f"--output_dir {output_dir}: could not take the lock file {lock}; another run is starting there.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _replaceable(output_dir: str, record: dict | None) -> RunFolder:
    """The run in `output_dir` that `--overwrite_output_dir` may delete; FolderInTheWay naming what else the
    folder holds, or why no run of ours can be told apart in it."""
    names = sorted(n for n in os.listdir(output_dir) if n != LOCK_NAME) if os.path.isdir(output_dir) else []
    if record is None:
        if not names:
            return RunFolder(output_dir)
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise FolderInTheWay(f"--overwrite_output_dir replaces only a run of esam-hf, and {output_dir} holds no "
                             f"{RUN_RECORD}: it holds {shown}. Nothing was deleted. Choose another --output_dir, "
                             "or move those away.")
    if "manifest" not in record:
        raise FolderInTheWay(f"--overwrite_output_dir: the run in {output_dir} was written by an older esam-hf, which "
                             "did not list the files it wrote, so they cannot be told apart from yours. Nothing was "
                             "deleted. Delete the folder yourself, or choose another --output_dir.")
    folder = RunFolder(output_dir, record)
    in_the_way = folder.contents().in_the_way
    if in_the_way:
        raise FolderInTheWay(in_the_way_message(output_dir, in_the_way))
    return folder


def _stopped_before_first_step(output_dir: str, record: dict | None) -> bool:
    """A run that failed before its first optimizer step, and left nothing but its own files."""
    if (record is None or record.get("status") not in ("failed", "interrupted") or record.get("global_step") != 0
            or "manifest" not in record or checkpoints(output_dir)):
        return False
    return not RunFolder(output_dir, record).contents().in_the_way


def claim_output_dir(output_dir: str, settings: dict, *, resume: str | bool | None, overwrite: bool,
                     protected: list[str] = ()) -> OutputDirClaim:
    """Check that a run may write into `output_dir`, then lock it. A folder is reused only to resume an
    unfinished run with the same settings, or with `overwrite` to replace a run of ours (only its own,
    unchanged files; the working directory and a folder holding `protected` paths, the dataset, never).
    A run that failed before its first step is replaced without `overwrite`. Raises ValueError saying what
    is in the way, before anything is built or deleted."""
    existing = sorted(n for n in os.listdir(output_dir) if n != LOCK_NAME) if os.path.isdir(output_dir) else []
    replace = False
    if existing:
        record = read_record(output_dir)
        if overwrite:
            here = os.path.realpath(output_dir)
            inside = [p for p in [os.getcwd(), *protected] if p and os.path.realpath(p).startswith(here + os.sep) or
                      p and os.path.realpath(p) == here]
            if inside:
                raise ValueError(f"--overwrite_output_dir: {output_dir} holds {inside[0]} (the working directory or "
                                 "the dataset); choose another --output_dir.")
            _replaceable(output_dir, record)
            replace = True
        elif resume:
            if record is None:
                raise ValueError(f"--resume_from_checkpoint: {output_dir} has no {RUN_RECORD}, so what trained it is "
                                 "unknown; choose another --output_dir.")
            diffs = settings_differences(record["settings"], settings)
            if diffs:
                raise ValueError(f"--resume_from_checkpoint: {output_dir} was trained with other settings ("
                                 + "; ".join(diffs[:8]) + "). Resume with the same options, or pass "
                                 "--overwrite_output_dir to start over, or choose another --output_dir.")
            if record.get("status") == "finished":
                raise ValueError(f"--resume_from_checkpoint: the run in {output_dir} has finished; there is nothing to "
                                 "resume and its results stand. Train it again with --overwrite_output_dir, or choose "
                                 "another --output_dir.")
            if resume is True:
                resolve_checkpoint(output_dir, True)  # refuse now if nothing can be resumed
        elif _stopped_before_first_step(output_dir, record):
            how = {"failed": "failed", "interrupted": "was interrupted"}[record["status"]]
            error = f" ({record['error']})" if record.get("error") else ""
            print(f"{PROG}: replacing the run in {output_dir}: it {how} before its first training step{error}.",
                  file=sys.stderr)
            replace = True
        else:
            raise ValueError(_occupied_message(output_dir, record))
    created, folder = [], os.path.abspath(output_dir)
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(output_dir, exist_ok=True)
    _take_lock(output_dir)
    return OutputDirClaim(output_dir, replace, created)


def _occupied_message(output_dir: str, record: dict | None) -> str:
    if record is None:
        return (f"--output_dir {output_dir} already holds other files and no run of esam-hf. Choose another "
                "--output_dir.")
    what = f"{record.get('method', '')} run".strip()
    status = record.get("status")
    if status == "finished":
        top1 = (record.get("metrics") or {}).get("eval_accuracy")
        score = f" (top-1 {top1:.4f})" if isinstance(top1, float) else ""
        return (f"--output_dir {output_dir} already holds a finished {what}{score}. Replace it with "
                "--overwrite_output_dir, or choose another --output_dir.")
    if status in ("running", "failed", "interrupted") and not checkpoints(output_dir):
        return (f"--output_dir {output_dir} holds a {what} that stopped before its first checkpoint ({status}). "
                "Start over with --overwrite_output_dir, or choose another --output_dir.")
    return (f"--output_dir {output_dir} already holds a {status} {what}. Continue it with --resume_from_checkpoint "
            "last, replace it with --overwrite_output_dir, or choose another --output_dir.")
