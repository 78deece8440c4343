"""The run record, `esam_run.json`, and its manifest: every path the run wrote, with its type and a fingerprint.

The record holds the settings that determine the result, the method, the status (running, finished, failed,
interrupted or diverged) and the manifest. It is written atomically as the run goes: before a write whose
outcome is unknown (a checkpoint, the final save, the card) it names the folder being written, and after it
the paths written, so a run killed at any moment leaves a record that accounts for every file it wrote
(`RunFolder`, `RunFolderCallback`, `write_json`). `RunFolder.delete_run` deletes exactly the manifest's paths,
unchanged, and `RunFolder.contents` names anything else in the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

RUN_RECORD = "esam_run.json"
LOCK_NAME = ".esam_run.lock"
PROG = "esam-hf train"
# Files below this size are fingerprinted by their sha256. Larger ones (weights, optimizer state) by size and
# modification time: hashing gigabytes at every checkpoint would cost minutes, and any write changes one of them.
HASHED_SIZE = 1 << 20
# A write of ours goes to `<file>.tmp-<pid>` first; safetensors writes to a tempfile-crate name (".tmp" and six
# characters) beside the file. A run killed mid-write leaves them behind.
_OUR_TEMP = re.compile(r"\.tmp-\d+$")
_WRITER_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
_RECORD_TEMP = re.compile(re.escape(RUN_RECORD) + r"\.tmp-\d+$")
_TOP = "."  # the scope of the final save: the files directly in the output folder


class FolderInTheWay(ValueError):
    """The output folder holds something that is not the run's: nothing was deleted."""


# --------------------------------------------------------------------------- #
# JSON files, written atomically
# --------------------------------------------------------------------------- #
def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json(path: str, content: Any) -> None:
    """Write JSON atomically: a kill mid-write leaves the previous file, never a truncated one. A file in the
    folder of a run in progress (`RunFolder.open`) goes into the run's manifest."""
    data = json.dumps(content, indent=2, default=str).encode()
    folder = _OPEN.get(os.path.realpath(os.path.dirname(os.path.abspath(path))))
    if folder is not None:
        folder.write_file(path, data)
    else:
        _atomic_write(path, data)


# --------------------------------------------------------------------------- #
# The record
# --------------------------------------------------------------------------- #
def read_record(output_dir: str) -> dict | None:
    """The run record of `output_dir`, or None if it has none. Raises ValueError, naming the file and what to
    do, for a record that is damaged or not one of ours."""
    path = os.path.join(output_dir, RUN_RECORD)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        problem = f"is not readable JSON ({e})"
    else:
        problem = _record_problem(record)
    if problem:
        raise ValueError(f"{path} {problem}: it is damaged or not the run record of esam-hf, so what trained "
                         f"{output_dir} and which of its files a run wrote are unknown; nothing was changed. Move "
                         f"away what you want to keep and delete {output_dir}, or choose another --output_dir.")
    return record


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"holds a JSON {type(record).__name__}, not a run record"
    if not isinstance(record.get("settings"), dict):
        return "has no 'settings'"
    if not isinstance(record.get("status"), str):
        return "has no 'status'"
    manifest, writing = record.get("manifest", {}), record.get("writing", [])
    if not (isinstance(manifest, dict) and all(isinstance(e, dict) and "type" in e for e in manifest.values())):
        return "has a damaged 'manifest'"
    if not (isinstance(writing, list) and all(isinstance(s, dict) and "folder" in s for s in writing)):
        return "has a damaged 'writing'"
    return None


def settings_differences(recorded: dict, settings: dict) -> list[str]:
    """`section.name: recorded -> now` for every setting that differs."""
    diffs = []
    for section in sorted(set(recorded) | set(settings)):
        old, new = recorded.get(section), settings.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            diffs += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                      if old.get(k) != new.get(k)]
        elif old != new:
            diffs.append(f"{section}: {old!r} -> {new!r}")
    return diffs


