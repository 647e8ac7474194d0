"""Decoding real-world files: every mode becomes sensible 8-bit RGB, every failure a reason."""

import numpy as np
import pytest
from PIL import Image

from coder_index.core.decode import ImageDecodeError, load_image, to_rgb
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


# ---------------------------------------------------------------------------------------------- reasons
def _encoded(fmt: str, **kw) -> bytes:
    import io

    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, fmt, **kw)
    return buf.getvalue()


REASONS = ("empty file (0 bytes)", "not an image (unrecognised file format)")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"])
def test_every_cut_of_every_format_gives_one_reason_from_the_bytes_for_files_and_uploads(tmp_path, fmt):
    """A file cut at every byte offset: the reason names the format and says 'truncated' (or 'empty',
    or 'not an image' before the format's signature is complete), never Pillow's own wording, and
    the file on disk and the same bytes uploaded give the same answer."""
    from coder_index.core.decode import decode_image_bytes

    data = _encoded(fmt)
    name = {"WEBP": "WebP"}.get(fmt, fmt)
    allowed = {*REASONS, f"truncated {name} image (the file ends before the image data does)",
               f"corrupt {name} image (the image data cannot be decoded)", "ok"}
    path = tmp_path / "cut.img"
    seen = set()
    for n in range(len(data)):
        path.write_bytes(data[:n])
        answers = []
        cut = data[:n]
        for decode in (lambda: load_image(path), lambda: decode_image_bytes(cut)):  # noqa: B023 - called at once
            try:
                decode()
                answers.append("ok")
            except ImageDecodeError as exc:
                answers.append(str(exc))
        assert answers[0] == answers[1], (n, answers)
        assert answers[0] in allowed, (n, answers[0])
        if n == 0:
            assert answers[0] == "empty file (0 bytes)"
        seen.add(answers[0])
    assert any(a.startswith("truncated") for a in seen), seen


def test_a_complete_file_with_broken_data_is_corrupt_not_truncated(tmp_path):
    from coder_index.core.decode import decode_image_bytes

    good = _encoded("PNG")
    idat = good.index(b"IDAT")
    broken = good[:idat + 8] + bytes(64) + good[idat + 72:]  # zlib stream destroyed, IEND kept
    with pytest.raises(ImageDecodeError, match=r"^corrupt PNG image"):
        decode_image_bytes(broken)
    (tmp_path / "b.png").write_bytes(broken)
    with pytest.raises(ImageDecodeError, match=r"^corrupt PNG image"):
        load_image(tmp_path / "b.png")


@pytest.mark.parametrize("data", [b"", b"hello", b"<html></html>", b"\x00" * 100, b"PK\x03\x04rest"])
def test_non_images_and_empty_files_have_one_reason_everywhere(tmp_path, data):
    from coder_index.core.decode import decode_image_bytes

    (tmp_path / "x.jpg").write_bytes(data)
    expect = REASONS[0] if not data else REASONS[1]
    for decode in (lambda: load_image(tmp_path / "x.jpg"), lambda: decode_image_bytes(data)):
        with pytest.raises(ImageDecodeError) as err:
            decode()
        assert str(err.value) == expect
