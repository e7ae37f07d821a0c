"""send -> serve -> receive keeps what the data means: channels and their names, t/z, per-frame fm2s status."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from fm2s_stream.adapters.files import FileSource, ImageInfo
from fm2s_stream.synthetic import Camera, TimeLapse
from tests.streamkit import OUTSIDE, spawn_serve, stop_serve


def two_channel_stack(t: int = 3) -> np.ndarray:
    cam = Camera(gain=900.0, offset=300)
    a, b = TimeLapse((48, 64), cam, seed=1, peak=40), TimeLapse((48, 64), cam, seed=2, peak=60)
    return np.stack([np.stack([a.frame(i)[0], b.frame(i)[0]]) for i in range(t)])  # T, C, Y, X


def test_send_maps_the_c_axis_to_named_channels_and_t_z(tmp_path):
    stack = np.stack([two_channel_stack(2)] * 3, axis=1)  # T, Z, C, Y, X
    path = tmp_path / "s.ome.tif"
    tifffile.imwrite(path, stack, ome=True, metadata={"axes": "TZCYX", "Channel": {"Name": ["GFP", "mCherry"]}})
    frames = list(FileSource(path).frames())
    assert [f.channel for f in frames[:4]] == ["GFP", "mCherry", "GFP", "mCherry"]
    assert [(f.t, f.z) for f in frames[::2]] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    np.testing.assert_array_equal(frames[3].pixels, stack[0, 1, 1])
    unnamed = tmp_path / "u.tif"
    tifffile.imwrite(unnamed, stack[:, 0], imagej=True, metadata={"axes": "TCYX"})
    assert {f.channel for f in FileSource(unnamed, channel="cam").frames()} == {"cam-0", "cam-1"}


@pytest.mark.parametrize("fmt", ["ome.tif", "ome.zarr"])
def test_send_serve_receive_round_trip_keeps_channels_names_and_statuses(tmp_path, fmt):
    stack = two_channel_stack(3)
    src = tmp_path / f"in.{fmt}"
    if fmt == "ome.tif":
        tifffile.imwrite(src, stack, ome=True, metadata={"axes": "TCYX", "Channel": {"Name": ["GFP", "mCherry"]}})
    else:
        pytest.importorskip("zarr")
        from fm2s_stream.adapters.ngff import NgffWriter

        w = NgffWriter(src, stack.shape, stack.dtype, "TCYX", ImageInfo(["GFP", "mCherry"]))
        for plane in stack.reshape(-1, 48, 64):
            w.write(plane)
        w.finish()
    proc, source, publish = spawn_serve(None, "--cold-start-steps", "10")
    cli = [sys.executable, "-m", "fm2s_stream.cli"]
    try:
        time.sleep(1.5)
        receive = subprocess.Popen([*cli, "receive", "--from", publish, "--save", str(tmp_path / "got"), "--count", "6",
                                    "--timeout", "90"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=OUTSIDE)
        time.sleep(1.5)
        sent = subprocess.run([*cli, "send", str(src), "--to", source], capture_output=True, cwd=OUTSIDE, timeout=60)
        assert sent.returncode == 0, sent.stderr.decode()[-2000:]
        out, err = receive.communicate(timeout=120)
        assert receive.returncode == 0, err.decode()[-2000:]
    finally:
        report = stop_serve(proc)
    assert set(report["channels"]) == {"GFP", "mCherry"}  # one model per channel, not one for both
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["received"] == 6
    files = sorted((tmp_path / "got").glob("*.ome.tif"))
    assert [f.name for f in files] == ["received_denoised_000.ome.tif"]
    with tifffile.TiffFile(files[0]) as tif:
        heads = [json.loads(tif.pages[i].description) for i in range(1, len(tif.pages))]  # page 0: OME-XML
        series = tif.series[0]
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert series.shape == stack.shape and [c["Name"] for c in pixels["Channel"]] == ["GFP", "mCherry"]
    assert [h["channel"] for h in heads] == ["mCherry", "GFP", "mCherry", "GFP", "mCherry"]
    assert [h["t"] for h in heads] == [0, 1, 1, 2, 2]
    assert all(h["kind"] == "denoised" and h["fm2s"]["status"] in ("bootstrap", "denoised") for h in heads)
