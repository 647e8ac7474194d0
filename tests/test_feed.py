"""The feed (--decode): the reference feed equals open_clip's preprocessing byte for byte; the tensor
feed (the GPU path, run here on the CPU with torchvision's libjpeg-turbo decoder) agrees with it
within the stated bounds; odd files give the same rows and the same error reasons either way;
EXIF orientation is honoured on both paths."""

from __future__ import annotations

import csv
import io
import shutil

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from coder_index.core.decode import load_image
from coder_index.pipeline.feed import ReferenceFeed, TensorFeed, make_feed, split_preprocess
from coder_index_cli.main import cli

from conftest import shared_path
from images import BAD, GOOD, make_messy_folder
from scores import assert_same_ranking, csv_ranking

SAMPLES = sorted(p.name for p in shared_path("data", "imagenet-samples").glob("*.JPEG"))[:24]


@pytest.fixture(scope="module")
def vit_preprocess():
    """ViT-B-32's real preprocessing (224 px, bicubic): what the feeds reproduce."""
    import open_clip

    return open_clip.image_transform(224, is_train=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_messy_folder(tmp_path_factory.mktemp("feed"))
    for name in SAMPLES:
        shutil.copy(shared_path("data", "imagenet-samples", name), root / name)
    rotated = Image.open(root / SAMPLES[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated.save(root / "exif_rotated.jpg", exif=exif.tobytes(), quality=92)
    Image.open(root / SAMPLES[1]).convert("L").save(root / "gray.jpg", quality=90)
    Image.open(root / SAMPLES[2]).save(root / "progressive.jpg", progressive=True, quality=90)
    return root


def units(root, names):
    """The files of ``root`` named ``names`` as the feed's units, each row named by its relative path."""
    from coder_index.pipeline.sources.files import FileUnit

    return [FileUnit(n, str(root / n), i) for i, n in enumerate(names)]


def _all(feed, root, names, batch_size=5, workers=0):
    got, errors = {}, {}
    for b in feed.batches(units(root, names), batch_size=batch_size, workers=workers):
        errors.update({e.row: e.reason for e in [*b.errors, *b.failures]})
        if b.pixels is not None:
            for p, px in zip(b.paths, b.pixels, strict=True):
                got[p] = px
    return got, errors


def _names(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                  and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp") and not p.name.startswith("."))


@pytest.mark.parametrize("workers", [0, 2])
def test_reference_feed_is_open_clips_preprocessing_byte_for_byte(vit_preprocess, folder, workers):
    names = _names(folder)
    got, errors = _all(ReferenceFeed(vit_preprocess, torch.device("cpu")), folder, names, workers=workers)
    assert set(errors) == set(BAD)
    for name in names:
        if name in BAD:
            continue
        want = vit_preprocess(load_image(folder / name))
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want), name


def test_tensor_feed_agrees_with_the_reference_and_routes_odd_files(vit_preprocess, folder):
    names = _names(folder)
    ref, ref_err = _all(ReferenceFeed(vit_preprocess, torch.device("cpu")), folder, names)
    ten, ten_err = _all(TensorFeed(vit_preprocess, torch.device("cpu")), folder, names, batch_size=7)
    assert ten_err == ref_err and set(ten) == set(ref)      # the same rows and the same reasons
    for name in names:
        if name in BAD:
            continue
        diff = (ten[name] - ref[name]).abs()
        jpeg_path = name.lower().endswith((".jpg", ".jpeg")) and "cmyk" not in name
        if not jpeg_path:
            assert torch.equal(ten[name], ref[name]), name  # odd files: the reference itself
        else:
            # bicubic resampling of the decoded pixels: PIL and torchvision round differently; in
            # normalised units (1/255/std ~ 0.015 per grey level) a few levels at most, rarely
            assert diff.mean() < 0.02 and float(diff.max()) < 0.5, (name, float(diff.mean()), float(diff.max()))


def test_exif_orientation_is_honoured_on_both_paths(vit_preprocess, folder):
    ref, _ = _all(ReferenceFeed(vit_preprocess, torch.device("cpu")), folder, ["exif_rotated.jpg", SAMPLES[0]])
    ten, _ = _all(TensorFeed(vit_preprocess, torch.device("cpu")), folder, ["exif_rotated.jpg", SAMPLES[0]])
    upright = load_image(folder / SAMPLES[0])
    assert load_image(folder / "exif_rotated.jpg").size == upright.size[::-1]
    for feed in (ref, ten):
        # the rotated copy is not the upright one: orientation was applied (not ignored)
        assert not torch.allclose(feed["exif_rotated.jpg"], feed[SAMPLES[0]], atol=0.1)
    assert (ten["exif_rotated.jpg"] - ref["exif_rotated.jpg"]).abs().mean() < 0.03


def test_a_preprocessing_of_another_shape_is_refused_for_gpu_and_auto_falls_back():
    from torchvision import transforms as T

    odd = T.Compose([T.Resize((200, 100)), T.ToTensor()])
    assert split_preprocess(odd) is None
    with pytest.raises(ValueError, match="--decode cpu"):
        TensorFeed(odd, torch.device("cpu"))
    assert isinstance(make_feed("auto", odd, torch.device("cpu")), ReferenceFeed)
    assert not isinstance(make_feed("auto", odd, torch.device("cpu")), TensorFeed)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_classify_rows_and_errors_are_the_same_under_either_decoder(built_index, folder, tmp_path, decode):
    """The CLI: --decode gpu (the tensor path on this CPU) gives every file the row or the error
    --decode cpu gives, rankings within the stated tolerance; the setting is recorded, so a resumed
    run never mixes the two."""
    outs = {}
    for mode in ("cpu", decode):
        out = tmp_path / f"{mode}-{decode}.csv"
        res = CliRunner().invoke(cli, ["classify", str(folder), "--index", str(built_index.path), "--out", str(out),
                                       "--workers", "0", "--decode", mode, "-q"])
        assert res.exit_code == 0, res.output
        with open(out, newline="") as f:
            outs[mode] = {r["path"]: csv_ranking(r) for r in csv.DictReader(f)}
        with open(out.with_name(out.name + ".errors.csv"), newline="") as f:
            outs[mode + "-errors"] = {r["path"]: r["error"] for r in csv.DictReader(f)}
    assert outs[decode].keys() == outs["cpu"].keys() and len(outs["cpu"]) >= len(GOOD)
    assert outs[decode + "-errors"] == outs["cpu-errors"]
    if decode == "gpu":
        for path, ranking in outs["gpu"].items():
            assert ranking[0] and len(ranking[0]) == len(outs["cpu"][path][0])
        res = CliRunner().invoke(cli, ["classify", str(folder), "--index", str(built_index.path), "--out",
                                       str(tmp_path / "gpu-gpu.csv"), "--workers", "0", "--decode", "cpu", "-q"])
        assert res.exit_code == 1 and "decode" in res.output  # a gpu-decoded output is not resumed as cpu
    else:
        for path, ranking in outs["cpu"].items():
            assert_same_ranking(*ranking, *outs[decode][path], atol=0)


def test_plain_jpeg_check_routes_cmyk_and_truncated_files(folder):
    from coder_index.pipeline.feed import _is_plain_jpeg

    assert _is_plain_jpeg((folder / SAMPLES[0]).read_bytes())
    assert _is_plain_jpeg((folder / "gray.jpg").read_bytes()) and _is_plain_jpeg((folder / "progressive.jpg")
                                                                                   .read_bytes())
    assert not _is_plain_jpeg((folder / "cmyk.jpg").read_bytes())
    assert not _is_plain_jpeg((folder / "truncated.jpg").read_bytes())
    data = (folder / SAMPLES[0]).read_bytes()
    assert not any(_is_plain_jpeg(data[:n]) for n in range(0, len(data) - 2, max(1, len(data) // 300)))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    assert not _is_plain_jpeg(buf.getvalue())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none): nvJPEG decoding")
def test_gpu_decoding_agrees_with_the_reference(vit_preprocess, folder):
    """On a GPU: nvJPEG-decoded, GPU-resized pixels against the reference (bounds wider than the
    CPU path's: nvJPEG's IDCT and upsampling are not libjpeg-turbo's); odd files identical."""
    dev = torch.device("cuda")
    names = _names(folder)
    ref, ref_err = _all(ReferenceFeed(vit_preprocess, dev), folder, names)
    gpu, gpu_err = _all(TensorFeed(vit_preprocess, dev), folder, names, batch_size=7)
    assert gpu_err == ref_err and set(gpu) == set(ref)
    for name in ref:
        diff = (gpu[name] - ref[name]).abs()
        assert gpu[name].device.type == "cuda" and diff.mean() < 0.05, (name, float(diff.mean()))
