"""`esam-hf`: one entry point for the commands; each command's options live with its code."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "ESAM_HF_DEBUG"
# Variables by which a user chooses torch's intra-op threads (OpenMP's and MKL's), read at start-up.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

# command -> (module with `main(argv)`, what it does)
COMMANDS = {
    "train": ("esam_hf.run", "train one recipe or any model/data/TrainingArguments setting"),
    "recipes": ("esam_hf.recipes", "list the paper's recipes"),
    "bench": ("esam_hf.benchmark", "throughput of SGD, SAM and ESAM side by side"),
    "reproduce": ("esam_hf.reproduce", "train SGD, SAM and ESAM on one recipe over several seeds; tables and plots"),
    "landscape": ("esam_hf.landscape", "loss landscape and top Hessian eigenvalue of saved models"),
}


def data_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions of a data mistake: esam_hf's `DataError`, a missing path, and what `datasets` and
    `huggingface_hub` raise for a dataset they cannot find, build or fetch (offline mode included)."""
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DatasetsError
    from huggingface_hub.errors import OfflineModeIsEnabled

    from .data.errors import DataError

    return DataError, DatasetsError, EmptyDatasetError, OfflineModeIsEnabled, FileNotFoundError


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_command(command: Callable[[list[str]], Any], argv: list[str], prog: str, debug: bool = False) -> Any:
    """`command(argv)`, with a data mistake shown as argparse shows a bad option (`prog: error: message`,
    status 2), as the transformers example scripts do, rather than as a traceback; `debug` (`esam-hf
    --debug`) or `ESAM_HF_DEBUG=1` raises it with its traceback."""
    try:
        return command(argv)
    except Exception as e:
        if debug or debug_requested() or not isinstance(e, data_error_types()):
            raise
        print(f"{prog}: error: {e}\n({DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def busy_cores(cores: set[int], seconds: float = 0.3) -> float | None:
    """How many of `cores` other processes keep busy now, from /proc/stat sampled over `seconds` (Linux);
    None where it cannot be read. Instantaneous, unlike the load average, which still counts a run that
    ended a minute ago."""
    def sample() -> dict[int, tuple[int, int]]:
        times = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    values = [int(v) for v in fields[:8]]
                    idle = values[3] + values[4]  # idle + iowait
                    times[int(name[3:])] = (sum(values) - idle, sum(values))
        return times

    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError):
        return None
    busy = 0.0
    for cpu, (work, total) in after.items():
        if cpu in before and total > before[cpu][1]:
            busy += (work - before[cpu][0]) / (total - before[cpu][1])
    return busy if after else None


def choose_cpu_threads(log: Callable[[str], None] = lambda text: print(text, file=sys.stderr)) -> int | None:
    """Set torch's intra-op threads to the cores other processes leave free (at least 1), unless the user
    chose (OMP_NUM_THREADS / MKL_NUM_THREADS); say so once. Returns the count set, or None.

    torch starts one OpenMP thread per core, and its threads spin at every parallel region's barrier
    waiting for the slowest: on a core another process keeps busy that thread runs only part of the time,
    so every step waits for it, and the spinning burns the time the other threads could have used. One
    thread per free core keeps a loaded machine's steps at the speed of the cores actually available."""
    chosen = next((name for name in THREAD_ENV if os.environ.get(name)), None)
    if chosen:
        return None
    import torch

    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    busy = busy_cores(cores)
    how = "busy now"
    if busy is None and hasattr(os, "getloadavg"):
        busy, how = os.getloadavg()[0], "load average"
    free = max(1, min(len(cores), round(len(cores) - (busy or 0.0))))
    if free < torch.get_num_threads():
        torch.set_num_threads(free)
        log(f"esam-hf: {busy:.1f} of {len(cores)} cores {how} with other work: using {free} CPU thread"
            f"{'s' if free > 1 else ''} (set OMP_NUM_THREADS to choose).")
    return torch.get_num_threads()


@contextlib.contextmanager
def cpu_threads_for_free_cores():
    """`choose_cpu_threads` for the duration of a command; torch's count is restored after it (a command
    called in-process, as tests call it, leaves no trace)."""
    import torch

    before = torch.get_num_threads()
    try:
        choose_cpu_threads()
        yield
    finally:
        torch.set_num_threads(before)


# Commands that train, and so set their CPU threads from the cores free when they start.
TRAINING_COMMANDS = ("train", "reproduce")
USAGE = ("usage: esam-hf [--debug] COMMAND [options]   (esam-hf --version)\n\ncommands:\n{commands}\n\n"
         "`esam-hf COMMAND --help` lists a command's options.\n"
         f"--debug (or {DEBUG_ENV}=1): show the traceback of a data error (a missing dataset path, a Hub dataset "
         "while offline, a bad column or image), which is otherwise one line, `esam-hf COMMAND: error: ...`, "
         "with exit status 2.\n"
         "train and reproduce use as many CPU threads as there are cores free when they start (one per core "
         "on an idle machine); OMP_NUM_THREADS=N chooses N.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--version":
        from . import __version__

        print(f"esam-hf {__version__}")
        return 0
    debug = bool(argv) and argv[0] == "--debug"  # before the command: `train --debug` is TrainingArguments' own
    argv = argv[debug:]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        commands = "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
        problem = f"esam-hf: unknown command {argv[0]!r}\n\n" if argv and argv[0] not in ("-h", "--help") else ""
        stream = sys.stderr if problem or not argv else sys.stdout
        print(problem + USAGE.format(commands=commands), file=stream)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, _ = COMMANDS[argv[0]]
    trains = argv[0] in TRAINING_COMMANDS and not {"-h", "--help"} & set(argv[1:])
    with cpu_threads_for_free_cores() if trains else contextlib.nullcontext():
        result = run_command(importlib.import_module(module).main, argv[1:], prog=f"esam-hf {argv[0]}", debug=debug)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
