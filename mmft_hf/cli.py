"""The `mmft-hf` command: `mmft-hf caption | finetune | benchmark [FLAGS]`.

Each subcommand takes the same `HfArgumentParser` flags as the matching script in `examples/`
(`mmft-hf finetune --help`). Multi-process runs go through accelerate or torchrun with the module path:

    accelerate launch -m mmft_hf.cli finetune --model_name_or_path openai/clip-vit-base-patch32 ...
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "caption": ("mmft_hf.commands.caption", "caption a labelled image dataset with a multimodal LLM (stage 1)"),
    "finetune": ("mmft_hf.commands.finetune", "fine-tune a dual encoder with MMFT on a captioned dataset (stage 2)"),
    "benchmark": ("mmft_hf.commands.benchmark", "run the paper's evaluation protocol: methods x shots x seeds"),
}


def usage() -> str:
    lines = ["usage: mmft-hf <command> [flags]   (mmft-hf <command> --help lists the flags)", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs `mmft-hf <command> [flags]`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mmft-hf: unknown command {name!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sys.argv = [f"mmft-hf {name}", *rest]  # argparse names the subcommand in --help and errors
    module.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
