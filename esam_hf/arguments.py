"""One command-line convention for every `esam-hf` command: Hugging Face's.

Each command declares its options as dataclasses and parses them with `parse_args`, a thin layer
over `transformers.HfArgumentParser`: underscores (`--batch_size`, with the hyphen alias
`--batch-size`), no prefix matching (`--optim` never becomes `--optimizer`), and an unknown flag is
an error that names the closest known one, before any work starts.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any, Iterable, NoReturn

from transformers import HfArgumentParser


def make_parser(types: Iterable[type], *, prog: str, description: str | None = None,
                defaults: dict[str, Any] | None = None, first_group: tuple[str, str] | None = None,
                epilog: str | None = None, add_help: bool = True) -> HfArgumentParser:
    """An `HfArgumentParser` over `types` with `defaults` set.

    `first_group=(title, prefix)` lists the options whose names start with `prefix` under `title`,
    first in `--help` (e.g. the ESAM flags before the ~150 TrainingArguments ones). A pre-parser that
    only reads what decides the other defaults (the recipe) passes `add_help=False`, so that `--help`
    reaches the full parser."""
    parser = HfArgumentParser(list(types), prog=prog, usage="%(prog)s [options]", description=description,
                              epilog=epilog, allow_abbrev=False, add_help=add_help)
    if defaults:
        unknown = set(defaults) - {action.dest for action in parser._actions}
        if unknown:  # a programming error: a recipe or command default that names no option
            raise ValueError(f"defaults for unknown options: {sorted(unknown)}")
        parser.set_defaults(**defaults)
    if first_group:
        _move_to_first_group(parser, *first_group)
    for action in parser._actions:  # what these TrainingArguments mean in esam-hf, not in the Trainer at large
        action.help = COMMAND_HELP.get(action.dest, action.help)
    return parser


COMMAND_HELP = {
    "optim": "Optimizer. 'sgd' here is the paper's SGD (momentum 0.9, weight decay on every parameter; "
             "--optim_args momentum=X,nesterov=true), not the Trainer's momentum-free one; any other "
             "transformers optimizer name works except those that step inside the backward pass "
             "(lomo, adalomo, *_layerwise), which ESAM refuses.",
    "resume_from_checkpoint": "'last' continues the newest complete checkpoint in --output_dir (damaged ones "
                              "are skipped and named); a path continues that checkpoint. A finished run is "
                              "never resumed.",
    "do_train": "Train (default: train and evaluate when neither --do_train nor --do_eval is given).",
    "do_eval": "Evaluate on the evaluation split (default: train and evaluate when neither is given).",
}


def parse_args(parser: HfArgumentParser, argv: list[str] | None = None, trains: bool | None = None) -> tuple:
    """The dataclasses of `parser` filled from `argv`; unknown flags and values a dataclass refuses exit
    with the usage error (status 2) before any work, and so do training arguments that would train
    nothing when the command trains (`trains`; default: unless it asked only to evaluate or predict)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):  # one argument file, as in the HF examples
        argv = argument_file_flags(parser, argv[0])
    try:
        *parsed, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except ValueError as e:  # a dataclass's own check (__post_init__): a usage error, not a crash
        parser.error(str(e))
    if rest:
        parser.error(unknown_flags_message(parser, rest))
    from transformers import TrainingArguments

    from .trainer import check_training_args

    for obj in parsed:
        if isinstance(obj, TrainingArguments) and (trains if trains is not None else
                                                   obj.do_train or not (obj.do_eval or obj.do_predict)):
            try:
                check_training_args(obj)
            except ValueError as e:
                parser.error(str(e))
    return tuple(parsed)


def argument_file_flags(parser: HfArgumentParser, path: str) -> list[str]:
    """The options of a `.json` / `.yaml` argument file (`{"output_dir": "x", "bf16": true}`) as command-line
    flags, so they go through the same parsing, defaults and checks as flags do."""
    import json

    try:
        with open(path) as f:
            if path.endswith(".json"):
                options = json.load(f)
            else:
                import yaml

                options = yaml.safe_load(f)
    except (OSError, ValueError) as e:
        parser.error(f"cannot read the argument file {path}: {e}")
    if not isinstance(options, dict):
        parser.error(f"the argument file {path} must hold a mapping of option names to values")
    flags = []
    for name, value in options.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        flags += [f"--{name}", str(value)]
    return flags


def usage_error(prog: str, message: str) -> NoReturn:
    """Exit as argparse does on a bad option (status 2, `prog: error: message` on stderr), for the checks
    that need more than the parser (an output folder in use, a launcher without devices)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def unknown_flags_message(parser: HfArgumentParser, rest: list[str]) -> str:
    known = [option for action in parser._actions for option in action.option_strings]
    lines, after_flag = [], False
    for token in rest:
        if not token.startswith("-"):
            if not after_flag:  # a value after an unknown flag is that flag's
                lines.append(f"unexpected value {token!r}")
            after_flag = False
            continue
        after_flag = "=" not in token
        flag = token.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        lines.append(f"unknown option {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
    return "; ".join(lines) + f". `{parser.prog} --help` lists the options."


def explicit_options(parser: HfArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the options given on the command line (not left at a default)."""
    strings = {option: action.dest for action in parser._actions for option in action.option_strings}
    return {strings[token.split("=", 1)[0]] for token in argv if token.split("=", 1)[0] in strings}


def _move_to_first_group(parser: HfArgumentParser, title: str, prefix: str) -> None:
    # argparse has no public way to move an option between groups or to order groups, and HfArgumentParser
    # adds each dataclass's fields in declaration order, ESAM's after TrainingArguments' ~150: so this edits
    # the parser's group lists, which only `--help` reads.
    group = parser.add_argument_group(title)
    for action in list(parser._actions):
        if action.dest.startswith(prefix):
            for other in parser._action_groups:
                if action in other._group_actions and other is not group:
                    other._group_actions.remove(action)
            group._group_actions.append(action)
    # argparse prints groups in list order: this group first, the ungrouped options (TrainingArguments'
    # ~150) last, the command's own titled groups in between.
    parser._action_groups.remove(group)
    parser._action_groups.remove(parser._optionals)
    parser._action_groups[1:1] = [group]
    parser._action_groups.append(parser._optionals)
