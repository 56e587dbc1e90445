"""Error messages in the language of the command line: the library's `ValueError`s name Python keywords
(`supcon_weight=`, `label_column`); raised under a command they name its flags (`--supcon_weight`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


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
        bare = rf"(?<![\w\-.`('\"]){re.escape(name)}(?![\w`'\"])"
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
