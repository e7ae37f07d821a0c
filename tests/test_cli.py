import dataclasses

import numpy as np
import pytest
import tifffile
from PIL import Image

from fm2s_stream import cli
from fm2s_stream.state import StateStore
from fm2s_stream.synthetic import Camera, TimeLapse
from fm2s_stream.training import SCHEDULES, Trainer, scaled


@pytest.fixture(autouse=True)
def quick_schedule(monkeypatch):
    """The CLI runs the real fast schedule, shortened so the test suite stays quick."""
    quick = dataclasses.replace(scaled(SCHEDULES["fast"], 0.1), crop=48)
    monkeypatch.setitem(SCHEDULES, "fast", quick)


def frames(bits: int, n: int = 1) -> np.ndarray:
    cam = Camera(gain=4.0, read_noise=1.5, offset=2, bit_depth=8) if bits == 8 else Camera(gain=900.0, offset=300)
    lapse = TimeLapse((48, 64), cam, seed=1, peak=40)
    stack = np.stack([lapse.frame(t)[0] for t in range(n)])
    return stack[0] if n == 1 else stack


@pytest.mark.parametrize(("suffix", "bits"), [(".png", 8), (".png", 16), (".tif", 8), (".tif", 16)])
def test_denoise_round_trip_through_real_files(tmp_path, suffix, bits, capsys):
    img = frames(bits)
    src, dst = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    if suffix == ".png":
        Image.fromarray(img).save(src)
    else:
        tifffile.imwrite(src, img)
    assert cli.main(["denoise", str(src), "-o", str(dst), "--device", "cpu", "--threads", "1"]) == 0
    out = np.asarray(Image.open(dst)) if suffix == ".png" else tifffile.imread(dst)
    if suffix == ".png" and bits == 16:
        out = out.astype(np.uint16)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert out.std() < img.std()
    assert "->" in capsys.readouterr().out


def test_stack_keeps_axes_and_shows_progress(tmp_path, capsys):
    stack = np.stack([frames(16, 3), frames(16, 3)], axis=1)  # T, C, Y, X
    src, dst = tmp_path / "stack.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, stack, imagej=True, metadata={"axes": "TCYX"})
    assert cli.main(["denoise", str(src), "-o", str(dst), "--device", "cpu", "--threads", "1"]) == 0
    assert tifffile.imread(dst).shape == stack.shape
    assert "6/6" in capsys.readouterr().err


def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    src, dst = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(frames(8)).save(src)
    dst.write_bytes(b"keep me")
    assert cli.main(["denoise", str(src), "-o", str(dst), "--device", "cpu"]) == 1
    assert "exists" in capsys.readouterr().err and dst.read_bytes() == b"keep me"
    assert cli.main(["denoise", str(src), "-o", str(dst), "--device", "cpu", "--overwrite"]) == 0
    assert dst.read_bytes() != b"keep me"


