"""`esam-hf`: one entry point for the commands; each command's options live with its code."""

from __future__ import annotations

import importlib
import sys

# command -> (module with `main(argv)`, what it does)
COMMANDS = {
    "train": ("esam_hf.run", "train one recipe or any model/data/TrainingArguments setting"),
    "recipes": ("esam_hf.recipes", "list the paper's recipes"),
    "bench": ("esam_hf.benchmark", "throughput of SGD, SAM and ESAM side by side"),
    "reproduce": ("esam_hf.reproduce", "train SGD, SAM and ESAM on one recipe over several seeds; tables and plots"),
    "landscape": ("esam_hf.landscape", "loss landscape and top Hessian eigenvalue of saved models"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--version":
        from . import __version__

        print(f"esam-hf {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
        problem = f"esam-hf: unknown command {argv[0]!r}\n\n" if argv and argv[0] not in ("-h", "--help") else ""
        stream = sys.stderr if problem or not argv else sys.stdout
        print(f"{problem}usage: esam-hf COMMAND [options]   (esam-hf --version)\n\ncommands:\n{usage}\n\n"
              "`esam-hf COMMAND --help` lists a command's options.", file=stream)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, _ = COMMANDS[argv[0]]
    result = importlib.import_module(module).main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
