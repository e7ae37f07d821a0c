"""The OME-Zarr edge (extra `[zarr]`): read NGFF 0.4 and 0.5 images, write NGFF 0.5 (zarr v3) plane by plane.

We write with zarr-python and a small NGFF metadata model of our own (`multiscales` with one level,
axes with types and units, a scale transformation, `omero` channel labels), tested against the
`ome-zarr` reader: it keeps the dependency to one maintained library that also reads, and each
plane is its own chunk so that any process (a Dask worker) can write any plane.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..tiffsink import RollingFileSink
from .files import ImageFileError, ImageInfo

__all__ = ["NGFF_VERSION", "NgffWriter", "ZarrSink", "is_zarr", "ngff_attrs", "read_ngff"]


NGFF_VERSION = "0.5"
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
UNITS = {"time": "second", "space": "micrometer"}
SCALE_KEYS = {"t": "TimeIncrement", "z": "PhysicalSizeZ", "y": "PhysicalSizeY", "x": "PhysicalSizeX"}


def is_zarr(path: Path) -> bool:
    """A `.zarr` path, or a directory holding Zarr metadata."""
    return path.suffix.lower() == ".zarr" or (path.is_dir() and any(
        (path / name).is_file() for name in ("zarr.json", ".zattrs", ".zgroup")))


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise ImageFileError("OME-Zarr needs zarr: pip install 'fm2s-stream[zarr]'") from None
    return zarr


def _ngff_axes(axes: str, ndim: int) -> list[str]:
    """Lower-case NGFF axis names for a stack's axes ("TCYX" -> t c y x); unknown ones become t, c, z in order."""
    names = [a.lower() for a in axes] if len(axes) == ndim else []
    if not names or any(n not in AXIS_TYPES for n in names) or len(set(names)) != ndim:
        if not 2 <= ndim <= 5:
            raise ImageFileError(f"cannot name the {ndim} axes of {axes!r} for OME-Zarr (at most TCZYX)")
        names = [*("t", "c", "z")[: ndim - 2], "y", "x"]  # unnamed planes (a plain multi-page TIFF): time first
    return names


def ngff_attrs(shape: tuple[int, ...], axes: str, info: ImageInfo, name: str = "fm2s") -> dict[str, Any]:
    """The group's `ome` attributes (NGFF 0.5) for an image of `shape` with `axes` and `info`'s metadata."""
    names = _ngff_axes(axes, len(shape))
    ngff_axes = []
    scale = []
    for n in names:
        axis: dict[str, Any] = {"name": n, "type": AXIS_TYPES[n]}
        if AXIS_TYPES[n] in UNITS:
            axis["unit"] = UNITS[AXIS_TYPES[n]]
        ngff_axes.append(axis)
        value = info.pixels.get(SCALE_KEYS.get(n, ""), 1.0)
        scale.append(float(value) if isinstance(value, (int, float)) and value > 0 else 1.0)
    ome: dict[str, Any] = {
        "version": NGFF_VERSION,
        "multiscales": [{"name": name, "axes": ngff_axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}],
    }
    if "c" in names:
        n_c = shape[names.index("c")]
        labels = info.channel_names if len(info.channel_names) == n_c else [f"channel {i}" for i in range(n_c)]
        ome["omero"] = {"channels": [{"label": label, "active": True} for label in labels]}
    return ome


