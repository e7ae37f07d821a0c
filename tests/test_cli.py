import dataclasses

import numpy as np
import pytest
import tifffile
from PIL import Image

from fm2s_stream import cli
from fm2s_stream.synthetic import Camera, TimeLapse
from fm2s_stream.training import SCHEDULES, scaled


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
