"""The file edge: read and write PNG/TIFF images and stacks, and replay a stack as a frame stream."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from ..frame import Frame
from ..pipeline import Pipeline

__all__ = ["FileSource", "ImageFileError", "ImageInfo", "StackWriter", "channel_name", "check_output", "iter_planes",
           "read_image", "read_info", "read_stack", "write_image"]

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


# OME Pixels attributes carried from an input stack to its output
CARRIED = ("PhysicalSizeX", "PhysicalSizeXUnit", "PhysicalSizeY", "PhysicalSizeYUnit", "PhysicalSizeZ",
           "PhysicalSizeZUnit", "TimeIncrement", "TimeIncrementUnit")
OME_AXES = set("TZC")  # leading axes OME-XML can name (others: tifffile's own choice)


@dataclass
class ImageInfo:
    """What an output keeps of its input besides pixels: channel names and physical sizes (OME)."""

    channel_names: list[str] = field(default_factory=list)
    pixels: dict[str, Any] = field(default_factory=dict)  # the CARRIED attributes found

    def ome_metadata(self) -> dict[str, Any]:
        """tifffile OmeXml keyword arguments."""
        meta: dict[str, Any] = dict(self.pixels)
        if self.channel_names:
            meta["Channel"] = {"Name": list(self.channel_names)}
        return meta


def read_info(path: str | Path) -> ImageInfo:
    """Channel names and physical sizes from a TIFF's OME-XML (empty for PNG or plain TIFF)."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return ImageInfo()
    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
        if not xml:
            return ImageInfo()
        image = tifffile.xml2dict(xml)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    except (KeyError, TypeError, ValueError, tifffile.TiffFileError):
        return ImageInfo()
    channels = pixels.get("Channel", [])
    channels = channels if isinstance(channels, list) else [channels]
    names = [str(c.get("Name", "")) for c in channels if isinstance(c, dict)]
    return ImageInfo(names if all(names) else [], {k: pixels[k] for k in CARRIED if k in pixels})


def read_stack(path: str | Path) -> tuple[Any, str, ImageInfo]:
    """(pixels, axes, info) of any stored image: PNG/TIFF in memory, an OME-Zarr as its lazy level-0 array."""
    from .ngff import is_zarr, read_ngff

    path = Path(path)
    if is_zarr(path):
        return read_ngff(path)
    data, axes = read_image(path)
    return data, axes, read_info(path)


def check_output(path: Path, many: bool = False) -> None:
    """Refuse, before any computation, an output a run could not write (type, missing directory)."""
    suffix = path.suffix.lower()
    if many or not suffix:
        if not path.is_dir():
            raise ImageFileError(f"{path}: output directory does not exist (create it, or give a file name)")
        return
    if suffix not in (*TIFF_SUFFIXES, *PNG_SUFFIXES, ".zarr"):
        raise ImageFileError(f"{path}: cannot write {suffix!r} files (use .tif, .tiff, .png or .ome.zarr)")
    if suffix == ".zarr":
        try:
            import zarr  # noqa: F401
        except ImportError:
            raise ImageFileError(f"{path}: writing OME-Zarr needs zarr: pip install 'fm2s-stream[zarr]'") from None
    if not path.parent.is_dir():
        raise ImageFileError(f"{path}: directory {path.parent} does not exist")


