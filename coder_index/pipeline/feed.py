"""The feed: files -> model-ready pixels on the encoder's device, as one swappable stage of the runner.

Two feeds, chosen by ``--decode``:

* ``ReferenceFeed`` (``cpu``): open_clip's own preprocessing, byte for byte. Worker processes decode
  with Pillow (``decode.load_image``: every odd file handled, every failure a reason) and apply the
  model's geometric transforms (resize, crop, RGB); the 8-bit result crosses to this process and to
  the device as uint8; ``ToTensor`` and ``Normalize`` (a division and two elementwise operations,
  exact in IEEE float32 on any device) run there. The result equals ``preprocess(image)`` exactly.
* ``TensorFeed`` (``gpu``): complete baseline/progressive RGB or grayscale JPEGs are read as bytes
  by the workers and decoded in batches where the encoder runs (torchvision's ``decode_jpeg``:
  nvJPEG on a GPU, libjpeg-turbo on the CPU), EXIF orientation applied, then resized (bicubic,
  antialiased), center-cropped and normalised there. Every other file (PNG, WebP, BMP, 16-bit,
  CMYK JPEGs, palette images, truncated or broken JPEGs, anything the tensor decoder refuses) goes
  through the reference path, so it keeps its exact pixels, row and error reason. Agreement with
  the reference is measured in ``benchmarks/bench_gpu.py --only agreement`` and stated in the README.

Pixels never cross a process boundary or the PCIe bus as float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from coder_index.core.choices import DECODE_CHOICES
from coder_index.core.decode import ImageDecodeError, decode_image_bytes, jpeg_has_end_marker, load_image_from
from coder_index.core.remote import RemoteError
from coder_index.pipeline.sources.base import ItemError, ReadFailure, Sample, UnitDone


@dataclass
class FedBatch:
    samples: list[Sample]          # the images in ``pixels``, in order (their bytes dropped)
    pixels: torch.Tensor | None    # [n, 3, H, W] float32 ([n * views, ...] with views), normalised, on the device
    errors: list[ItemError]        # images that cannot be classified (final)
    failures: list[ReadFailure] = field(default_factory=list)  # what could not be read (retried by a rerun)
    done: list[UnitDone] = field(default_factory=list)         # units (or parts) read to their end

    @property
    def paths(self) -> list[str]:
        return [s.row for s in self.samples]

    @property
    def positions(self) -> list[int]:
        """Where each image's unit stands in the list given to ``batches``."""
        return [s.position for s in self.samples]


@dataclass(frozen=True)
class Views:
    """Several random views of each image instead of its one preprocessed picture (the few-shot
    support set's augmentations): ``geometry`` (PIL -> PIL, random) is applied ``count`` times, with
    torch's generator seeded per (``seed``, the item's position, the view) so that any worker makes
    the same views. ``tensor`` (PIL -> normalised float tensor) replaces geometry + the model's
    normalisation for a preprocessing that cannot be split. ``prefixes``: view counts whose means are
    also wanted (the first n views of each image: the Tip-Adapter baseline averages fewer views than
    CODER-Adapter, and the first n views are the same in both, so they are encoded once)."""

    geometry: Callable[[Any], Any]
    count: int
    seed: int
    tensor: Callable[[Any], Any] | None = None
    prefixes: tuple[int, ...] = ()

    def make(self, image: Any, position: int, parts: PreprocessParts | None) -> torch.Tensor:
        views = []
        for e in range(self.count):
            torch.manual_seed(self.seed * 1_000_003 + position * 1_009 + e)  # reproducible in any worker
            views.append(to_uint8_chw(self.geometry(image)) if parts is not None else self.tensor(image))
        return torch.stack(views)


@dataclass(frozen=True)
class PreprocessParts:
    """open_clip's preprocessing split where it turns into a tensor: ``geometry`` (PIL -> PIL: resize,
    crop, RGB), then ToTensor and ``normalize`` (a torchvision Normalize, applied to batches)."""

    geometry: Callable[[Any], Any]
    normalize: Any
    shortest_side: int | None      # Resize(int) to the shorter side, bicubic (what TensorFeed reproduces)
    crop: tuple[int, int] | None   # CenterCrop size


