"""Denoising a stored stack on a real Dask cluster (a scheduler and workers as processes on loopback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

from fm2s_stream.demo import free_port  # noqa: E402
from fm2s_stream.synthetic import Camera, TimeLapse  # noqa: E402
from tests.streamkit import OUTSIDE  # noqa: E402

pytestmark = pytest.mark.slow


def _stack(path: Path, n: int, shape: tuple[int, int] = (96, 96)) -> np.ndarray:
    import tifffile

    lapse = TimeLapse(shape, Camera(gain=900.0, offset=300), seed=1, peak=40)
    stack = np.stack([lapse.frame(t)[0] for t in range(n)])
    tifffile.imwrite(path, stack, ome=True, metadata={"axes": "TYX"})
    return stack


def _denoise(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fm2s_stream.cli", "denoise", *args, "--device", "cpu", "--threads", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=OUTSIDE, timeout=timeout)


def _chunks(store: Path) -> int:
    root = store / "0" / "c"
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def test_a_killed_worker_still_leaves_a_complete_identical_ome_zarr(tmp_path):
    from fm2s_stream.adapters.files import ImageInfo
    from fm2s_stream.adapters.ngff import NgffWriter

    stack = _stack(tmp_path / "in.ome.tif", 600)
    src = tmp_path / "in.ome.zarr"  # the input: an OME-Zarr the workers read planes from
    writer = NgffWriter(src, stack.shape, stack.dtype, "TYX", ImageInfo())
    for plane in stack:
        writer.write(plane)
    writer.finish()

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    # the environment's own dask command (beside this python: the venv need not be activated)
    beside = Path(sys.executable).with_name("dask")
    dask = str(beside) if beside.exists() else "dask"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=OUTSIDE, env=env)]
    time.sleep(1.5)
    workers = [subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                 "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=OUTSIDE, env=env) for _ in range(2)]
    procs += workers
    try:
        out = tmp_path / "out.ome.zarr"
        run = subprocess.Popen([sys.executable, "-m", "fm2s_stream.cli", "denoise", str(src), "-o", str(out),
                                "--scheduler", address, "--device", "cpu", "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=OUTSIDE)
        end = time.monotonic() + 240
        while _chunks(out) < 40 and run.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
        killed_at = _chunks(out)
        workers[0].send_signal(signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        assert killed_at < 600, "the run ended before a worker could be killed"
        summary = json.loads(stdout.strip().splitlines()[-2])["dask"]  # (the last line is "in -> out")
        assert summary["planes"] == 600
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    single = tmp_path / "single.ome.zarr"
    assert _denoise(str(src), "-o", str(single)).returncode == 0
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(out)))()))  # valid OME-Zarr for an independent reader
    assert node.data[0].shape == stack.shape and node.data[0].dtype == stack.dtype
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["fm2s"]["complete"] is True
    np.testing.assert_array_equal(group["0"][:], zarr.open_group(str(single), mode="r")["0"][:])


def test_workers_need_an_ome_zarr_output_before_any_computation(tmp_path):
    _stack(tmp_path / "in.tif", 4, (32, 32))
    done = _denoise(str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--workers", "2")
    assert done.returncode == 2 and "OME-Zarr" in done.stderr and "learnt" not in done.stderr