class StackWriter:
    """Writes a stack's planes one BigTIFF page at a time; `finish` turns the file into OME-TIFF.

    Until then each page's description is a JSON note ("fm2s_partial", plane number, stack shape):
    a file left by Ctrl-C or a crash is a valid TIFF of the planes done, and `resume=True` appends
    to it after checking it holds the same stack. `done` is the number of planes already there.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, axes: str, info: ImageInfo,
                 resume: bool = False, overwrite: bool = False) -> None:
        self.path, self.shape, self.dtype, self.axes, self.info = path, tuple(shape), np.dtype(dtype), axes, info
        self.total = int(np.prod(self.shape[:-2]))
        self.done = 0
        if path.exists():
            if resume:
                self.done = self._partial_pages()
            elif not overwrite:
                raise ImageFileError(f"{path}: exists; pass --overwrite to replace it (or --resume to finish it)")
            else:
                path.unlink()
        self._writer = tifffile.TiffWriter(path, bigtiff=True, append=self.done > 0)

    def _partial_pages(self) -> int:
        try:
            with tifffile.TiffFile(self.path) as tif:
                note = json.loads(tif.pages[0].description or "{}")
                n = len(tif.pages)
        except (json.JSONDecodeError, tifffile.TiffFileError, OSError, IndexError):
            note, n = {}, 0
        same = note.get("stack_shape") == list(self.shape) and note.get("dtype") == self.dtype.str
        if not note.get("fm2s_partial") or not same:
            raise ImageFileError(f"{self.path}: not a partial output of this stack (shape {list(self.shape)}, "
                                 f"{self.dtype}); remove it or pass --overwrite")
        return n

    def write(self, plane: np.ndarray) -> None:
        """Append the next plane (flushed: a crash keeps it)."""
        # (not "shape": tifffile reads a JSON description with "shape" as its own shaped series)
        note = {"fm2s_partial": True, "plane": self.done, "of": self.total, "stack_shape": list(self.shape),
                "dtype": self.dtype.str, "axes": self.axes}
        self._writer.write(plane, photometric="minisblack", description=json.dumps(note), metadata=None,
                           contiguous=False)
        self._writer.filehandle.flush()
        self.done += 1

    def close(self) -> None:
        """Close the file as it is (partial: the planes done, readable, resumable)."""
        self._writer.close()

    def finish(self) -> None:
        """Close and write OME-XML (axes, channel names, physical sizes) into page 0."""
        self.close()
        if self.done != self.total:
            raise ImageFileError(f"{self.path}: {self.done} of {self.total} planes written; not finished")
        axes = self.axes if len(self.axes) == len(self.shape) and set(self.axes[:-2]) <= OME_AXES else None
        ome = tifffile.OmeXml()
        stored = (self.total, 1, 1, self.shape[-2], self.shape[-1], 1)
        ome.addimage(self.dtype, self.shape, stored, axes=axes,
                     **self.info.ome_metadata())
        tifffile.tiffcomment(self.path, comment=ome.tostring().encode("utf-8"), pageindex=0)


def iter_planes(data: np.ndarray) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Every 2D plane (index over the leading axes, plane) of an N-D stack, in C order."""
    lead = data.shape[:-2]
    for index in np.ndindex(*lead):
        yield index, data[index]


def write_image(path: str | Path, data: np.ndarray, overwrite: bool = False, axes: str | None = None,
                info: ImageInfo | None = None) -> None:
    """Write PNG (2D only) or TIFF (OME, with `info`'s names and sizes); never replace a file unless `overwrite`."""
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
        ome_axes = axes and len(axes) == data.ndim and set(axes[:-2]) <= OME_AXES
        metadata: dict[str, Any] = {"axes": axes} if ome_axes else {}
        metadata.update((info or ImageInfo()).ome_metadata())
        tifffile.imwrite(path, data, photometric="minisblack", ome=True, metadata=metadata)
    else:
        raise ImageFileError(f"{path}: unsupported output type {suffix!r} (use .png, .tif or .tiff)")



def channel_name(names: list[str], c: int | None, base: str = "default") -> str:
    """The channel a stack's C index stands for: its OME name, else `<base>-<c>` (`base` with no C axis)."""
    if c is None:
        return base
    return names[c] if len(names) > c else f"{base}-{c}"


class FileSource:
    """Replays the planes of an image file into a pipeline as a time-lapse, optionally paced."""

    def __init__(self, path: str | Path, channel: str = "default", fps: float = 0.0) -> None:
        self.path, self.channel, self.fps = Path(path), channel, fps
        self._stop = False

    def frames(self) -> Iterator[Frame]:
        """The file's planes as Frames, in file order: a C axis picks the channel (OME names, else
        `<channel>-<c>`), T/Z the frame's t/z, any other leading axis counts as T; frame_id = plane number."""
        data, axes, info = read_stack(self.path)
        names = info.channel_names
        lead = axes[:-2] if len(axes) == data.ndim else "T" * (data.ndim - 2)
        for i, index in enumerate(np.ndindex(*data.shape[:-2])):
            where = dict(zip(lead, index))
            c = where.get("C")
            channel = channel_name(names, c, self.channel)
            t = int(np.ravel_multi_index([index[k] for k, a in enumerate(lead) if a not in "CZ"],
                                         [data.shape[k] for k, a in enumerate(lead) if a not in "CZ"])) if any(
                a not in "CZ" for a in lead) else 0
            yield Frame(np.ascontiguousarray(data[index]), channel=channel, t=t, z=int(where.get("Z", 0)),
                        frame_id=i)

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
