"""The ZMQ wire format: encode, decode and validate frames (no sockets here, only bytes).

Multipart message, 2 parts: (1) UTF-8 JSON header
  {"v": 1, "dtype": "<u2" | "|u1", "shape": [H, W], "channel": "DAPI", "t": 0, "z": 0, "p": 0,
   "frame_id": 17, "ts": 1732531200.123, "meta": {...}}
(2) the raw C-order pixel bytes. Output headers add "fm2s": {status, degraded, steps, latency_ms,
reason, frames_averaged, cold_start_progress}. The preview stream packs one frame per single-part message: a
4-byte big-endian header length, the JSON header, the denoised pixels, then (when the header has
"raw": {"dtype", "shape"}) the raw frame's pixels, so a viewer shows both from one message (single-part so
that subscribers can use ZMQ_CONFLATE).
Nothing here ever unpickles; every field is checked, and a bad message raises WireError.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .frame import Frame, FrameError, Result

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "MAX_PIXELS",
    "MAX_SIDE",
    "VERSION",
    "Preview",
    "WireError",
    "decode",
    "encode",
    "encode_result",
    "header_of",
    "pack_preview",
    "pack_single",
    "unpack_preview",
    "unpack_single",
]

VERSION = 1
DTYPES: dict[str, np.dtype] = {"|u1": np.dtype(np.uint8), "<u2": np.dtype(np.uint16)}
MAX_HEADER_BYTES = 64 * 1024
MAX_SIDE = 16384
MAX_PIXELS = 8192 * 8192
REQUIRED = ("v", "dtype", "shape")


class WireError(FrameError):
    """A malformed message; `kind` is a short reason used as a counter name."""


def _int_field(h: dict[str, Any], name: str, default: int) -> int:
    value = h.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**63 - 1:
        raise WireError("field", f"header field {name!r} must be a non-negative integer, got {value!r}")
    return value


def parse_header(head: bytes | memoryview) -> dict[str, Any]:
    """Decode and check the JSON header; returns the dict."""
    if len(head) > MAX_HEADER_BYTES:
        raise WireError("header_size", f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        h = json.loads(bytes(head).decode("utf-8"))
    except UnicodeDecodeError:
        raise WireError("not_utf8", "header is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise WireError("not_json", f"header is not JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(h, dict):
        raise WireError("not_json", "header must be a JSON object")
    missing = [k for k in REQUIRED if k not in h]
    if missing:
        raise WireError("missing_field", f"header lacks {', '.join(missing)}")
    if h["v"] != VERSION or isinstance(h["v"], bool):
        raise WireError("version", f"unsupported wire version {h['v']!r} (this server speaks {VERSION})")
    if h["dtype"] not in DTYPES:
        raise WireError("dtype", f"dtype {h['dtype']!r} not allowed; use one of {sorted(DTYPES)}")
    shape = h["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    ):
        raise WireError("shape", f"shape must be [H, W] integers, got {shape!r}")
    if not all(1 <= s <= MAX_SIDE for s in shape) or shape[0] * shape[1] > MAX_PIXELS:
        raise WireError("shape", f"shape {shape} outside limits (sides 1..{MAX_SIDE}, <= {MAX_PIXELS} px)")
    ts = h.get("ts", 0.0)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise WireError("field", f"ts must be a finite number, got {ts!r}")
    if not isinstance(h.get("meta", {}), dict):
        raise WireError("field", "meta must be a JSON object")
    if not isinstance(h.get("channel", "default"), str):
        raise WireError("field", "channel must be a string")
    return h


def decode(parts: list[bytes] | list[memoryview] | list[Any]) -> Frame:
    """A validated Frame from the message parts (bytes-like objects)."""
    if len(parts) != 2:
        raise WireError("parts", f"expected 2 message parts (header, pixels), got {len(parts)}")
    h = parse_header(parts[0])
    dtype, shape = DTYPES[h["dtype"]], tuple(h["shape"])
    body = memoryview(parts[1]).cast("B")
    expected = shape[0] * shape[1] * dtype.itemsize
    if body.nbytes != expected:
        raise WireError("size", f"pixel part has {body.nbytes} bytes, header implies {expected}")
    pixels = np.frombuffer(body, dtype=dtype).reshape(shape)
    frame = Frame(
        pixels=pixels,
        channel=h.get("channel", "default"),
        t=_int_field(h, "t", 0),
        z=_int_field(h, "z", 0),
        p=_int_field(h, "p", 0),
        frame_id=_int_field(h, "frame_id", 0),
        ts=float(h.get("ts", 0.0)),
        meta=h.get("meta", {}),
    )
    try:
        frame.validate()
    except FrameError as exc:
        raise WireError(exc.kind, str(exc)) from None
    return frame


def header_of(frame: Frame, pixels: np.ndarray, extra: dict[str, Any] | None = None) -> bytes:
    """The JSON header bytes describing `pixels` with `frame`'s identity."""
    h: dict[str, Any] = {"v": VERSION, "dtype": pixels.dtype.str, "shape": list(pixels.shape),
                         **frame.identity(), "meta": frame.meta}
    if extra:
        h.update(extra)
    return json.dumps(h, separators=(",", ":")).encode("utf-8")