def split_preprocess(preprocess: Any) -> PreprocessParts | None:
    """The parts of an open_clip ``Compose`` (Resize, CenterCrop, MaybeConvertMode, ToTensor,
    Normalize); None when it has another shape (then pixels travel as the full preprocess makes them)."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    at = next((i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
    if at is None or len(steps) != at + 2 or not isinstance(steps[at + 1], T.Normalize):
        return None
    geometry = T.Compose(steps[:at])
    side, crop = None, None
    if len(steps[:at]) >= 2 and isinstance(steps[0], T.Resize) and isinstance(steps[1], T.CenterCrop):
        size, mode = steps[0].size, steps[0].interpolation
        if (isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1)) and \
                mode == T.InterpolationMode.BICUBIC and steps[0].max_size is None:
            side = int(size if isinstance(size, int) else size[0])
            crop = tuple(int(v) for v in steps[1].size)  # type: ignore[assignment]
    return PreprocessParts(geometry, steps[at + 1], side, crop)


def to_uint8_chw(image: Any) -> torch.Tensor:
    """A PIL RGB image as a uint8 [3, H, W] tensor (what ToTensor reads, before its division)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def normalized(pixels: torch.Tensor, parts: PreprocessParts) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> ToTensor's float32 (x / 255) -> Normalize: the ops of the reference."""
    return parts.normalize(pixels.to(torch.float32).div(255))


# ---------------------------------------------------------------------------------------------- workers
def _is_plain_jpeg(data: bytes) -> bool:
    """A complete JPEG of 1 or 3 components (grayscale, YCbCr): what the tensor decoder takes. CMYK
    and YCCK JPEGs (4 components) and files that stop before their end marker go the reference way."""
    if not data.startswith(b"\xff\xd8\xff") or not jpeg_has_end_marker(data):
        return False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame
            return i + 9 < n and data[i + 9] in (1, 3)
        if marker == 0xDA:  # start of scan before any frame header: not a JPEG we know
            return False
        i += 2 + length
    return False


