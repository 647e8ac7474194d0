"""A folder of image files, walked in a stable order (each folder's entries sorted), streamed: ten
million files are never one list. Rows name files ``FOLDER/relative/path`` (the folder as given,
normalised), so that one ``--out`` reused for another folder cannot collide.

Only regular files with an image extension are units. A FIFO, socket or device named like an image,
a link to one, is a final error row; a broken link or an entry that cannot be examined is a read
failure (a rerun looks again). Hidden files and folders and files without an image extension are
counted for the summary, not classified.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coder_index.pipeline.discover import Discovery, walk_images
from coder_index.pipeline.sources.base import ItemError, Listing, ReadFailure
from coder_index.pipeline.sources.files import FileUnit


class FolderSource:
    units_per_task = 64

    def __init__(self, folder: str | Path) -> None:
        self.root = Path(folder)
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is not a directory; pass the folder that holds the images, or "
                                     "image files")
        self.prefix = Path(os.path.normpath(folder)).as_posix().rstrip("/") + "/"
        self.what = f"{folder} holds"
        self.listing = Listing()

    def units(self) -> Iterator[FileUnit | ItemError | ReadFailure]:
        stats = Discovery(self.root, [], 0)
        top = os.path.abspath(self.root)
        reported = 0
        for position, rel in enumerate(walk_images(self.root, stats)):
            yield from self._skipped(stats, reported)
            reported = len(stats.special)
            yield FileUnit(self.prefix + rel, os.path.join(top, rel), position)
        yield from self._skipped(stats, reported)
        self.listing.hidden, self.listing.other_files = stats.hidden, stats.other_files

    def _skipped(self, stats: Discovery, start: int) -> Iterator[ItemError | ReadFailure]:
        for rel, why in stats.special[start:]:
            if "broken symbolic link" in why or not why.endswith("not a regular file"):
                yield ReadFailure(self.prefix + rel, why.replace("skipped:", "not read:", 1))
            elif "a directory" in why:
                yield ItemError(self.prefix + rel, why, "folder(s) named as image files")
            else:
                yield ItemError(self.prefix + rel, why, "FIFO(s), socket(s) or device(s)")

    def record(self) -> dict[str, Any]:
        return {"cwd": os.getcwd(), "kind": "folder", "folders": [os.path.abspath(self.root)]}