# --------------------------------------------------------------------------- #
# Fingerprints: is a path still what the run wrote?
# --------------------------------------------------------------------------- #
def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "folder"
    return "file" if stat.S_ISREG(mode) else "special file"


def _sha256(path: str, limit: int | None = None) -> str:
    digest, left = hashlib.sha256(), limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            digest.update(chunk)
            left = None if left is None else left - len(chunk)
    return digest.hexdigest()


def _fingerprint(path: str, appends: bool = False) -> dict[str, Any]:
    st = os.lstat(path)
    kind = _kind(st.st_mode)
    if kind != "file":
        return {"type": kind}
    if appends:  # a log its writer appends to after we record it: what we saw must stay its beginning
        return {"type": kind, "appends": True, "size": st.st_size, "sha256": _sha256(path, st.st_size)}
    if st.st_size < HASHED_SIZE:
        return {"type": kind, "sha256": [_sha256(path)]}
    return {"type": kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _difference(path: str, entry: dict) -> str | None:
    """Why `path` is no longer what the run wrote (`entry`), or None."""
    st = os.lstat(path)
    kind = _kind(st.st_mode)
    if kind != entry["type"]:
        return f"now a {kind}, where the run wrote a {entry['type']}"
    if kind != "file" or entry.get("temp"):
        return None
    if entry.get("appends"):
        same = st.st_size >= entry["size"] and _sha256(path, entry["size"]) == entry["sha256"]
    elif "sha256" in entry:
        same = _sha256(path) in entry["sha256"]
    else:
        same = (st.st_size, st.st_mtime_ns) == (entry["size"], entry["mtime_ns"])
    return None if same else "changed since the run wrote it"


def _stat_key(st: os.stat_result) -> tuple:
    return st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino


def _under(rel: str, folder: str) -> bool:
    return rel == folder or rel.startswith(folder + "/")


@dataclass
class Contents:
    """What an output folder holds, by relative path: the run's own (`ours`), and the rest with why it is
    not the run's (`in_the_way`; a folder that is not the run's is named whole, never entered)."""

    ours: list[str] = field(default_factory=list)
    in_the_way: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- #
# The folder of one run
# --------------------------------------------------------------------------- #
_OPEN: dict[str, RunFolder] = {}  # real path -> the run folder this process is writing


class RunFolder:
    """One output folder and its run record, as the run in this process keeps it.

    `manifest` maps each path the run wrote (relative, "/"-separated) to its fingerprint. `writing` lists the
    folders a writer is filling right now (a checkpoint, a logger's folder, or "." for the files of the final
    save, with the paths that were there before): a run killed mid-write leaves them in the record, so what
    the write left is known to be the run's. Only the process that writes (`writer=True`, the main process
    under DDP) changes anything on disk."""

    def __init__(self, output_dir: str, record: dict | None = None, writer: bool = True):
        self.output_dir, self.writer = output_dir, writer
        self.record = record if record is not None else {}
        self.manifest: dict[str, dict] = self.record.setdefault("manifest", {})
        self.writing: list[dict] = self.record.setdefault("writing", [])
        self.foreign: set[str] = set()  # what was in the way when the run began: never recorded as the run's
        self._snapshots: dict[str, dict[str, tuple]] = {}

    @classmethod
    def open(cls, output_dir: str, writer: bool = True) -> RunFolder:
        """The folder as a run starts writing to it (a new run, or one that resumes): the files a killed run
        was writing join its manifest, and the temporary files it left are deleted. Until `close()`,
        `write_json` into the folder records what it writes."""
        folder = cls(output_dir, read_record(output_dir), writer)
        if writer:
            os.makedirs(output_dir, exist_ok=True)
            folder._adopt_interrupted_writes()
            folder.foreign = {rel for rel, _ in folder.contents().in_the_way}
            _OPEN[os.path.realpath(output_dir)] = folder
        return folder

    def close(self) -> None:
        if _OPEN.get(os.path.realpath(self.output_dir)) is self:
            del _OPEN[os.path.realpath(self.output_dir)]

    # -- paths -------------------------------------------------------------- #
    def path(self, rel: str) -> str:
        return self.output_dir if rel == _TOP else os.path.join(self.output_dir, *rel.split("/"))

    def rel(self, path: str | None) -> str | None:
        """`path` relative to the folder ("/"-separated), or None when it is not inside it."""
        if not path:
            return None
        root, target = os.path.realpath(self.output_dir), os.path.abspath(path)
        target = os.path.join(os.path.realpath(os.path.dirname(target)), os.path.basename(target))
        if not target.startswith(root + os.sep):
            return None
        return os.path.relpath(target, root).replace(os.sep, "/")

    def _is_foreign(self, rel: str) -> bool:
        return any(_under(rel, other) for other in self.foreign)

    # -- the record --------------------------------------------------------- #
    def save(self) -> None:
        if self.writer:
            data = json.dumps(self.record, indent=2, default=str).encode()
            _atomic_write(os.path.join(self.output_dir, RUN_RECORD), data)

    def write_file(self, path: str, data: bytes) -> None:
        """Write `data` to `path` atomically and record it. The record first accepts both the old and the new
        content (and names the temporary file), so a kill between the two writes leaves a consistent pair."""
        rel = self.rel(path)
        if not self.writer or rel is None or rel == RUN_RECORD:
            return _atomic_write(path, data)
        temp = f"{rel}.tmp-{os.getpid()}"
        entry = self.manifest.get(rel, {})
        # Hashed whatever its size: the content is in memory, and it may be rewritten many times.
        before = entry.get("sha256") if entry.get("type") == "file" else None
        before = before if isinstance(before, list) else []
        new = hashlib.sha256(data).hexdigest()
        self.manifest[rel] = {"type": "file", "sha256": [*before, new]}
        self.manifest[temp] = {"type": "file", "temp": True}
        self._add_parents(rel)
        self.save()
        _atomic_write(path, data)
        del self.manifest[temp]
        self.manifest[rel] = {"type": "file", "sha256": [new]}  # saved with the record's next write

    def add(self, rel: str, appends: bool = False) -> None:
        """Add `rel` (a file or folder the run wrote) and the folders above it to the manifest."""
        path = self.path(rel)
        if not os.path.lexists(path) or os.path.islink(path):  # a link is never written by a run of ours
            return
        self.manifest[rel] = _fingerprint(path, appends)
        self._add_parents(rel)

    def _add_parents(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self.manifest and not self._is_foreign(parent):
                self.manifest[parent] = {"type": "folder"}

    def add_tree(self, rel: str, appends: bool = False, skip: set[str] = frozenset()) -> None:
        """Record the folder `rel` and everything in it that is neither foreign nor in `skip`."""
        if self._is_foreign(rel) or rel in skip or not os.path.isdir(self.path(rel)) or os.path.islink(self.path(rel)):
            return
        self.add(rel)
        with os.scandir(self.path(rel)) as entries:
            for entry in entries:
                child = f"{rel}/{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    self.add_tree(child, appends, skip)
                elif not self._is_foreign(child) and child not in skip:
                    self.add(child, appends)

    def forget_missing(self) -> None:
        """Drop what no longer exists (checkpoints the Trainer rotated away)."""
        for rel in [rel for rel in self.manifest if not os.path.lexists(self.path(rel))]:
            del self.manifest[rel]

    # -- writes whose outcome is unknown until they end --------------------- #
    def begin(self, rel: str) -> None:
        """A writer starts filling `rel` (a folder, or "." for files directly in the output folder)."""
        if not self.writer:
            return
        if rel == _TOP:
            names = [n for n in os.listdir(self.output_dir) if n not in (RUN_RECORD, LOCK_NAME)]
            self._snapshots[rel] = {n: _stat_key(os.lstat(self.path(n))) for n in names}
            existing = sorted(n for n in names if n not in self.manifest)
        else:
            existing = sorted(p for p in self.foreign if _under(p, rel))
        self.writing[:] = [s for s in self.writing if s["folder"] != rel] + [{"folder": rel, "existing": existing}]
        self.save()

    def end(self, rel: str, appends: bool = False) -> None:
        """The writer of `rel` is done: record what it wrote (`appends`: logs it may still append to)."""
        if not self.writer:
            return
        scope = next((s for s in self.writing if s["folder"] == rel), None)
        if rel == _TOP:
            before = self._snapshots.pop(rel, {})
            for name in sorted(os.listdir(self.output_dir)):
                st = os.lstat(self.path(name))
                if name in (RUN_RECORD, LOCK_NAME) or not stat.S_ISREG(st.st_mode):
                    continue
                if before.get(name) != _stat_key(st):  # new, or rewritten by the writer
                    self.add(name)
        else:
            self.add_tree(rel, appends, skip=set(scope["existing"]) if scope else set())
        self.writing[:] = [s for s in self.writing if s["folder"] != rel]
        self.save()

    @contextlib.contextmanager
    def writing_to(self, rel: str = _TOP):
        """`with folder.writing_to("."):` around a writer that is not ours (the Trainer's save, the card)."""
        self.begin(rel)
        try:
            yield
        finally:
            self.end(rel)

    def _in_interrupted_write(self, rel: str, kind: str) -> bool:
        for scope in self.writing:
            if scope["folder"] == _TOP:
                inside = "/" not in rel and kind == "file"
            else:
                inside = _under(rel, scope["folder"]) and kind in ("file", "folder")
            if inside and not any(_under(rel, e) for e in scope["existing"]):
                return True
        return False

    def _adopt_interrupted_writes(self) -> None:
        """What a killed run was writing is the run's: record it, and delete the temporary files among it,
        the run's own temporary files and its record's."""
        for rel, entry in list(self.manifest.items()):
            if entry.get("temp"):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(self.path(rel))
                del self.manifest[rel]
        for name in os.listdir(self.output_dir):
            if _RECORD_TEMP.fullmatch(name) and os.path.isfile(self.path(name)):
                os.unlink(self.path(name))
        if not self.writing:
            return
        for rel in self.contents().ours:
            kind = _kind(os.lstat(self.path(rel)).st_mode)
            if not self._in_interrupted_write(rel, kind):
                continue
            name = rel.rsplit("/", 1)[-1]
            if kind == "file" and (_WRITER_TEMP.match(name) or _OUR_TEMP.search(name)):
                os.unlink(self.path(rel))
            else:
                self.add(rel)
        self.writing.clear()
        self.save()

    # -- what the folder holds ---------------------------------------------- #
    def contents(self) -> Contents:
        """Every path in the folder, the run's or in the way (the lock file is neither)."""
        found = Contents()

        def visit(rel_dir: str) -> None:
            with os.scandir(self.path(rel_dir)) as scan:
                entries = sorted(scan, key=lambda e: e.name)
            for entry in entries:
                rel = entry.name if rel_dir == _TOP else f"{rel_dir}/{entry.name}"
                if rel == LOCK_NAME:
                    continue
                why = self._why_not_ours(rel)
                if why is not None:
                    found.in_the_way.append((rel, why))
                    continue
                found.ours.append(rel)
                if entry.is_dir(follow_symlinks=False):
                    visit(rel)

        if os.path.isdir(self.output_dir):
            visit(_TOP)
        return found

    def _why_not_ours(self, rel: str) -> str | None:
        kind = _kind(os.lstat(self.path(rel)).st_mode)
        if (rel == RUN_RECORD or _RECORD_TEMP.fullmatch(rel)) and kind == "file":
            return None
        if self._in_interrupted_write(rel, kind):
            return None
        entry = self.manifest.get(rel)
        if entry is None:
            return "not written by the run"
        return _difference(self.path(rel), entry)

    def delete_run(self) -> None:
        """Delete the run's paths, after checking that nothing else is in the folder (else FolderInTheWay,
        with nothing deleted). Folders are removed bottom-up and only once empty, never with what they hold;
        links are unlinked, never followed; the record goes last, so a kill midway leaves it naming the rest."""
        found = self.contents()
        if found.in_the_way:
            raise FolderInTheWay(in_the_way_message(self.output_dir, found.in_the_way))
        folders = [rel for rel in found.ours if os.path.isdir(self.path(rel)) and not os.path.islink(self.path(rel))]
        for rel in found.ours:
            if rel not in folders and rel != RUN_RECORD:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(rel))
        for rel in sorted(folders, key=lambda r: r.count("/"), reverse=True):
            try:
                os.rmdir(self.path(rel))
            except OSError:  # something appeared in it since the check: it stays, and so does the record
                raise FolderInTheWay(f"--overwrite_output_dir: {self.path(rel)} gained files while the old run was "
                                     "being deleted; they were kept. Move them away and start again.") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(RUN_RECORD))
        self.manifest.clear()
        self.writing.clear()