class _UnitStream(IterableDataset):
    """The units' events, read and decoded in the workers: each worker reads its own units (one-image
    units in blocks of a batch, in turn, so that they come back in their order; larger ones one by
    one, in turn), turning
    each ``Sample`` into ``("pixels", sample, uint8 [3, H, W])`` (``[views, 3, H, W]`` with ``views``),
    ``("jpeg", sample, bytes)`` for the tensor decoder, or ``("error", ItemError)``; the other events
    pass as ``("failed", ReadFailure)``, ``("done", UnitDone)``, and a refusal as ``("fatal", text)``."""

    def __init__(self, units: list[Any], batch_size: int, preprocess: Any, parts: PreprocessParts | None,
                 jpeg_bytes: bool, views: Views | None = None) -> None:
        # one-image units go to the workers a batch at a time (so that they come back in their order);
        # larger units (shards, row groups) one at a time, in turn
        self.units = units
        self.block = max(1, batch_size) if units and units[0].single else 1
        self.preprocess, self.parts, self.jpeg_bytes, self.views = preprocess, parts, jpeg_bytes, views

    def __iter__(self) -> Iterator[tuple[str, Any, Any]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, unit in enumerate(self.units):
            if (i // self.block) % workers != worker:
                continue
            try:
                for event in unit.read():
                    if isinstance(event, Sample):
                        yield self._decode(event)
                    elif isinstance(event, ItemError):
                        yield "error", event, None
                    elif isinstance(event, ReadFailure):
                        yield "failed", event, None
                    else:
                        yield "done", event, None
            except RemoteError as exc:
                if exc.everywhere:  # a refusal for every unit: the run stops, in the main process
                    yield "fatal", str(exc), None
                    return
                yield "failed", ReadFailure(unit.name, f"not read: {exc}"), None
            except Exception as exc:  # a reader's own failure on strange data must not kill the run
                yield "failed", ReadFailure(unit.name, f"could not be read: {exc.__class__.__name__}: {exc}"), None

    def _decode(self, sample: Sample) -> tuple[str, Any, Any]:
        try:
            if self.jpeg_bytes and self.views is None and sample.jpeg_named():
                data = sample.read()
                if _is_plain_jpeg(data):
                    return "jpeg", sample.without_bytes(), torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return "pixels", sample.without_bytes(), self._pixels(decode_image_bytes(data), sample.position)
            with sample.open() as fh:
                image = load_image_from(fh)
            return "pixels", sample.without_bytes(), self._pixels(image, sample.position)
        except ImageDecodeError as exc:
            return "error", ItemError(sample.row, str(exc)), None
        except FileNotFoundError:
            return "failed", ReadFailure(sample.row, "not read: no such file (removed while running?)"), None
        except PermissionError:
            return "failed", ReadFailure(sample.row, "not read: permission denied"), None
        except OSError as exc:
            from coder_index.core.untrusted import NotARegularFile

            if isinstance(exc, (NotARegularFile, IsADirectoryError)):
                return "error", ItemError(sample.row, "skipped: not a regular file (FIFO, socket, device or "
                                                      "directory)", "FIFO(s), socket(s) or device(s)"), None
            return "failed", ReadFailure(sample.row, f"not read: {exc.strerror or exc}"), None
        except Exception as exc:  # a preprocessing failure on a strange image must not kill the run
            return "error", ItemError(sample.row, f"could not preprocess: {exc.__class__.__name__}: {exc}"), None

    def _pixels(self, image: Any, position: int) -> torch.Tensor:
        if self.views is not None:
            return self.views.make(image, position, self.parts)
        return reference_pixels(image, self.preprocess, self.parts)


def reference_pixels(image: Any, preprocess: Any, parts: PreprocessParts | None) -> torch.Tensor:
    """The reference preprocessing of a decoded image, stopped before ToTensor: uint8 [3, H, W]
    (float32 only for a preprocess of another shape, which cannot be split)."""
    if parts is None:
        return preprocess(image)
    return to_uint8_chw(parts.geometry(image))


def _collate(samples: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    return samples


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process owns the cores for encoding


def _loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                      worker_init_fn=_worker_init if workers else None, prefetch_factor=4 if workers else None,
                      persistent_workers=False)


# ---------------------------------------------------------------------------------------------- feeds
class ReferenceFeed:
    """open_clip's preprocessing, exactly; uint8 from the workers and over the bus."""

    name = "cpu"

    def __init__(self, preprocess: Any, device: torch.device) -> None:
        self.preprocess, self.device = preprocess, torch.device(device)
        self.parts = split_preprocess(preprocess)

    def batches(self, units: list[Any], *, batch_size: int, workers: int,
                views: Views | None = None) -> Iterator[FedBatch]:
        """Batches of the units' images (``sources``: files, URLs, shards, row groups), with their
        errors, read failures and units read to their end; one-image units in their order. With
        ``views``, each image's ``views.count`` augmented views, consecutive in ``pixels``."""
        stream = _UnitStream(units, batch_size, self.preprocess, self.parts, jpeg_bytes=False, views=views)
        for events in _loader(stream, batch_size, workers):
            yield self._assemble(events, {})

    def _assemble(self, events: list[tuple[str, Any, Any]], decoded: dict[int, torch.Tensor]) -> FedBatch:
        """One batch from the workers' events and the tensor decoder's images (by event index): images in
        the order of the events, whichever way each was decoded."""
        fatal = next((payload for kind, payload, _ in events if kind == "fatal"), None)
        if fatal is not None:
            raise RemoteError(fatal, fatal=True, everywhere=True)
        errors = [payload for kind, payload, _ in events if kind == "error"]
        failures = [payload for kind, payload, _ in events if kind == "failed"]
        done = [payload for kind, payload, _ in events if kind == "done"]
        ready = [k for k, (kind, _, _) in enumerate(events) if kind == "pixels"]
        pieces = []
        if ready:
            stacked = torch.stack([events[k][2] for k in ready])
            if stacked.dim() == 5:  # views: [n, views, 3, H, W] -> consecutive rows
                stacked = stacked.flatten(0, 1)
            if self.device.type == "cuda":
                stacked = stacked.pin_memory()
            stacked = stacked.to(self.device, non_blocking=True)
            pieces.append(normalized(stacked, self.parts) if self.parts is not None and stacked.dtype == torch.uint8
                          else stacked.float())
        if decoded:
            pieces.append(torch.stack(list(decoded.values())))
        taken = ready + list(decoded)
        if not taken:
            return FedBatch([], None, errors, failures, done)
        pixels = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        order = sorted(range(len(taken)), key=lambda j: taken[j])
        if order != list(range(len(taken))):  # only when both decoders made images (never with views)
            pixels = pixels[torch.tensor(order, device=pixels.device)]
            taken = [taken[j] for j in order]
        return FedBatch([events[k][1] for k in taken], pixels, errors, failures, done)


class TensorFeed(ReferenceFeed):
    """JPEGs decoded in batches on the device (nvJPEG on a GPU, libjpeg-turbo on the CPU), resized,
    cropped and normalised there; every other file the reference way."""

    name = "gpu"

    def __init__(self, preprocess: Any, device: torch.device) -> None:
        super().__init__(preprocess, device)
        if self.parts is None or self.parts.shortest_side is None:
            raise ValueError("--decode gpu reproduces a Resize(shorter side, bicubic) + CenterCrop preprocessing; "
                             "this model's preprocessing has another shape: use --decode cpu")

    def batches(self, units: list[Any], *, batch_size: int, workers: int,
                views: Views | None = None) -> Iterator[FedBatch]:
        if views is not None:  # augmented views are Pillow's geometry: the reference path makes them
            yield from super().batches(units, batch_size=batch_size, workers=workers, views=views)
            return
        stream = _UnitStream(units, batch_size, self.preprocess, self.parts, jpeg_bytes=True)
        for events in _loader(stream, batch_size, workers):
            jpegs = [(k, sample.row, data) for k, (kind, sample, data) in enumerate(events) if kind == "jpeg"]
            decoded, refused = self._decode(jpegs)
            for k in refused:  # the tensor decoder said no: the reference path decides (pixels or reason)
                sample, data = events[k][1], events[k][2]
                try:
                    image = decode_image_bytes(data.numpy().tobytes())
                    events[k] = ("pixels", sample, reference_pixels(image, self.preprocess, self.parts))
                except ImageDecodeError as exc:
                    events[k] = ("error", ItemError(sample.row, str(exc)), None)
            yield self._assemble(events, decoded)

    def _decode(self, jpegs: list[tuple[int, str, torch.Tensor]]) -> tuple[dict[int, torch.Tensor], list[int]]:
        """{sample index: normalised [3, S, S]} of the JPEGs decoded on the device, and the sample
        indices of those it refused."""
        if not jpegs:
            return {}, []
        import warnings

        with warnings.catch_warnings():  # torchvision 0.29 announces TorchCodec as its successor: noted in README
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._decode_jpegs(jpegs)

    def _decode_jpegs(self, jpegs: list[tuple[int, str, torch.Tensor]]) -> tuple[dict[int, torch.Tensor], list[int]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [d for _, _, d in jpegs]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
            ok = list(range(len(jpegs)))
        except Exception:  # one bad file fails the batch (or the build lacks a decoder): one by one
            images, ok = [], []
            for k, d in enumerate(data):
                try:
                    images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device,
                                              apply_exif_orientation=True))
                    ok.append(k)
                except Exception:  # refused here: the reference decoder decides (pixels or a reason)
                    pass
        refused = [jpegs[k][0] for k in range(len(jpegs)) if k not in set(ok)]
        # Sizes differ from image to image, so each is resized on its own (one kernel each, on the
        # device); the batch is then one tensor for the normalisation and the encoder.
        out = [(jpegs[k][0], self._geometry(img)) for k, img in zip(ok, images, strict=True)]
        if not out:
            return {}, refused
        pixels = normalized(torch.stack([t for _, t in out]), self.parts)  # type: ignore[arg-type]
        return {k: px for (k, _), px in zip(out, pixels, strict=True)}, refused

    def _geometry(self, image: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side (bicubic, antialiased, as PIL does) and center-crop: uint8 [3, S, S]."""
        from torchvision.transforms.v2 import functional as F

        parts = self.parts
        assert parts is not None and parts.shortest_side is not None and parts.crop is not None
        image = F.resize(image, [parts.shortest_side], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        return F.center_crop(image, list(parts.crop))


def resolve_decode(decode: str, device: Any, *, released: bool = False, probe: bool = True) -> str:
    """``--decode`` as ``cpu`` or ``gpu``, the one rule every command uses: ``auto`` is the tensor
    decoder on a CUDA device whose torchvision decodes JPEGs there, and the reference everywhere else
    and always for a ``--preset cvpr24`` index (``released``: it reproduces the released numbers).
    ``probe=False`` for a device elsewhere (Ray's GPU actors): its torchvision is not asked here."""
    if decode not in DECODE_CHOICES:
        raise ValueError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
    if decode != "auto":
        return decode
    on_cuda = getattr(device, "type", str(device).split(":")[0]) == "cuda"
    if not on_cuda or released:
        return "cpu"
    return "gpu" if not probe or tensor_decoder_works(torch.device(device)) else "cpu"


def make_feed(mode: str, preprocess: Any, device: torch.device) -> ReferenceFeed:
    """The feed for ``--decode`` (``resolve_decode``): ``cpu`` the reference, ``gpu`` the tensor decoder
    on the encoder's device (libjpeg-turbo when that is the CPU)."""
    device = torch.device(device)
    mode = resolve_decode(mode, device)
    if mode == "gpu" and not tensor_decoder_works(device):
        raise ValueError(f"--decode gpu: torchvision cannot decode JPEGs on {device} here ({_PROBED[str(device)]}); "
                         "use --decode cpu")
    return TensorFeed(preprocess, device) if mode == "gpu" else ReferenceFeed(preprocess, device)


_PROBED: dict[str, str | None] = {}


def tensor_decoder_works(device: torch.device) -> bool:
    """Whether torchvision decodes a JPEG on ``device`` in this installation (probed once per device
    with an 8 x 8 image: a build without nvJPEG says so here, not file after file)."""
    key = str(device)
    if key not in _PROBED:
        import io
        import warnings

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from torchvision.io import ImageReadMode, decode_jpeg

                decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), mode=ImageReadMode.RGB,
                            device=device, apply_exif_orientation=True)
            _PROBED[key] = None
        except Exception as exc:
            _PROBED[key] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return _PROBED[key] is None


# ---------------------------------------------------------------------------------------------- overlap
class Prefetched:
    """A feed's batches made by a thread, up to ``depth`` ahead of the caller: batch n+1 is received
    from the workers, decoded (on a GPU: nvJPEG, resize, normalise) and copied to the device while the
    caller encodes and scores batch n. On CUDA the thread queues its work on a stream of its own, and
    each batch is handed over with an event the caller's stream waits on, so the two overlap on the
    device too. Batches keep their order; an error in the feed is raised by the caller's ``next``;
    ``close`` (also on leaving a ``with`` block) stops the thread and the workers it reads from."""

    def __init__(self, batches: Callable[[], Iterator[FedBatch]], device: torch.device, depth: int = 2) -> None:
        import queue
        import threading

        self.device = torch.device(device)
        self._queue: Any = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, args=(batches,), name="coder-index-feed", daemon=True)
        self._thread.start()

    def _run(self, batches: Callable[[], Iterator[FedBatch]]) -> None:
        import contextlib

        made = None
        try:
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                made = batches()
                for batch in made:
                    ready = None
                    if self._stream is not None:
                        ready = torch.cuda.Event()
                        ready.record(self._stream)
                    if not self._put(("batch", batch, ready)):
                        return
            self._put(("end", None, None))
        except BaseException as exc:  # handed to the caller, who raises it
            self._put(("error", exc, None))
        finally:
            close = getattr(made, "close", None)
            if close is not None:
                close()  # the loader's workers stop here, in the thread that iterated them

    def _put(self, item: tuple[str, Any, Any]) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self) -> FedBatch:
        if self._done:
            raise StopIteration
        kind, payload, ready = self._queue.get()
        if kind != "batch":
            self._done = True
            self._thread.join()
            if kind == "error":
                raise payload
            raise StopIteration
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            if payload.pixels is not None:
                payload.pixels.record_stream(current)  # made on the feed's stream, used on this one
        return payload

    def close(self, wait: float = 30.0) -> None:
        """Stop the thread: a put waiting for room returns at once, a batch being made is finished
        first. After ``wait`` seconds (workers that died without a word: the loader notices within
        seconds) it is left to end on its own; it never holds the process open."""
        import queue
        import time

        self._done = True
        self._stop.set()
        give_up = time.monotonic() + wait
        while self._thread.is_alive() and time.monotonic() < give_up:
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass

    def __enter__(self) -> Prefetched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
