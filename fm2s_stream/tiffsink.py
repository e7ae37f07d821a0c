"""TiffSink: crash-safe frame-by-frame BigTIFF writing, finalised to OME-TIFF on a clean close.

Each frame is one page with a JSON description (identity, metadata, processing fields), written
and flushed as it arrives, so a process killed with SIGKILL leaves a file that tifffile reads up to
the last complete page. On a clean close page 0's description is replaced by OME-XML (T and C axes,
channel names, per-plane timing, pixel size when known). Files are created exclusively (never
overwritten); a new file starts every `roll_every` frames, or when the frame shape or dtype changes.
A write error (disk full, directory gone) is reported, counted as a gap, and retried on a new file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import tifffile

from .frame import Result
from .sinks import Gaps

__all__ = ["Planes", "RollingFileSink", "TiffSink", "ome_xml", "safe_name"]

log = logging.getLogger(__name__)
KINDS = ("denoised", "raw")


def safe_name(text: str, limit: int = 48) -> str:
    """A file-name-safe rendering of `text` (no separators, no dots at the start, bounded length)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:limit]
    return cleaned or "x"


@dataclass
class Planes:
    """What the OME-XML needs of each page of a file, compactly (12 bytes a page, not its whole
    header: a file of 10,000 pages used to hold ~9 MB of header dicts until it was finalised)."""

    channels: list[str] = field(default_factory=list)  # in order of first appearance
    channel_of: array = field(default_factory=lambda: array("I"))  # per page: index into `channels`
    ts: array = field(default_factory=lambda: array("d"))  # per page: acquisition timestamp
    first: dict[str, Any] | None = None  # page 0's whole header (kept as an annotation)

    def append(self, header: dict[str, Any]) -> None:
        """Record one page from its header (needs "channel"; "ts" defaults to 0)."""
        if self.first is None:
            self.first = header
        name = header["channel"]
        if name not in self.channels:
            self.channels.append(name)
        self.channel_of.append(self.channels.index(name))
        self.ts.append(float(header.get("ts", 0.0)))

    def __len__(self) -> int:
        return len(self.ts)


@dataclass
class _OpenFile:
    path: Path
    handle: BinaryIO
    writer: tifffile.TiffWriter
    shape: tuple[int, ...]
    dtype: np.dtype
    planes: Planes = field(default_factory=Planes)


def ome_xml(planes: Planes, shape: tuple[int, ...], dtype: np.dtype, pixel_size_um: float | None = None) -> str:
    """OME-XML for the pages of one file.

    Channels are numbered in order of first appearance, T counts each channel's frames. If the pages
    interleave channels regularly (c0 c1 c0 c1 ...) one Image with a C axis results, else one
    Image per channel. Every page is mapped by an explicit TiffData IFD entry.
    """
    channels = planes.channels
    n_c = len(channels)
    regular = n_c > 0 and len(planes) % n_c == 0 and all(c == i % n_c for i, c in enumerate(planes.channel_of))
    groups = [list(range(n_c))] if regular else [[c] for c in range(n_c)]
    size = ""
    if pixel_size_um:
        size = f' PhysicalSizeX="{pixel_size_um}" PhysicalSizeY="{pixel_size_um}"'
    t0 = planes.ts[0] if len(planes) else 0.0
    images = []
    for gi, group in enumerate(groups):
        members = [i for i, c in enumerate(planes.channel_of) if c in group]
        size_t = max(sum(1 for i in members if planes.channel_of[i] == c) for c in group)
        counters = dict.fromkeys(group, 0)
        tiffdata, plane_xml = [], []
        for ifd in members:
            channel = planes.channel_of[ifd]
            c = group.index(channel)
            t = counters[channel]
            counters[channel] += 1
            tiffdata.append(f'<TiffData IFD="{ifd}" FirstC="{c}" FirstT="{t}" FirstZ="0" PlaneCount="1"/>')
            dt = planes.ts[ifd] - t0
            plane_xml.append(f'<Plane TheC="{c}" TheT="{t}" TheZ="0" DeltaT="{dt:.6f}" DeltaTUnit="s"/>')
        chan_xml = "".join(
            f'<Channel ID="Channel:{gi}:{ci}" Name={quoteattr(channels[c])} SamplesPerPixel="1"/>'
            for ci, c in enumerate(group)
        )
        name = "fm2s" if regular else channels[group[0]]
        images.append(
            f'<Image ID="Image:{gi}" Name={quoteattr(name)}>'
            f'<Pixels ID="Pixels:{gi}" DimensionOrder="XYCZT" Type="{dtype.name}" SizeX="{shape[1]}" '
            f'SizeY="{shape[0]}" SizeZ="1" SizeC="{len(group)}" SizeT="{size_t}"{size}>'
            f"{chan_xml}{''.join(tiffdata)}{''.join(plane_xml)}</Pixels></Image>"
        )
    first = escape(json.dumps(planes.first, default=str)) if planes.first is not None else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" Creator="fm2s_stream">'
        + "".join(images)
        + '<StructuredAnnotations><CommentAnnotation ID="Annotation:0" Namespace="fm2s_stream/page0">'
        f"<Value>{first}</Value></CommentAnnotation></StructuredAnnotations></OME>"
    )