def encode(frame: Frame) -> list[Any]:
    """The 2-part message for a raw frame (header bytes, pixel buffer without a copy)."""
    px = np.ascontiguousarray(frame.pixels)
    return [header_of(frame, px), px.data.cast("B")]


def encode_result(result: Result) -> list[Any]:
    """The 2-part message for a processed frame: the input header plus "fm2s" processing fields."""
    px = np.ascontiguousarray(result.pixels)
    return [header_of(result.frame, px, {"fm2s": result.processing()}), px.data.cast("B")]


def pack_single(parts: list[Any], tail: bytes | memoryview = b"") -> bytes:
    """One buffer: 4-byte big-endian header length, header, pixels, then `tail` (for the CONFLATE preview)."""
    head = bytes(parts[0])
    return b"".join((struct.pack(">I", len(head)), head, parts[1], tail))


def pack_preview(result: Result) -> bytes:
    """The preview message of a result: its denoised pixels and, described by header "raw", the raw ones."""
    px = np.ascontiguousarray(result.pixels)
    raw = np.ascontiguousarray(result.frame.pixels)
    extra = {"fm2s": result.processing(), "raw": {"dtype": raw.dtype.str, "shape": list(raw.shape)}}
    return pack_single([header_of(result.frame, px, extra), px.data.cast("B")], raw.data.cast("B"))


@dataclass
class Preview:
    """A decoded preview message: the denoised frame, the raw pixels (None if absent) and the fm2s fields."""

    frame: Frame
    raw: np.ndarray | None
    fm2s: dict[str, Any]


def _raw_part(h: dict[str, Any], body: memoryview) -> np.ndarray | None:
    spec = h.get("raw")
    if spec is None:
        if body.nbytes:
            raise WireError("size", f"{body.nbytes} bytes follow the pixels but the header has no 'raw'")
        return None
    if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES:
        raise WireError("field", f"raw must be {{'dtype', 'shape'}} with dtype one of {sorted(DTYPES)}")
    shape = spec.get("shape")
    if shape != h["shape"]:
        raise WireError("shape", f"raw shape {shape!r} differs from the frame's {h['shape']!r}")
    dtype = DTYPES[spec["dtype"]]
    if body.nbytes != shape[0] * shape[1] * dtype.itemsize:
        raise WireError("size", f"raw part has {body.nbytes} bytes, its header implies {shape} {dtype}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def unpack_preview(buf: bytes | memoryview) -> Preview:
    """Inverse of `pack_preview` (and of `pack_single`), with the same validation as `decode`."""
    view = memoryview(buf).cast("B")
    if view.nbytes < 4:
        raise WireError("size", "packed message shorter than its length prefix")
    (n,) = struct.unpack(">I", view[:4])
    if n > min(MAX_HEADER_BYTES, view.nbytes - 4):
        raise WireError("header_size", f"packed header length {n} is invalid")
    h = parse_header(view[4 : 4 + n])
    size = h["shape"][0] * h["shape"][1] * DTYPES[h["dtype"]].itemsize
    body = view[4 + n :]
    if body.nbytes < size:
        raise WireError("size", f"pixel part has {body.nbytes} bytes, header implies {size}")
    raw = _raw_part(h, body[size:])
    fm2s = h.get("fm2s", {})
    if not isinstance(fm2s, dict):
        raise WireError("field", "fm2s must be a JSON object")
    return Preview(decode([view[4 : 4 + n], body[:size]]), raw, fm2s)


def unpack_single(buf: bytes | memoryview) -> Frame:
    """The denoised frame of a preview message (`unpack_preview` also gives the raw pixels)."""
    return unpack_preview(buf).frame
