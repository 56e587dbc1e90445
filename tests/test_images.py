import inspect

from PIL import Image

from mmft_hf import images
from mmft_hf.classification import remote_pipeline


def test_the_hub_copy_of_the_rgb_conversion_is_the_library_one():
    # remote_pipeline.py must be self-contained on the Hub, so it carries a copy; the two must never drift apart.
    for name in ("to_rgb", "_scale_to_uint8"):
        library, hub_copy = inspect.getsource(getattr(images, name)), inspect.getsource(getattr(remote_pipeline, name))
        assert library.split('"""')[0] == hub_copy.split('"""')[0], name  # signature
        assert library.split('"""')[-1] == hub_copy.split('"""')[-1], name  # body


def test_to_rgb_composites_transparency_onto_white():
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert images.to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