def read_ngff(path: Path) -> tuple[Any, str, ImageInfo]:
    """(level-0 array, read lazily plane by plane; axes like "TCYX"; channel names and sizes) of an OME-Zarr."""
    zarr = _zarr()
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:
        raise ImageFileError(f"{path}: cannot open as Zarr ({type(exc).__name__}: {exc})") from None
    ome = attrs.get("ome", attrs)  # 0.5 nests under "ome"; 0.4 keeps multiscales at the top
    try:
        ms = ome["multiscales"][0]
        names = [a["name"] if isinstance(a, dict) else str(a) for a in ms["axes"]]
        dataset = ms["datasets"][0]
        array = group[dataset["path"]]
    except (KeyError, IndexError, TypeError) as exc:
        raise ImageFileError(f"{path}: not an OME-Zarr image (no usable multiscales: {exc})") from None
    if array.dtype not in (np.uint8, np.uint16):
        raise ImageFileError(f"{path}: {array.dtype} pixels; FM2S denoises uint8/uint16")
    scale = next((t["scale"] for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"),
                 [1.0] * len(names))
    pixels = {SCALE_KEYS[n]: float(s) for n, s in zip(names, scale) if n in SCALE_KEYS and float(s) != 1.0}
    channels = ome.get("omero", {}).get("channels", [])
    labels = [str(c.get("label", "")) for c in channels if isinstance(c, dict)]
    return array, "".join(n.upper() for n in names), ImageInfo(labels if all(labels) else [], pixels)


class NgffWriter:
    """An NGFF 0.5 image written plane by plane (one chunk per plane), by one process or many.

    `shape`/`axes` are the input stack's; the stored image has NGFF's axis order (t, c, z, y, x), so
    leading axes are permuted where the input's differ (a TZCYX OME-TIFF). The metadata is written
    first; planes land as they come. `done` counts the planes already in the store when resuming
    (the single-process path writes them in order); attribute `fm2s.complete` marks a finished image.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, axes: str, info: ImageInfo,
                 resume: bool = False, overwrite: bool = False) -> None:
        zarr = _zarr()
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.total = int(np.prod(self.shape[:-2]))
        self.done = 0
        self.order, stored_axes = _storage_order(axes, len(self.shape))
        stored_shape = tuple(self.shape[i] for i in self.order) + self.shape[-2:]
        if path.exists() and resume:
            group = zarr.open_group(str(path), mode="r+")
            note = dict(group.attrs).get("fm2s", {})
            if note.get("shape") != list(stored_shape) or note.get("dtype") != self.dtype.str:
                raise ImageFileError(f"{path}: not a partial output of this stack; remove it or pass --overwrite")
            self.array = group["0"]
            self.done = self._planes_present()
            return
        if path.exists() and not overwrite:
            raise ImageFileError(f"{path}: exists; pass --overwrite to replace it (or --resume to finish it)")
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        group.attrs.update({"ome": ngff_attrs(stored_shape, stored_axes, info),
                            "fm2s": {"shape": list(stored_shape), "dtype": self.dtype.str, "complete": False}})
        chunks = (1,) * (len(self.shape) - 2) + self.shape[-2:]
        # every chunk is stored, an all-zero plane too, so that stored chunks count the planes done
        self.array = group.create_array("0", shape=stored_shape, dtype=self.dtype, chunks=chunks,
                                        dimension_names=list(stored_axes), fill_value=0,
                                        config={"write_empty_chunks": True})

    @classmethod
    def attach(cls, path: Path, shape: tuple[int, ...], axes: str) -> NgffWriter:
        """A made output opened only to store planes (a Dask worker's view; no metadata is touched)."""
        self = cls.__new__(cls)
        self.path, self.shape = path, tuple(shape)
        self.total, self.done = int(np.prod(self.shape[:-2])), 0
        self.order, _ = _storage_order(axes, len(self.shape))
        self.array = _zarr().open_array(str(path / "0"), mode="r+")
        self.dtype = np.dtype(self.array.dtype)
        return self

    def _planes_present(self) -> int:
        """Planes already stored (the single-process path writes them in C order, each chunk at once)."""
        return int(self.array.nchunks_initialized)

    def write_plane(self, index: tuple[int, ...], plane: np.ndarray) -> None:
        """Store the plane of input index `index` (its own chunk: safe beside processes writing others)."""
        self.array[tuple(index[i] for i in self.order)] = plane

    def write(self, plane: np.ndarray) -> None:
        """Store the next plane in C order (the single-process path)."""
        self.write_plane(_nth(self.shape, self.done), plane)
        self.done += 1

    def close(self) -> None:
        """Nothing buffered: every plane is in the store once written."""

    def finish(self) -> None:
        """Mark the image complete."""
        zarr = _zarr()
        group = zarr.open_group(str(self.path), mode="r+")
        note = dict(group.attrs).get("fm2s", {})
        group.attrs["fm2s"] = {**note, "complete": True}


def _storage_order(axes: str, ndim: int) -> tuple[list[int], str]:
    """(input axis of each stored leading axis, stored axis names): NGFF wants t, c, z, then y, x."""
    names = _ngff_axes(axes, ndim)
    order = sorted(range(ndim - 2), key=lambda i: "tcz".index(names[i]))
    return order, "".join(names[i] for i in order) + "yx"


def _nth(shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    """The n-th plane index of a stack of `shape` in C order."""
    return tuple(int(i) for i in np.unravel_index(n, shape[:-2]))


T_STEP = 64  # a streaming store's T extent grows by this many frames at a time (one metadata write each)
FRAMES_LOG = "fm2s_frames.jsonl"


class ZarrSink(RollingFileSink):
    """Streams frames into `<directory>/<prefix>_<kind>_<NNN>.ome.zarr` (NGFF 0.5, T C Y X, a chunk per frame).

    Channels get C indices in order of first appearance (C grows when a new one comes), T counts each
    channel's frames. Crash behaviour: a frame's chunk is written, and its header appended (flushed)
    to `fm2s_frames.jsonl` in the store, before `write` returns, i.e. before the frame is published,
    so a kill -9 leaves every acknowledged frame readable; the T extent is allocated T_STEP frames
    ahead (planes not yet written read as 0; the log says which exist). A clean `close` trims T to
    the frames written, writes the channel labels and marks `fm2s.complete`. Stores roll every
    `roll_every` frames and on a shape or dtype change; a disk error is reported as a gap, and
    writing is retried in a new store after `retry_s`.
    """

    SUFFIX = ".ome.zarr"
    LABEL = "zarr"

    def __init__(self, directory: str | Path, kind: str = "denoised", prefix: str = "fm2s", roll_every: int = 10_000,
                 pixel_size_um: float | None = None, retry_s: float = 2.0) -> None:
        _zarr()
        super().__init__(directory, kind, prefix, roll_every, pixel_size_um, retry_s)

    def _create(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> _OpenStore:
        path.mkdir()  # exclusive: never writes into an existing store
        return _OpenStore(path, shape, dtype, self.pixel_size_um)

    def _frames(self, f: _OpenStore) -> int:
        return f.frames

    def _append(self, f: _OpenStore, pixels: np.ndarray, header: dict[str, Any]) -> None:
        f.append(pixels, header)

    def _finish(self, f: _OpenStore) -> None:
        f.finish()
        self.finalised.append(f.path)


class _OpenStore:
    """One streaming OME-Zarr store: its T C Y X array, channel indices, per-channel T counts, the frames log."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, pixel_size_um: float | None) -> None:
        zarr = _zarr()
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.channels: list[str] = []
        self.counts: list[int] = []
        self.frames = 0
        self.capacity = T_STEP
        sizes = {"PhysicalSizeX": pixel_size_um, "PhysicalSizeY": pixel_size_um} if pixel_size_um else {}
        self.info = ImageInfo([], sizes)
        self.group = zarr.open_group(str(path), mode="w", zarr_format=3)
        self._attrs(complete=False, n_c=1)
        self.array = self.group.create_array("0", shape=(T_STEP, 1, *self.shape), dtype=self.dtype,
                                             chunks=(1, 1, *self.shape), dimension_names=["t", "c", "y", "x"],
                                             fill_value=0, config={"write_empty_chunks": True})
        self.log = open(path / FRAMES_LOG, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish

    def _attrs(self, complete: bool, n_c: int) -> None:
        info = ImageInfo(self.channels if len(self.channels) == n_c else [], self.info.pixels)
        t = max(self.counts) if complete and self.counts else self.capacity
        self.group.attrs.update({"ome": ngff_attrs((t, n_c, *self.shape), "TCYX", info, name=self.path.name),
                                 "fm2s": {"complete": complete, "frames": self.frames, "log": FRAMES_LOG}})

    def append(self, pixels: np.ndarray, header: dict[str, Any]) -> None:
        name = header["channel"]
        if name not in self.channels:
            self.channels.append(name)
            self.counts.append(0)
            if len(self.channels) > self.array.shape[1]:
                self.array.resize((self.capacity, len(self.channels), *self.shape))
                self._attrs(complete=False, n_c=len(self.channels))
        c = self.channels.index(name)
        t = self.counts[c]
        if t >= self.capacity:
            self.capacity += T_STEP
            self.array.resize((self.capacity, self.array.shape[1], *self.shape))
            self._attrs(complete=False, n_c=self.array.shape[1])
        self.array[t, c] = pixels
        self.log.write(json.dumps({**header, "T": t, "C": c}, default=str) + "\n")
        self.log.flush()
        self.counts[c] += 1
        self.frames += 1

    def finish(self) -> None:
        self.log.close()
        n_t = max(self.counts) if self.counts else 0
        if n_t:
            self.array.resize((n_t, self.array.shape[1], *self.shape))
        self._attrs(complete=True, n_c=self.array.shape[1])
