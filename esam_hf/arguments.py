"""One command-line convention for every `esam-hf` command: Hugging Face's.

Each command declares its options as dataclasses and parses them with `parse_args`, a thin layer
over `transformers.HfArgumentParser`: underscores (`--batch_size`, with the hyphen alias
`--batch-size`), no prefix matching (`--optim` never becomes `--optimizer`), and an unknown flag is
an error that names the closest known one, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import sys
import typing
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
        # `parser._actions`, here and below: argparse has no public list of a parser's options.
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
    """The dataclasses of `parser` filled from `argv`. Unknown flags, values a dataclass refuses, flags that
    contradict each other, and TrainingArguments that would fail later (a seed numpy refuses, a negative
    number of data workers, an empty output_dir) exit with the usage error (status 2) before any work; so
    do training arguments that would train nothing or crash, when the command trains (`trains`; default:
    when --do_train is given, or none of --do_train, --do_eval, --do_predict is)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):  # one argument file, as in the HF examples
        argv = argument_file_flags(parser, argv[0])
    # Before the dataclasses are built: TrainingArguments' own check of a pair may fail on another ground first
    # (bf16 on a CPU) and never name the conflict.
    given = vars(parser.parse_known_args(argv)[0])
    for first, second in EXCLUSIVE_OPTIONS:
        if given.get(first) and given.get(second):
            parser.error(f"--{first} and --{second} cannot both be set: a run trains in one mixed precision, so keep "
                         "one of them.")
    try:
        *parsed, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
        parsed = [_with_json_lists(obj, given) for obj in parsed]
    except ValueError as e:  # a dataclass's own check (__post_init__): a usage error, not a crash
        parser.error(_as_flag(str(e), parser))
    if rest:
        parser.error(unknown_flags_message(parser, rest))
    from transformers import TrainingArguments

    from .trainer import check_training_args

    explicit = explicit_options(parser, argv)
    for obj in parsed:
        if not isinstance(obj, TrainingArguments):
            continue
        will_train = trains if trains is not None else obj.do_train or not explicit & {"do_train", "do_eval", "do_predict"}
        try:
            check_run_args(obj)
            if will_train:
                check_training_args(obj)
                check_training_plan(obj)
        except ValueError as e:
            parser.error(_as_flag(str(e), parser))
    return tuple(parsed)


# Options that cannot both be on.
EXCLUSIVE_OPTIONS = (("bf16", "fp16"), ("bf16_full_eval", "fp16_full_eval"))
# numpy's seed range: `transformers.set_seed` seeds numpy too, which refuses anything else.
SEED_RANGE = (0, 2**32 - 1)
# The --optim_args keys transformers reads for torch's SGD, the optimizer --optim sgd builds here.
SGD_OPTIM_ARGS = {"momentum": "a number >= 0", "dampening": "a number >= 0", "weight_decay": "a number >= 0",
                  "nesterov": "true or false"}
# What transformers reads as a boolean in --optim_args (anything else is false, silently).
BOOLEAN_WORDS = ("true", "1", "yes", "false", "0", "no")


def check_run_args(args) -> None:
    """Refuse TrainingArguments that fail whatever the command does, naming the option."""
    if not str(args.output_dir or "").strip():
        raise ValueError(f"--output_dir must name a folder, got {args.output_dir!r}")
    low, high = SEED_RANGE
    for name in ("seed", "data_seed"):
        value = getattr(args, name, None)
        if value is not None and not (isinstance(value, int) and low <= value <= high):
            raise ValueError(f"--{name} must be an integer from {low} to 2**32 - 1 ({high}), got {value!r}")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0 (0 loads the data in the main process), got "
                         f"{args.dataloader_num_workers}")
    from transformers.integrations import get_reporting_integration_callbacks

    try:  # the Trainer's own check of the names, which it makes only once data and model are built
        get_reporting_integration_callbacks(args.report_to)
    except ValueError as e:
        raise ValueError(f"--report_to {args.report_to}: {e}") from None


def check_training_plan(args) -> None:
    """Refuse TrainingArguments that a training run would ignore or crash on late: a checkpoint interval that
    never saves, and --optim_args the optimizer cannot read."""
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps" and not args.save_steps > 0:
        raise ValueError(f"--save_steps must be > 0 with --save_strategy steps (a number of steps, or a fraction "
                         f"in (0, 1) of the training steps), got {args.save_steps:g}")
    check_optim_args(args)


