"""Decoding real-world files: every mode becomes sensible 8-bit RGB, every failure a reason."""

import numpy as np
import pytest
from PIL import Image

from coder_index.pipeline.decode import ImageDecodeError, load_image, to_rgb
from coder_index.pipeline.discover import discover_images

from images import BAD, GOOD, make_messy_folder


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    return make_messy_folder(tmp_path_factory.mktemp("messy"))


def test_good_files_decode_to_rgb(messy):
    for name in GOOD:
        img = load_image(messy / name)
        assert img.mode == "RGB" and img.size[0] > 0, name


def test_sixteen_bit_png_is_scaled_not_saturated(messy):
    raw = np.asarray(Image.open(messy / "deep16.png"), dtype=np.float64)
    out = np.asarray(load_image(messy / "deep16.png"))[..., 0].astype(np.float64)
    np.testing.assert_allclose(out, raw / 65535 * 255, atol=1.0)
    assert out.max() < 200  # a plain convert('RGB') would clip these to 255


def test_transparency_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_give_reasons(messy, name):
    with pytest.raises(ImageDecodeError, match=BAD[name]):
        load_image(messy / name)


def test_discovery_is_recursive_sorted_and_skips_non_images(messy):
    found = discover_images(messy)
    assert sorted(found.images) == found.images
    assert set(found.images) == set(GOOD) | set(BAD)
    assert found.other_files == 1  # notes.txt; the hidden folder is not searched