BAD_FILES = {
    "not-an-image.png": (b"hello", "cannot read"),
    "truncated.tif": (None, "cannot read"),
    "rgb.png": ("rgb", "colour"),
    "float-nan.tif": ("nan", "NaN"),
    "one-pixel.tif": ("onepx", "too small"),
    "notes.txt": (b"x", "unsupported file type"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_get_clear_errors(tmp_path, name, capsys):
    kind, message = BAD_FILES[name]
    path = tmp_path / name
    if isinstance(kind, bytes):
        path.write_bytes(kind)
    elif kind is None:
        tifffile.imwrite(path, frames(16))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "rgb":
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    elif kind == "nan":
        tifffile.imwrite(path, np.full((16, 16), np.nan, np.float32))
    elif kind == "onepx":
        tifffile.imwrite(path, np.ones((1, 1), np.uint16))
    assert cli.main(["denoise", str(path), "-o", str(tmp_path / "out.tif"), "--device", "cpu"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.tif").exists()


def test_missing_file_and_many_inputs_to_a_file(tmp_path, capsys):
    assert cli.main(["denoise", str(tmp_path / "nope.tif"), "-o", str(tmp_path / "o.tif")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["denoise", "a.tif", "b.tif", "-o", str(tmp_path / "o.tif")]) == 2


def test_stack_keeps_channel_names_and_physical_sizes(tmp_path):
    stack = np.stack([frames(16, 3), frames(16, 3)], axis=1)  # T, C, Y, X
    src, dst = tmp_path / "stack.ome.tif", tmp_path / "out.ome.tif"
    tifffile.imwrite(src, stack, ome=True, metadata={"axes": "TCYX", "Channel": {"Name": ["GFP", "mCherry"]},
                                                     "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65,
                                                     "TimeIncrement": 2.5})
    assert cli.main(["denoise", str(src), "-o", str(dst), "--device", "cpu", "--threads", "1"]) == 0
    with tifffile.TiffFile(dst) as tif:
        series = tif.series[0]
        assert series.axes == "TCYX" and series.shape == stack.shape and series.dtype == stack.dtype
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert [c["Name"] for c in pixels["Channel"]] == ["GFP", "mCherry"]
    assert pixels["PhysicalSizeX"] == 0.65 and pixels["TimeIncrement"] == 2.5


@pytest.mark.parametrize(("output", "message"), [("missing/out.tif", "does not exist"),
                                                 ("out.h5", "cannot write '.h5'"),
                                                 ("missing-dir", "output directory does not exist")])
def test_unwritable_outputs_are_refused_before_any_computation(tmp_path, capsys, output, message):
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, frames(16, 3), metadata={"axes": "TYX"})
    assert cli.main(["denoise", str(src), "-o", str(tmp_path / output), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "learnt" not in err and "planes" not in err


def _pages(path) -> int:
    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.pages)
    except Exception:  # being written
        return 0


def test_ctrl_c_leaves_a_valid_partial_stack_and_resume_finishes_it_identically(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.streamkit import OUTSIDE

    stack = np.stack([frames(16, 1) for _ in range(400)])
    stack = (stack.astype(np.int32) + np.arange(400)[:, None, None] % 7).astype(np.uint16)
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, stack, metadata={"axes": "TYX"})
    cmd = [sys.executable, "-m", "fm2s_stream.cli", "denoise", str(src), "--device", "cpu", "--threads", "1", "-o"]
    part, whole = tmp_path / "part.ome.tif", tmp_path / "whole.ome.tif"
    proc = subprocess.Popen([*cmd, str(part)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=OUTSIDE)
    end = time.monotonic() + 120
    while _pages(part) < 5 and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "--resume" in err.decode()
    partial = tifffile.imread(part)
    assert 5 <= partial.shape[0] < 400 and partial.shape[1:] == stack.shape[1:]
    done = subprocess.run([*cmd, str(part), "--resume"], capture_output=True, cwd=OUTSIDE, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert f"resuming at plane {partial.shape[0]}" in done.stderr.decode()
    ref = subprocess.run([*cmd, str(whole)], capture_output=True, cwd=OUTSIDE, timeout=300)
    assert ref.returncode == 0
    resumed = tifffile.imread(part)
    assert resumed.shape == stack.shape
    np.testing.assert_array_equal(resumed, tifffile.imread(whole))
    np.testing.assert_array_equal(resumed[: partial.shape[0]], partial)


def test_ome_zarr_round_trip_keeps_channels_sizes_and_reads_ngff_04(tmp_path):
    zarr = pytest.importorskip("zarr")
    reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    stack = np.stack([frames(16, 3), frames(16, 3)], axis=1)  # T, C, Y, X
    src, mid, back = tmp_path / "in.ome.tif", tmp_path / "mid.ome.zarr", tmp_path / "back.ome.tif"
    tifffile.imwrite(src, stack, ome=True, metadata={"axes": "TCYX", "Channel": {"Name": ["GFP", "mCherry"]},
                                                     "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65})
    assert cli.main(["denoise", str(src), "-o", str(mid), "--device", "cpu", "--threads", "1"]) == 0
    node = next(iter(reader.Reader(parse_url(str(mid)))()))  # an independent NGFF reader
    assert [a["name"] for a in node.metadata["axes"]] == ["t", "c", "y", "x"]
    assert node.metadata["channel_names"] == ["GFP", "mCherry"]
    assert node.data[0].shape == stack.shape and node.data[0].dtype == stack.dtype
    group = zarr.open_group(str(mid), mode="r")
    assert group.attrs["ome"]["version"] == "0.5" and group.attrs["fm2s"]["complete"] is True
    scale = group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[-2:] == [0.65, 0.65]
    assert cli.main(["denoise", str(mid), "-o", str(back), "--device", "cpu", "--threads", "1"]) == 0
    with tifffile.TiffFile(back) as tif:
        assert tif.series[0].axes == "TCYX" and tif.series[0].shape == stack.shape
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert [c["Name"] for c in pixels["Channel"]] == ["GFP", "mCherry"] and pixels["PhysicalSizeX"] == 0.65

    old = tmp_path / "v04.zarr"  # NGFF 0.4: zarr v2, multiscales at the top of .zattrs
    g = zarr.open_group(str(old), mode="w", zarr_format=2)
    g.create_array("0", shape=stack[:, 0].shape, dtype=np.uint16, chunks=(1, 48, 64))[:] = stack[:, 0]
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "t", "type": "time"}, {"name": "y", "type": "space"},
                                                           {"name": "x", "type": "space"}],
                               "datasets": [{"path": "0", "coordinateTransformations": [
                                   {"type": "scale", "scale": [1.0, 0.5, 0.5]}]}]}]
    from fm2s_stream.adapters.ngff import read_ngff

    array, axes, info = read_ngff(old)
    assert axes == "TYX" and array.shape == stack[:, 0].shape and info.pixels["PhysicalSizeX"] == 0.5
    out04 = tmp_path / "out04.ome.zarr"
    assert cli.main(["denoise", str(old), "-o", str(out04), "--device", "cpu", "--threads", "1"]) == 0
    assert zarr.open_group(str(out04), mode="r")["0"].shape == stack[:, 0].shape


def test_axes_out_of_ngff_order_are_stored_in_ngff_order(tmp_path):
    pytest.importorskip("zarr")
    from fm2s_stream.adapters.files import ImageInfo
    from fm2s_stream.adapters.ngff import NgffWriter, read_ngff

    w = NgffWriter(tmp_path / "z.ome.zarr", (3, 2, 8, 8), np.dtype(np.uint8), "ZCYX", ImageInfo(["a", "b"]))
    for i in range(6):
        w.write(np.full((8, 8), i, np.uint8))  # input order: z0c0 z0c1 z1c0 ...
    w.finish()
    array, axes, info = read_ngff(tmp_path / "z.ome.zarr")
    assert axes == "CZYX" and array.shape == (2, 3, 8, 8) and info.channel_names == ["a", "b"]
    assert array[1, 2, 0, 0] == 5 and array[0, 1, 0, 0] == 2


def test_average_smooths_a_still_time_lapse_along_t_only(tmp_path):
    cam = Camera(gain=900.0, offset=300)
    base = TimeLapse((48, 64), cam, seed=1, peak=40, drift=(0.0, 0.0))
    stack = np.stack([base.frame(t)[0] for t in range(6)])
    src = tmp_path / "still.ome.tif"
    tifffile.imwrite(src, stack, ome=True, metadata={"axes": "TYX"})
    plain, averaged = tmp_path / "plain.ome.tif", tmp_path / "avg.ome.tif"
    args = ["--device", "cpu", "--threads", "1"]
    assert cli.main(["denoise", str(src), "-o", str(plain), *args]) == 0
    assert cli.main(["denoise", str(src), "-o", str(averaged), "--average", "6", *args]) == 0
    a, b = tifffile.imread(plain).astype(float), tifffile.imread(averaged).astype(float)
    assert b.shape == stack.shape
    assert b.std(axis=0).mean() < 0.6 * a.std(axis=0).mean()  # flicker between frames cut
    z = tmp_path / "z.tif"
    tifffile.imwrite(z, stack, ome=True, metadata={"axes": "ZYX"})
    assert cli.main(["denoise", str(z), "-o", str(tmp_path / "zo.tif"), "--average", "4", *args]) == 1


def test_state_keeps_each_channel_and_a_second_run_learns_nothing(tmp_path, capsys, monkeypatch):
    stack = np.stack([frames(16, 3), frames(16, 3)], axis=1)  # T, C, Y, X
    src, state = tmp_path / "stack.ome.tif", tmp_path / "state"
    tifffile.imwrite(src, stack, ome=True, metadata={"axes": "TCYX", "Channel": {"Name": ["GFP", "mCherry"]}})
    args = ["denoise", str(src), "--device", "cpu", "--threads", "1", "--state", str(state)]
    assert cli.main([*args, "-o", str(tmp_path / "a.ome.tif")]) == 0
    assert capsys.readouterr().err.count("saved to") == 2
    assert sorted(row["channel"] for row in StateStore(state).entries()) == ["GFP", "mCherry"]
    steps = []
    monkeypatch.setattr(Trainer, "step", lambda self, *a: steps.append(1) or 0.0)  # a second run trains nothing
    assert cli.main([*args, "-o", str(tmp_path / "b.ome.tif")]) == 0
    err = capsys.readouterr().err
    assert err.count("resumed from") == 2 and not steps, err
    first, second = tifffile.imread(tmp_path / "a.ome.tif"), tifffile.imread(tmp_path / "b.ome.tif")
    np.testing.assert_array_equal(first, second)  # the kept networks are the learnt ones


def test_a_2d_frame_with_state_is_the_plain_answer_then_reuses_it(tmp_path, capsys):
    img = frames(8)
    src, state = tmp_path / "in.png", tmp_path / "state"
    Image.fromarray(img).save(src)
    assert cli.main(["denoise", str(src), "-o", str(tmp_path / "plain.png"), "--device", "cpu"]) == 0
    plain = np.asarray(Image.open(tmp_path / "plain.png"))
    for run in ("a", "b"):
        assert cli.main(["denoise", str(src), "-o", str(tmp_path / f"{run}.png"), "--device", "cpu",
                         "--state", str(state), "--channel", "DAPI"]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{run}.png")), plain)
    err = capsys.readouterr().err
    assert "channel 'DAPI': saved to" in err and "channel 'DAPI': resumed from" in err, err


@pytest.mark.parametrize("damage", ["truncate", "dtype"])
def test_unusable_state_is_reported_and_the_channel_learnt_anew(tmp_path, capsys, damage):
    src, state = tmp_path / "in.tif", tmp_path / "state"
    tifffile.imwrite(src, frames(16))
    out = ["-o", str(tmp_path / "o.tif"), "--overwrite", "--device", "cpu", "--state", str(state)]
    assert cli.main(["denoise", str(src), *out]) == 0
    path = StateStore(state).path_for("default")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:  # the same channel name, frames of another dtype
        tifffile.imwrite(src, frames(8))
    capsys.readouterr()
    assert cli.main(["denoise", str(src), *out]) == 0
    err = capsys.readouterr().err
    assert "learnt anew" in err and str(path) in err and "saved to" in err, err
    assert ("unreadable" if damage == "truncate" else "these are |u1") in err, err


def test_no_prior_gives_the_network_alone(tmp_path):
    """`--no-prior`: the same frame and seed, without the block-matched prior averaged in, differ."""
    src = tmp_path / "in.tif"  # large enough for the noise law to be estimated (48x64 is not: no prior)
    tifffile.imwrite(src, TimeLapse((128, 128), Camera(gain=4.0, read_noise=1.5, offset=2, bit_depth=8), seed=1,
                                    peak=40).frame(0)[0])
    for name, extra in (("with.tif", []), ("without.tif", ["--no-prior"])):
        assert cli.main(["denoise", str(src), "-o", str(tmp_path / name), "--device", "cpu", "--threads", "1",
                         *extra]) == 0
    with_prior, alone = tifffile.imread(tmp_path / "with.tif"), tifffile.imread(tmp_path / "without.tif")
    assert with_prior.shape == alone.shape and not np.array_equal(with_prior, alone)
