"""The file edge: read and write PNG/TIFF images and stacks, and replay a stack as a frame stream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from ..frame import Frame
from ..pipeline import Pipeline

__all__ = ["FileSource", "ImageFileError", "iter_planes", "read_image", "write_image"]

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)


class ImageFileError(ValueError):
    """An image file that cannot be read or written, with a message a user can act on."""


def read_image(path: str | Path) -> tuple[np.ndarray, str]:
    """(pixels, axes) of a PNG or TIFF file; axes like "YX", "TYX", "TCYX" (tifffile's names)."""
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                data, axes = series.asarray(), series.axes
        elif suffix in PNG_SUFFIXES:
            with Image.open(path) as im:
                data = np.asarray(im)
            axes = "YXS" if data.ndim == 3 else "YX"
        else:
            raise ImageFileError(f"{path}: unsupported file type {suffix!r} (use .png, .tif or .tiff)")
    except (tifffile.TiffFileError, UnidentifiedImageError, OSError, ValueError, IndexError) as exc:
        if isinstance(exc, ImageFileError):
            raise
        raise ImageFileError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    if data.dtype == np.int32 and suffix in PNG_SUFFIXES:  # PIL reads 16-bit PNGs as int32 ("I")
        data = data.astype(np.uint16)
    if "S" in axes or (data.ndim >= 3 and data.shape[-1] in (3, 4) and axes.endswith("S")):
        raise ImageFileError(f"{path}: colour (RGB) images are not supported; give a grey frame")
    return data, axes


def iter_planes(data: np.ndarray) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Every 2D plane (index over the leading axes, plane) of an N-D stack, in C order."""
    lead = data.shape[:-2]
    for index in np.ndindex(*lead):
        yield index, data[index]


def write_image(path: str | Path, data: np.ndarray, overwrite: bool = False, axes: str | None = None) -> None:
    """Write PNG (2D only) or TIFF; refuse to replace an existing file unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ImageFileError(f"{path}: exists; pass --overwrite to replace it")
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in PNG_SUFFIXES:
        if data.ndim != 2:
            raise ImageFileError(f"{path}: PNG holds one 2D frame; write stacks as .tif")
        Image.fromarray(data).save(path)
    elif suffix in TIFF_SUFFIXES:
        metadata = {"axes": axes} if axes and len(axes) == data.ndim else None
        tifffile.imwrite(path, data, photometric="minisblack", metadata=metadata)
    else:
        raise ImageFileError(f"{path}: unsupported output type {suffix!r} (use .png, .tif or .tiff)")


class FileSource:
    """Replays the planes of an image file into a pipeline as a time-lapse, optionally paced."""

    def __init__(self, path: str | Path, channel: str = "default", fps: float = 0.0) -> None:
        self.path, self.channel, self.fps = Path(path), channel, fps
        self._stop = False

    def frames(self) -> Iterator[Frame]:
        """The file's planes as Frames (t = plane index, frame_id = plane index)."""
        data, _ = read_image(self.path)
        planes = data.reshape(-1, *data.shape[-2:]) if data.ndim > 2 else data[None]
        for i, plane in enumerate(planes):
            yield Frame(np.ascontiguousarray(plane), channel=self.channel, t=i, frame_id=i)

    def start(self, pipeline: Pipeline) -> None:
        """Submit every plane (blocking; paced at `fps` when > 0)."""
        t0 = time.perf_counter()
        for i, frame in enumerate(self.frames()):
            if self._stop:
                break
            if self.fps > 0:
                time.sleep(max(0.0, t0 + i / self.fps - time.perf_counter()))
            frame.received = time.perf_counter()
            pipeline.submit(frame)

    def stop(self) -> None:
        """Stop after the current frame."""
        self._stop = True
