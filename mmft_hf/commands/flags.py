"""The command line's own language: parsers whose `--help` teaches the recipe, and error messages that name flags.

`mmft-hf <command> --help` lists the command's own flags (model, data, sweep, captioning), then MMFT's flags (fields
a `TrainingArguments` subclass adds), then the recipe (the `TrainingArguments` fields it redeclares with the paper's
defaults), then the few `TrainingArguments` flags every run sets; `--help-all` adds every other
`TrainingArguments` flag. The sections are found from the dataclasses, so a field added to `MMFTTrainingArguments`
is listed without touching this module.

The library's `ValueError`s name Python keywords (`supcon_weight=`, `label_column`); raised under a command they
name its flags (`--supcon_weight`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from transformers import HfArgumentParser, TrainingArguments

# `TrainingArguments` flags most runs set, listed by the short `--help` after MMFT's own and the recipe's
RUN_FLAGS = (
    "output_dir",
    "seed",
    "resume_from_checkpoint",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "use_cpu",
    "report_to",
    "push_to_hub",
    "hub_model_id",
    "disable_tqdm",
)
MMFT_SECTION = "MMFT ({})"
RECIPE_SECTION = "recipe: the paper's defaults ({} redeclares these TrainingArguments; method.md §6)"
RUN_SECTION = "run (the TrainingArguments most runs set)"
OTHER_SECTION = "all other transformers.TrainingArguments"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, one line per flag where it fits, and each flag's default once: appended unless
    the help already says what the default is."""

    def __init__(self, prog: str):
        width = min(shutil.get_terminal_size((120, 24)).columns, 120)
        super().__init__(prog, max_help_position=40, width=width)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text.lower() or action.default is argparse.SUPPRESS:
            return help_text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(str(item) for item in default) or "[]"
        shown = str(getattr(default, "value", default)).replace("%", "%%")
        return f"{help_text} (default: {shown})".strip()


class CommandParser(HfArgumentParser):
    """An `HfArgumentParser` whose `--help` shows the main flags by section and `--help-all` every flag."""

    short_help = True

    def format_help(self) -> str:
        hidden = [group for group in self._action_groups if self.short_help and group.title == OTHER_SECTION]
        shown = sum(action.help != argparse.SUPPRESS for group in hidden for action in group._group_actions)
        self._action_groups = [group for group in self._action_groups if group not in hidden]
        self.epilog = f"{shown} more flags ({OTHER_SECTION}): --help-all lists them." if shown else None
        try:
            return super().format_help()
        finally:
            self._action_groups += hidden


class _HelpAllAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.short_help = False
        parser.print_help()
        parser.exit()


def flag_section(cls: type, field: dataclasses.Field) -> str | None:
    """The `--help` section of the flag of `field` of the dataclass `cls`: `None` (the command's own section: its
    `_argument_group_name`) unless `cls` is a `TrainingArguments` subclass, whose fields go to `MMFT_SECTION`
    (added by a subclass), `RECIPE_SECTION` (redeclared by a subclass, i.e. with its own default), `RUN_SECTION`
    (`RUN_FLAGS`) or `OTHER_SECTION` (listed by `--help-all` only)."""
    if not issubclass(cls, TrainingArguments):
        return None
    subclasses = [
        klass for klass in cls.__mro__ if issubclass(klass, TrainingArguments) and klass is not TrainingArguments
    ]
    declared = {name for klass in subclasses for name in klass.__dict__.get("__annotations__", {})}
    if field.name not in TrainingArguments.__dataclass_fields__:
        return MMFT_SECTION.format(cls.__name__)
    if field.name in declared:
        return RECIPE_SECTION.format(cls.__name__)
    return RUN_SECTION if field.name in RUN_FLAGS else OTHER_SECTION


def _metavar(action: argparse.Action) -> str | None:
    if action.choices:
        return None  # argparse shows {a,b,c}
    kind = getattr(action.type, "__name__", "")
    if kind == "string_to_bool":
        return "{true,false}"
    return {"int": "INT", "float": "FLOAT"}.get(kind, "STR" if kind in ("str", "") else kind.upper())


def _declaration_order(cls: type) -> dict[str, int]:
    """Field name -> position in the class bodies, subclass first (dataclasses keep a redeclared field where the
    base class put it; the recipe reads better in the order the subclass declares it)."""
    names = [name for klass in cls.__mro__ for name in klass.__dict__.get("__annotations__", {})]
    return {name: index for index, name in reversed(list(enumerate(names)))}