def in_the_way_message(output_dir: str, in_the_way: list[tuple[str, str]]) -> str:
    by_reason: dict[str, list[str]] = {}
    for rel, why in in_the_way:
        by_reason.setdefault(why, []).append(rel)
    parts = []
    for why, paths in by_reason.items():
        shown = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
        parts.append(f"{shown} ({why})")
    return (f"--overwrite_output_dir deletes only what the run in {output_dir} wrote, unchanged, and the folder also "
            f"holds {'; '.join(parts)}. Nothing was deleted. Move those away, or choose another --output_dir.")


class RunFolderCallback(TrainerCallback):
    """Keeps the run's manifest while the Trainer writes: each checkpoint is named in the record before it is
    written (so a kill mid-save leaves a folder the record accounts for) and recorded once saved; checkpoints
    rotated away are dropped; the folders of the logging integrations (TensorBoard's `runs/...`) inside the
    output folder are recorded as they grow."""

    def __init__(self, folder: RunFolder, callbacks: list = ()):
        self.folder, self.callbacks, self.log_dirs = folder, callbacks, []

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            # The loggers ahead of this callback have made their folders by now.
            found = {self.folder.rel(getattr(cb, "logging_dir", None)) for cb in self.callbacks}
            self.log_dirs = sorted(rel for rel in found - {None} if not self.folder._is_foreign(rel))
            for rel in self.log_dirs:
                self.folder.begin(rel)

    def _before_save(self, args, state, control):
        if control.should_save:
            # The checkpoint's log history then covers every step up to it, as finishing a run from its last
            # checkpoint needs (its train loss is the mean over all steps).
            control.should_log = True
        may_save = control.should_save or (args.save_strategy == "best" and control.should_evaluate)
        if state.is_world_process_zero and may_save:
            self.folder.begin(f"checkpoint-{state.global_step}")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        self._before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.folder.end(f"checkpoint-{state.global_step}")
            self.sync()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.sync()

    def sync(self) -> None:
        """Record the loggers' folders as they are now, and forget rotated checkpoints."""
        if self.folder.writer:
            for rel in self.log_dirs:
                self.folder.add_tree(rel, appends=True)
            self.folder.forget_missing()
            self.folder.save()

    def finish(self) -> None:
        """The run is done with its loggers' folders (a logger may still flush what it holds when the process
        exits: the files are recorded as logs, whose recorded content must stay their beginning)."""
        for rel in self.log_dirs:
            self.folder.end(rel, appends=True)
        # A checkpoint announced for save_strategy="best" that was not the best is never written: no write is
        # in progress any more, and a folder of that name made later is not the run's.
        for scope in list(self.folder.writing):
            self.folder.end(scope["folder"])
        self.sync()
