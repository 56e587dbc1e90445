"""The command line's own language: parsers whose `--help` reads well, and error messages that name flags.

The library's `ValueError`s name Python keywords (`supcon_weight=`, `label_column`); raised under a command they
name its flags (`--supcon_weight`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from transformers import HfArgumentParser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help, and the description (the command's docstring) as written."""


def command_parser(argument_dataclasses: Iterable[type], description: str | None) -> HfArgumentParser:
    """An `HfArgumentParser` for a command: a one-line usage (not the 150 flags of `TrainingArguments`), the
    command's docstring as description, flags grouped by the dataclasses that set `_argument_group_name`.

    Args:
        argument_dataclasses (`Iterable[type]`): the dataclasses whose fields are the flags.
        description (`str`, *optional*): shown before the flags, line breaks kept (the module docstring).
    """
    parser = HfArgumentParser(
        list(argument_dataclasses),
        usage="%(prog)s [--flag value ...]   (every flag is listed below)",
        description=description,
        formatter_class=_HelpFormatter,
    )
    # argparse lists its default group ("options", here the ~150 TrainingArguments flags) before the named ones:
    # name it and list it last, after the command's own flags
    parser._optionals.title = "training (transformers.TrainingArguments and MMFTTrainingArguments)"
    parser._action_groups.remove(parser._optionals)
    parser._action_groups.append(parser._optionals)
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