def command_parser(argument_dataclasses: Iterable[type], description: str | None) -> CommandParser:
    """A `CommandParser` for a command: a one-line usage, the command's docstring as description, then the flags
    in sections (see `flag_section`), each with its help and its default. `--help` lists all but the other
    `TrainingArguments` flags, `--help-all` every flag.

    Args:
        argument_dataclasses (`Iterable[type]`): the dataclasses whose fields are the flags.
        description (`str`, *optional*): shown before the flags, line breaks kept (the module docstring).
    """
    argument_dataclasses = list(argument_dataclasses)
    parser = CommandParser(
        argument_dataclasses,
        usage="%(prog)s [--flag value ...]   (--help: the main flags; --help-all: every flag)",
        description=description,
        formatter_class=_HelpFormatter,
    )
    fields = {field.name: (cls, field) for cls in argument_dataclasses for field in dataclasses.fields(cls)}
    training_help = {field.name: field.metadata.get("help") for field in dataclasses.fields(TrainingArguments)}
    sections: dict[str, list[tuple[tuple, argparse.Action]]] = {}
    help_actions = []
    for action in parser._actions:
        if action.dest not in fields:  # -h / --help
            help_actions.append(action)
            continue
        cls, field = fields[action.dest]
        if action.option_strings[0].startswith("--no_"):  # `--flag false` says the same
            action.help = argparse.SUPPRESS
        if not action.help and training_help.get(field.name):  # a redeclared field keeps transformers' help,
            action.help = re.sub(
                r"\s*Defaults? (to|based on) [^.]*\.", "", training_help[field.name]
            )  # not its default
        action.option_strings = action.option_strings[:1]  # shown once; the dashed alias still parses
        if action.nargs != 0 and action.metavar is None:
            action.metavar = _metavar(action)
        title = flag_section(cls, field) or getattr(cls, "_argument_group_name", "options")
        order = (field.default is None, _declaration_order(cls)[field.name]) if title.startswith("recipe") else ()
        sections.setdefault(title, []).append((order, action))
    help_group = argparse._ArgumentGroup(parser, "help")
    help_actions.append(parser.add_argument("--help-all", action=_HelpAllAction, help="List every flag and exit."))
    help_group._group_actions = help_actions
    # the command's own sections first (in their order), then MMFT's, the recipe, the run's, all the others
    ordered = sorted(
        sections,
        key=lambda title: (
            title == OTHER_SECTION,
            title == RUN_SECTION,
            title.startswith("recipe"),
            title.startswith("MMFT"),
        ),
    )
    parser._action_groups = []
    for title in ordered:
        group = argparse._ArgumentGroup(parser, title)
        group._group_actions = [action for _, action in sorted(sections[title], key=lambda item: item[0])]
        parser._action_groups.append(group)
    parser._action_groups.append(help_group)
    return parser


def flag_names(argument_dataclasses: Iterable[type]) -> list[str]:
    """The field names of the `HfArgumentParser` dataclasses of a command: each is a flag `--<name>`."""
    return [field.name for cls in argument_dataclasses for field in dataclasses.fields(cls)]


def as_flags(message: str, names: Iterable[str]) -> str:
    """`message` with the argument names in it written as flags.

    A name becomes `--name` where it reads as code: as a keyword (`name=`), in backticks, or (for names with an
    underscore, which are not English words) anywhere as a whole word. Names already written as flags are kept.

    Args:
        message (`str`): an error message of the library.
        names (`Iterable[str]`): the command's argument names.
    """
    for name in sorted(set(names), key=len, reverse=True):  # `label_column` before `label`
        bare = rf"(?<![\w\-.`('\"/\\]){re.escape(name)}(?![\w`'\"/\\])"  # not in code, quotes or paths
        message = re.sub(rf"`{re.escape(name)}`", f"`--{name}`", message)
        message = re.sub(rf"{bare}=", f"--{name} ", message)
        if "_" in name:
            message = re.sub(rf"{bare}(?![=(])", f"--{name}", message)
    return message


@contextmanager
def errors_in_flags(names: Iterable[str]) -> Iterator[None]:
    """Rewrites the message of a `ValueError` raised in the block with `as_flags` (same exception, same traceback)."""
    try:
        yield
    except ValueError as error:
        if error.args and isinstance(error.args[0], str):
            error.args = (as_flags(error.args[0], names), *error.args[1:])
        raise
