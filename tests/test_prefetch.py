"""The feed's batches made by a thread ahead of the encoder (pipeline.feed.Prefetched): order, errors,
bounded look-ahead, early close, and that batch n+1 is really made while batch n is being used."""

from __future__ import annotations

import threading

import pytest
import torch

from coder_index.pipeline.feed import FedBatch, Prefetched
from coder_index.pipeline.sources.base import Sample


def batch(i: int) -> FedBatch:
    return FedBatch([Sample(f"img{i}.jpg")], torch.full((1, 3, 2, 2), float(i)), [])


def test_batches_arrive_in_order_and_the_source_is_closed_at_the_end():
    closed = threading.Event()

    def source():
        try:
            yield from (batch(i) for i in range(25))
        finally:
            closed.set()

    with Prefetched(source, torch.device("cpu"), depth=3) as got:
        seen = [b.paths[0] for b in got]
    assert seen == [f"img{i}.jpg" for i in range(25)]
    assert closed.is_set()
    assert next(got, None) is None  # exhausted stays exhausted


def test_an_error_in_the_feed_is_raised_after_the_batches_made_before_it():
    def source():
        yield batch(0)
        yield batch(1)
        raise OSError("the disk went away")

    got = Prefetched(source, torch.device("cpu"))
    assert next(got).paths == ["img0.jpg"]
    assert next(got).paths == ["img1.jpg"]
    with pytest.raises(OSError, match="the disk went away"):
        next(got)
    got.close()


def test_the_next_batch_is_made_while_the_caller_holds_this_one():
    second_made = threading.Event()

    def source():
        yield batch(0)
        second_made.set()
        yield batch(1)

    with Prefetched(source, torch.device("cpu")) as got:
        next(got)
        # the caller has not asked for batch 1 yet: it is being made beside it
        assert second_made.wait(timeout=60)
        assert next(got).paths == ["img1.jpg"]


def test_look_ahead_is_bounded_and_closing_early_stops_the_source():
    made, closed = [], threading.Event()

    def source():
        try:
            for i in range(1000):
                made.append(i)
                yield batch(i)
        finally:
            closed.set()

    got = Prefetched(source, torch.device("cpu"), depth=2)
    next(got)
    for _ in range(200):  # let the thread run ahead as far as it can
        if len(made) >= 4:
            break
        threading.Event().wait(0.01)
    assert len(made) <= 1 + 2 + 1  # the one taken, `depth` queued, one waiting for room
    got.close()
    assert closed.wait(timeout=60)
    assert len(made) < 10
    assert not got._thread.is_alive()


def test_closing_while_the_source_waits_on_its_workers_does_not_hang():
    release = threading.Event()

    def source():
        yield batch(0)
        release.wait(timeout=60)  # a batch still being decoded
        yield batch(1)

    got = Prefetched(source, torch.device("cpu"))
    next(got)
    threading.Timer(0.2, release.set).start()
    got.close()
    assert not got._thread.is_alive()


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_classify_with_batches_made_ahead_gives_the_rows_and_errors_made_in_line(built_index, tmp_path,
                                                                                  monkeypatch, decode):
    """What a CUDA run does (batches made by a thread ahead of the encoder), forced here on the CPU with
    2 workers over the messy folder: the same rows, scores and error reasons as in line."""
    import csv

    from click.testing import CliRunner

    from coder_index.pipeline import encode_images as classify_module
    from coder_index_cli.main import cli

    from images import make_messy_folder
    from scores import assert_same_ranking, csv_ranking

    folder = make_messy_folder(tmp_path / "messy")
    results = {}
    for ahead in (False, True):
        monkeypatch.setattr(classify_module, "prefetch_batches", lambda device, ahead=ahead: ahead)
        out = tmp_path / f"{ahead}.csv"
        res = CliRunner().invoke(cli, ["classify", str(folder), "--index", str(built_index.path), "--out", str(out),
                                       "--workers", "2", "--batch-size", "3", "--decode", decode, "-q"])
        assert res.exit_code == 0, res.output
        with open(out, newline="") as f:
            rows = {r["path"]: r for r in csv.DictReader(f)}
        with open(f"{out}.errors.csv", newline="") as f:
            errors = {r["path"]: r["error"] for r in csv.DictReader(f)}
        results[ahead] = rows, errors
    assert results[True][1] == results[False][1] and results[False][1]
    assert results[True][0].keys() == results[False][0].keys() and results[False][0]
    for path, row in results[False][0].items():  # the same batches: the same ranking, the stated tolerance
        assert_same_ranking(*csv_ranking(row), *csv_ranking(results[True][0][path]), what=path)
        assert row["method"] == results[True][0][path]["method"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none): the feed's "
                                                          "own CUDA stream")
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_batches_made_on_the_feeds_stream_equal_those_made_in_line(tmp_path, decode):
    """On a GPU: pixels made by the thread on its own stream and handed over with an event equal, bit
    for bit, the pixels made in line on the default stream (both feeds, the messy folder)."""
    import open_clip

    from coder_index.pipeline.feed import make_feed

    from images import make_messy_folder

    folder = make_messy_folder(tmp_path / "messy")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                   and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp") and not p.name.startswith("."))
    dev = torch.device("cuda")
    feed = make_feed(decode, open_clip.image_transform(224, is_train=False), dev)

    def made():
        from coder_index.pipeline.sources.files import FileUnit

        return feed.batches([FileUnit(n, str(folder / n), i) for i, n in enumerate(names)], batch_size=4,
                            workers=2)

    in_line = [(b.paths, b.pixels.clone() if b.pixels is not None else None, b.errors) for b in made()]
    with Prefetched(made, dev) as ahead:
        got = [(b.paths, b.pixels.clone() if b.pixels is not None else None, b.errors) for b in ahead]
    torch.cuda.synchronize()
    assert [(p, e) for p, _, e in got] == [(p, e) for p, _, e in in_line]
    for (_, a, _), (_, b, _) in zip(got, in_line, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