def check_optim_args(args) -> None:
    """--optim_args as transformers reads it (comma-separated key=value pairs); for --optim sgd, also its keys
    and values, and torch.optim.SGD's own checks of them."""
    if not args.optim_args:
        return
    pairs = args.optim_args.replace(" ", "").split(",")
    malformed = [pair for pair in pairs if pair.count("=") != 1 or not all(pair.split("="))]
    if malformed:
        raise ValueError(f"--optim_args takes comma-separated key=value pairs such as momentum=0.9,nesterov=true, "
                         f"got {malformed[0]!r} in {args.optim_args!r}")
    if str(getattr(args.optim, "value", args.optim)) != "sgd":
        return
    options = dict(pair.split("=") for pair in pairs)
    allowed = "; ".join(f"{key}={value}" for key, value in SGD_OPTIM_ARGS.items())
    for key, value in options.items():
        if key not in SGD_OPTIM_ARGS:
            raise ValueError(f"--optim_args {args.optim_args}: --optim sgd takes no {key!r}; its keys are {allowed}")
        if key == "nesterov":
            ok = value.lower() in BOOLEAN_WORDS
        else:
            try:
                ok = math.isfinite(float(value)) and float(value) >= 0
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"--optim_args {args.optim_args}: {key} must be {SGD_OPTIM_ARGS[key]}, got {value!r}")
    import torch

    from .paper_sgd import paper_sgd_options

    try:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], **paper_sgd_options(args))
    except ValueError as e:  # torch's own checks of the combination (nesterov needs momentum, no dampening)
        raise ValueError(f"--optim_args {args.optim_args}: {e}") from None


def _with_json_lists(obj, given: dict[str, Any]):
    """`obj` with a JSON list `given` to an option that takes a list as well as a string (`report_to: [none]` in an
    argument file, `--report_to '["wandb", "tensorboard"]'`) read as that list, as transformers reads a JSON dict
    for a dict option; rebuilt, so that its own normalisation and checks see the list."""
    lists = {}
    for name in _list_fields(type(obj)):
        value = given.get(name)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                lists[name] = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--{name} {value}: not a JSON list ({e})") from None
    return dataclasses.replace(obj, **lists) if lists else obj


@functools.cache
def _list_fields(cls: type) -> tuple[str, ...]:
    """Init fields of dataclass `cls` whose type admits a list beside a string (the command line gives a string)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve here: nothing to read as a list
        return ()
    return tuple(f.name for f in dataclasses.fields(cls) if f.init and str in typing.get_args(hints.get(f.name))
                 and any(typing.get_origin(arg) is list for arg in typing.get_args(hints.get(f.name))))


def _as_flag(message: str, parser: HfArgumentParser) -> str:
    """`message` with a leading option name written as the flag (`learning_rate must be ...` -> `--learning_rate
    must be ...`), as the Python API's checks name the argument and the command line names the flag."""
    first = message.split(" ", 1)[0].split("=", 1)[0]
    return f"--{message}" if first in {action.dest for action in parser._actions} else message


def argument_file_flags(parser: HfArgumentParser, path: str) -> list[str]:
    """The options of a `.json` / `.yaml` argument file (`{"output_dir": "x", "bf16": true}`) as command-line
    flags, so they go through the same parsing, defaults and checks as flags do. A null value means "not set"
    (the default); a list goes to an option that takes several values as those values, to any other as JSON."""
    import yaml  # transformers' own dependency

    try:
        with open(path) as f:
            options = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (OSError, ValueError) as e:
        parser.error(f"cannot read the argument file {path}: {e}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        tabs = " (YAML does not allow tabs for indentation: use spaces)" if "'\\t'" in problem else ""
        parser.error(f"cannot read the argument file {path}{where}: {problem}{tabs}")
    if not isinstance(options, dict):
        parser.error(f"the argument file {path} must hold a mapping of option names to values")
    several = {action.dest for action in parser._actions if action.nargs in ("+", "*")}
    flags = []
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, list) and name in several:
            flags += [f"--{name}", *(str(item) for item in value)]
            continue
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