class RollingFileSink:
    """What TiffSink and the Zarr sink share: one file per run of frames, named
    `<directory>/<prefix>_<kind>_<NNN><SUFFIX>`, created exclusively (never overwritten), rolled every
    `roll_every` frames and on a shape or dtype change; a disk error is recorded as a gap and writing
    is retried in a new file after `retry_s`. Subclasses make (`_create`, raising FileExistsError for a
    path taken), fill (`_append`) and finish (`_finish`, `_abandon`) one file; `_frames` counts its frames.
    """

    SUFFIX = ""
    LABEL = ""

    def __init__(self, directory: str | Path, kind: str = "denoised", prefix: str = "fm2s",
                 roll_every: int = 10_000, pixel_size_um: float | None = None, retry_s: float = 2.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.directory = Path(directory)
        self.kind = kind
        self.prefix = safe_name(prefix)
        self.roll_every = roll_every
        self.pixel_size_um = pixel_size_um
        self.retry_s = retry_s
        self.name = f"{self.LABEL}-{kind}"
        self.files: list[Path] = []
        self.finalised: list[Path] = []
        self.gaps = Gaps(self.name, self.directory)
        self.written = 0
        self._file: Any = None
        self._next_index = 0
        self._failed_at: float | None = None

    def open(self) -> None:
        """Create the directory (the first file is created with the first frame)."""
        self.directory.mkdir(parents=True, exist_ok=True)

    def _new_file(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        while True:
            path = self.directory / f"{self.prefix}_{self.kind}_{self._next_index:03d}{self.SUFFIX}"
            self._next_index += 1
            try:
                f = self._create(path, shape, dtype)
            except FileExistsError:
                continue
            self.files.append(path)
            log.info("writing %s", path)
            return f

    def write(self, result: Result) -> None:
        """Store one frame before returning (a crash keeps it); raise OSError if it could not be."""
        pixels = result.pixels if self.kind == "denoised" else result.frame.pixels
        now = time.monotonic()
        if self._failed_at is not None and now - self._failed_at < self.retry_s:
            self.gaps.record(result.frame.frame_id, self.gaps.last_reason())
            raise OSError(f"{self.name}: frame {result.frame.frame_id} not written (disk unavailable)")
        f = self._file
        try:
            if f is not None and (f.shape != pixels.shape or f.dtype != pixels.dtype
                                  or self._frames(f) >= self.roll_every):
                self._finish(f)
                f = self._file = None
            if f is None:
                f = self._file = self._new_file(pixels.shape, pixels.dtype)
            header = {**result.frame.identity(), "meta": result.frame.meta, "kind": self.kind}
            if self.kind == "denoised":
                header["fm2s"] = result.processing()
            self._append(f, np.ascontiguousarray(pixels), header)
            self.written += 1
            self._failed_at = None
            self.gaps.recovered()
        except OSError as exc:
            self._failed_at = now
            self.gaps.record(result.frame.frame_id, f"{type(exc).__name__}: {exc}")
            f, self._file = self._file, None
            if f is not None:
                self._abandon(f)
            raise

    def close(self) -> None:
        """Finalise the open file."""
        f, self._file = self._file, None
        if f is not None:
            self._finish(f)
        self.gaps.close()

    def stats(self) -> dict[str, Any]:
        """Files, frames written and gaps, for reports."""
        return {"files": [str(p) for p in self.files], "written": self.written, "gaps": self.gaps}

    # -- one file (subclasses) ----------------------------------------------------------------------
    def _create(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        raise NotImplementedError

    def _frames(self, f: Any) -> int:
        raise NotImplementedError

    def _append(self, f: Any, pixels: np.ndarray, header: dict[str, Any]) -> None:
        raise NotImplementedError

    def _finish(self, f: Any) -> None:
        raise NotImplementedError

    def _abandon(self, f: Any) -> None:
        """Drop a broken file after a disk error (what was written before stays readable)."""


class TiffSink(RollingFileSink):
    """Writes denoised (or raw) frames to `<directory>/<prefix>_<kind>_<NNN>.ome.tif`: one flushed BigTIFF
    page per frame with a JSON description; OME-XML into page 0 when the file is finished."""

    SUFFIX = ".ome.tif"
    LABEL = "tiff"

    def __init__(self, directory: str | Path, kind: str = "denoised", prefix: str = "fm2s",
                 roll_every: int = 10_000, pixel_size_um: float | None = None, retry_s: float = 2.0,
                 fsync_every: int = 0) -> None:
        super().__init__(directory, kind, prefix, roll_every, pixel_size_um, retry_s)
        self.fsync_every = fsync_every

    def _create(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> _OpenFile:
        handle: BinaryIO = open(path, "xb")  # noqa: SIM115 - owned by _OpenFile until close
        return _OpenFile(path, handle, tifffile.TiffWriter(handle, bigtiff=True), shape, dtype)

    def _frames(self, f: _OpenFile) -> int:
        return len(f.planes)

    def _append(self, f: _OpenFile, pixels: np.ndarray, header: dict[str, Any]) -> None:
        f.writer.write(pixels, contiguous=False, description=json.dumps(header, default=str),
                       metadata=None, photometric="minisblack")
        f.handle.flush()
        if self.fsync_every and (len(f.planes) + 1) % self.fsync_every == 0:
            os.fsync(f.handle.fileno())
        f.planes.append(header)

    def _abandon(self, f: _OpenFile) -> None:
        for closer in (f.writer.close, f.handle.close):
            try:
                closer()
            except Exception as exc:  # the disk is already failing; report, keep going
                log.warning("%s: closing %s after an error: %s", self.name, f.path, exc)

    def _finish(self, f: _OpenFile) -> None:
        f.writer.close()
        f.handle.close()
        if not f.planes:
            return
        xml = ome_xml(f.planes, f.shape, f.dtype, self.pixel_size_um)
        tifffile.tiffcomment(f.path, comment=xml.encode("ascii", "xmlcharrefreplace"), pageindex=0)
        self.finalised.append(f.path)
