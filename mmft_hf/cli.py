"""The `mmft-hf` command: `mmft-hf caption | finetune | benchmark [FLAGS]`.

Each subcommand takes the same `HfArgumentParser` flags as the matching script in `examples/`
(`mmft-hf finetune --help` lists the main ones, `--help-all` every one; `mmft-hf help finetune` is the same).
`mmft-hf --help` and `mmft-hf help` print the commands without importing a subcommand (nor torch). Multi-process runs go through accelerate or torchrun with the module path:

    accelerate launch -m mmft_hf.cli finetune --model_name_or_path openai/clip-vit-base-patch32 ...
    torchrun --nproc_per_node 8 -m mmft_hf.cli benchmark ...

A bad flag value or bad input ends the command with exit status 2 and one `mmft-hf <command>: error: ...` line
naming the flag and the fix; other failures keep their traceback.
"""

from __future__ import annotations

import importlib
import sys

from .version import __version__

SUBCOMMANDS = {
    "caption": ("mmft_hf.commands.caption", "caption a labelled image dataset with a multimodal LLM (stage 1)"),
    "finetune": ("mmft_hf.commands.finetune", "fine-tune a dual encoder with MMFT on a captioned dataset (stage 2)"),
    "benchmark": ("mmft_hf.commands.benchmark", "run the paper's evaluation protocol: methods x shots x seeds"),
}
USAGE_ERROR = 2  # argparse's exit status for a bad command line


def usage() -> str:
    lines = ["usage: mmft-hf <command> [flags]   (mmft-hf <command> --help lists the flags)", "", "commands:"]
    lines += [f"  {'help':<10} this text; `mmft-hf help <command>` is `mmft-hf <command> --help`"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "Multi-process: accelerate launch -m mmft_hf.cli <command> [flags]", f"mmft-hf {__version__}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs `mmft-hf <command> [flags]`.

    Args:
        argv (`list[str]`, *optional*): the arguments after the program name; defaults to `sys.argv[1:]`.

    Returns:
        `int`: the exit status (0 on success, 2 for an unknown command or a `ValueError` of the command).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "help":
        argv = [argv[1], "--help"] if len(argv) > 1 else ["--help"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else USAGE_ERROR
    if argv[0] == "--version":
        print(f"mmft-hf {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mmft-hf: unknown command {name!r}.\n\n{usage()}", file=sys.stderr)
        return USAGE_ERROR
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sys.argv = [f"mmft-hf {name}", *rest]  # argparse names the subcommand in --help and errors
    try:
        module.main(rest)
    except ValueError as error:  # the library's input checks: the message names the flag and the fix
        print(f"mmft-hf {name}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
