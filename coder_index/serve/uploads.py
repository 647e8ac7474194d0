"""Uploaded images -> preprocessed pixel tensors, or a 4xx naming every file that is not usable.

Each file is bounded in bytes (while it is read) and in pixels (from its header, before decoding),
then decoded exactly as `classify` decodes files on disk (``pipeline.decode``), so an upload and the
same file in a folder give the same row.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from coder_index.core.decode import ImageDecodeError, ImageTooLarge, declared_pixels, decode_image_bytes


class UploadRejected(Exception):
    """An HTTP error with a message for the user, and per-file reasons where files were at fault."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.errors = status, detail, errors or []


@dataclass
class Upload:
    name: str
    data: bytes


def check_count(n: int, max_files: int) -> None:
    if n == 0:
        raise UploadRejected(400, "no image uploaded: send one or more files in the multipart form field 'files'")
    if n > max_files:
        raise UploadRejected(413, f"{n} files in one request; at most {max_files} are accepted: split the request")


def preprocess_uploads(uploads: list[Upload], preprocess: Callable[[Any], torch.Tensor],
                       max_pixels: int, budget: Any = None) -> torch.Tensor:
    """``[N, 3, H, W]`` for the uploads, in order; every bad file is named in one 4xx. With
    ``budget`` (a ``PixelBudget``), each image's decoded pixels are held from it until preprocessed."""
    tensors, errors = [], []
    status = 400
    for i, up in enumerate(uploads):
        try:
            if budget is None:
                tensors.append(preprocess(decode_image_bytes(up.data, max_pixels)))
            else:
                with budget.hold(declared_pixels(io.BytesIO(up.data))):
                    tensors.append(preprocess(decode_image_bytes(up.data, max_pixels)))
        except ImageTooLarge as exc:
            status = 413
            errors.append({"file": up.name, "index": i, "reason": str(exc)})
        except ImageDecodeError as exc:
            errors.append({"file": up.name, "index": i, "reason": str(exc)})
        except Exception as exc:  # a strange image that decodes but fails preprocessing: the user's file, not a bug
            errors.append({"file": up.name, "index": i, "reason": f"could not preprocess: {exc.__class__.__name__}"})
    if errors:
        names = "; ".join(f"{e['file']!r}: {e['reason']}" for e in errors[:5])
        raise UploadRejected(status, f"{len(errors)} of {len(uploads)} upload(s) could not be used as images "
                                     f"({names}); nothing was classified", errors)
    return torch.stack(tensors)
