"""The subcommands of the `mmft-hf` command line tool (`mmft_hf.cli`); `examples/*.py` are thin wrappers."""
