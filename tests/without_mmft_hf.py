"""A script prefix for "a user without mmft_hf": a meta path finder that refuses to import mmft_hf, in case an
installation (editable finder, .pth) would otherwise provide it."""

import textwrap

BLOCK_MMFT_HF = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockMMFT(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mmft_hf" or name.startswith("mmft_hf."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, BlockMMFT())
    """
)
