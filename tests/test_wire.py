import json
import struct
from dataclasses import dataclass

import numpy as np
import pytest

from fm2s_stream.frame import Frame, Result
from fm2s_stream.wire import (
    WireError,
    decode,
    encode,
    encode_result,
    pack_preview,
    pack_single,
    unpack_preview,
    unpack_single,
)


def header(**kw) -> bytes:
    h = {"v": 1, "dtype": "<u2", "shape": [8, 12], "channel": "DAPI", "t": 3, "z": 1, "p": 2,
         "frame_id": 17, "ts": 1732531200.5, "meta": {"exposure_ms": 10}}
    h.update(kw)
    return json.dumps({k: v for k, v in h.items() if v is not None}).encode()


PIXELS = np.arange(96, dtype=np.uint16).reshape(8, 12) * 300


def test_round_trip_keeps_pixels_and_identity():
    frame = decode([header(), PIXELS.tobytes()])
    assert frame.channel == "DAPI" and (frame.t, frame.z, frame.p, frame.frame_id) == (3, 1, 2, 17)
    assert frame.meta == {"exposure_ms": 10}
    np.testing.assert_array_equal(frame.pixels, PIXELS)
    again = decode(encode(frame))
    np.testing.assert_array_equal(again.pixels, PIXELS)
    assert again.identity() == frame.identity()


def test_result_header_carries_processing_fields_and_packs_single_part():
    frame = decode([header(dtype="|u1"), PIXELS.astype(np.uint8).tobytes()])
    result = Result(frame, frame.pixels, "denoised", False, 42, 12.5)
    head = json.loads(bytes(encode_result(result)[0]))
    assert head["fm2s"] == {"status": "denoised", "degraded": False, "steps": 42, "latency_ms": 12.5,
                            "reason": None, "frames_averaged": 1.0, "cold_start_progress": 1.0}
    packed = pack_single(encode_result(result))
    assert struct.unpack(">I", packed[:4])[0] == len(bytes(encode_result(result)[0]))
    np.testing.assert_array_equal(unpack_single(packed).pixels, frame.pixels)
    assert unpack_preview(packed).raw is None  # a message without "raw" has no raw part


def test_preview_carries_raw_and_denoised_pixels_of_one_frame():
    frame = decode([header(), PIXELS.tobytes()])
    denoised = (PIXELS // 2).astype(np.uint16)
    result = Result(frame, denoised, "bootstrap", True, 7, 3.0, cold_start=0.25)
    p = unpack_preview(pack_preview(result))
    np.testing.assert_array_equal(p.frame.pixels, denoised)
    np.testing.assert_array_equal(p.raw, PIXELS)
    assert p.fm2s["status"] == "bootstrap" and p.fm2s["cold_start_progress"] == 0.25
    assert p.frame.identity() == frame.identity()
    np.testing.assert_array_equal(unpack_single(pack_preview(result)).pixels, denoised)


@pytest.mark.parametrize("mangle, kind", [
    (lambda m: m[:-1], "size"),  # truncated raw part
    (lambda m: m + b"\x00\x00", "size"),  # bytes past the raw part
])
def test_malformed_preview_raw_part_is_rejected(mangle, kind):
    frame = decode([header(), PIXELS.tobytes()])
    packed = pack_preview(Result(frame, frame.pixels, "denoised", False, 1, 1.0))
    with pytest.raises(WireError) as err:
        unpack_preview(mangle(packed))
    assert err.value.kind == kind
    no_raw = pack_single(encode_result(Result(frame, frame.pixels, "denoised", False, 1, 1.0)))
    with pytest.raises(WireError):
        unpack_preview(no_raw + b"\x00")


@dataclass(frozen=True)
class Bad:
    parts: list
    kind: str


BAD = {
    "not-json": Bad([b"not json", PIXELS.tobytes()], "not_json"),
    "json-list": Bad([b"[1, 2]", PIXELS.tobytes()], "not_json"),
    "not-utf8": Bad([b"\xff\xfe" + b"x" * 10, b""], "not_utf8"),
    "wrong-bytes": Bad([header(), b"\x00" * 10], "size"),
    "absurd-shape": Bad([header(shape=[100000, 100000]), b"\x00" * 16], "shape"),
    "billion-px": Bad([header(shape=[16384, 65536]), b""], "shape"),
    "one-d": Bad([header(shape=[96]), PIXELS.tobytes()], "shape"),
    "three-d": Bad([header(shape=[8, 2, 6]), PIXELS.tobytes()], "shape"),
    "zero-size": Bad([header(shape=[0, 12]), b""], "shape"),
    "float-shape": Bad([header(shape=[8.0, 12]), PIXELS.tobytes()], "shape"),
    "object-dtype": Bad([header(dtype="|O"), PIXELS.tobytes()], "dtype"),
    "float64": Bad([header(dtype="<f8", shape=[2, 2]), np.full(4, np.nan).tobytes()], "dtype"),
    "int32": Bad([header(dtype="<i4", shape=[8, 6]), PIXELS.tobytes()], "dtype"),
    "big-endian": Bad([header(dtype=">u2"), PIXELS.tobytes()], "dtype"),
    "three-parts": Bad([header(), PIXELS.tobytes(), b"extra"], "parts"),
    "one-part": Bad([header()], "parts"),
    "version": Bad([header(v=99), PIXELS.tobytes()], "version"),
    "missing": Bad([json.dumps({"dtype": "<u2"}).encode(), PIXELS.tobytes()], "missing_field"),
    "negative-t": Bad([header(t=-1), PIXELS.tobytes()], "field"),
    "string-id": Bad([header(frame_id="17"), PIXELS.tobytes()], "field"),
    "nan-ts": Bad([header().replace(b"1732531200.5", b"NaN"), PIXELS.tobytes()], "field"),
    "meta-list": Bad([header(meta=[1]), PIXELS.tobytes()], "field"),
    "huge-header": Bad([header(meta={"x": "a" * 70000}), PIXELS.tobytes()], "header_size"),
    "channel-number": Bad([header(channel=5), PIXELS.tobytes()], "field"),
    "channel-control-chars": Bad([header(channel="a\x00b"), PIXELS.tobytes()], "channel"),
    "channel-too-long": Bad([header(channel="c" * 500), PIXELS.tobytes()], "channel"),
    "tiny-frame": Bad([header(shape=[1, 1]), b"\x00\x00"], "pixels"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_messages_are_rejected_with_a_reason(case):
    bad = BAD[case]
    with pytest.raises(WireError) as err:
        decode(bad.parts)
    assert err.value.kind == bad.kind
    assert str(err.value)


def test_unpack_rejects_short_and_lying_prefixes():
    with pytest.raises(WireError):
        unpack_single(b"\x00\x00")
    with pytest.raises(WireError):
        unpack_single(struct.pack(">I", 10**6) + b"{}")


def test_frame_validation_is_shared_by_the_api():
    with pytest.raises(ValueError, match="unsupported dtype"):
        Frame(np.zeros((16, 16), np.float32)).validate()
