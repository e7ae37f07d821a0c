import json
import signal
import subprocess
import time

import numpy as np
import pytest
import tifffile
import torch
import zmq

from fm2s_stream.demo import free_port
from fm2s_stream.frame import Frame
from fm2s_stream.synthetic import Camera, TimeLapse
from tests.streamkit import OUTSIDE, Client, fault_row, noisy_frames, serve_command, start_service

pytestmark = pytest.mark.slow


def test_thousand_frames_pull_to_push_none_lost_order_kept(tmp_path):
    service = start_service(save=tmp_path)
    client = Client(service)
    frames = noisy_frames(20)
    for i in range(1000):
        client.send(Frame(frames[i % 20], channel="c0", t=i, frame_id=i))
    assert client.wait(1000, timeout=120), f"only {len(client.results)} of 1000 came back"
    report = service.stop()
    client.close()
    ids = [h["frame_id"] for h, _ in client.results]
    assert ids == list(range(1000))
    assert report["counts"]["in"] == report["counts"]["out"] == 1000
    assert all(px.dtype == np.uint16 and px.shape == (64, 64) for _, px in client.results)
    assert report["files"]["denoised"]["written"] == 1000
    with tifffile.TiffFile(report["files"]["denoised"]["files"][0]) as tif:
        assert tif.is_ome and tif.series[0].shape == (1000, 64, 64)
    statuses = {h["fm2s"]["status"] for h, _ in client.results}
    assert statuses <= {"bootstrap", "denoised"} and "denoised" in statuses


def test_two_channels_get_two_models_and_a_valid_ome_tiff(tmp_path):
    # cold_start="wait": each channel's cold start completes on its first frame, whatever the machine's
    # speed (with "classical" it finishes in idle time, which a fast stream may not leave: flaky)
    service = start_service(save=tmp_path, save_kind="both", cold_start="wait")
    client = Client(service)
    frames = noisy_frames(4)
    for t in range(30):
        for c, name in enumerate(("DAPI", "GFP")):
            client.send(Frame(frames[(t + c) % 4], channel=name, t=t, frame_id=2 * t + c))
    assert client.wait(60)
    report = service.stop()
    client.close()
    assert set(report["channels"]) == {"DAPI", "GFP"}
    steps = {name: (ch["steps"], ch["ready"]) for name, ch in report["channels"].items()}
    assert all(n >= 12 and ready for n, ready in steps.values()), steps
    for kind in ("denoised", "raw"):
        path = report["files"][kind]["files"][0]
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome
            series = tif.series[0]
            assert series.shape == (30, 2, 64, 64) and series.axes == "TCYX"
            assert "DAPI" in tif.ome_metadata and "GFP" in tif.ome_metadata
            data = series.asarray()
    np.testing.assert_array_equal(data[3, 1], frames[(3 + 1) % 4])  # raw file holds the raw pixels


def test_malformed_messages_are_rejected_and_service_keeps_serving():
    service = start_service()
    client = Client(service)
    good = noisy_frames(1)[0]
    h = {"v": 1, "dtype": "<u2", "shape": [64, 64], "channel": "c", "t": 0, "z": 0, "p": 0, "frame_id": 1,
         "ts": 0.0, "meta": {}}
    enc = lambda **kw: json.dumps({**h, **kw}).encode()  # noqa: E731
    bad = [
        [b"not json", good.tobytes()], [enc(), b"\x00" * 10], [enc(shape=[10**5, 10**5]), b"\x00"],
        [enc(dtype="|O"), good.tobytes()], [enc(), good.tobytes(), b"x"], [enc(v=99), good.tobytes()],
        [json.dumps({"dtype": "<u2"}).encode(), good.tobytes()], [enc(shape=[64]), good.tobytes()],
        [b"\xff\xfe", b""], [enc(dtype="<f8", shape=[8, 8]), np.full(64, np.nan).tobytes()], [enc()],
        [enc(channel="a\x01"), good.tobytes()],
    ]
    for parts in bad:
        client.send_raw(parts)
    for i in range(3):
        client.send(Frame(good, channel="c", frame_id=100 + i))
    assert client.wait(3, timeout=60)
    time.sleep(0.2)
    report = service.stop()
    client.close()
    assert [r[0]["frame_id"] for r in client.results] == [100, 101, 102]
    assert report["counts"]["rejected"] == len(bad)
    assert sum(report["rejects"].values()) == len(bad) and len(report["rejects"]) >= 8
    fault_row("malformed wire messages (12 kinds) + 3 good", len(bad) + 3, report["counts"]["out"], "-",
              report["counts"]["rejected"], f"rejected by reason: {len(report['rejects'])} kinds")


def test_shape_change_mid_stream_is_handled_and_files_roll(tmp_path):
    service = start_service(save=tmp_path)
    client = Client(service)
    small, big = noisy_frames(1, (64, 64))[0], noisy_frames(1, (48, 80))[0]
    for i in range(6):
        client.send(Frame(small if i < 3 else big, channel="c", t=i, frame_id=i))
    assert client.wait(6)
    report = service.stop()
    client.close()
    assert [r[1].shape for r in client.results] == [(64, 64)] * 3 + [(48, 80)] * 3
    assert report["channels"]["c"]["shape_changes"] == 1
    fault_row("shape change mid-stream", 6, report["counts"]["out"], report["files"]["denoised"]["written"], 0,
              "file rolled; model re-shaped")
    files = report["files"]["denoised"]["files"]
    assert len(files) == 2 and [tifffile.imread(f).shape for f in files] == [(3, 64, 64), (3, 48, 80)]


def test_serve_killed_with_sigkill_leaves_a_readable_tiff_and_restart_never_overwrites(tmp_path):
    src, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    cmd = serve_command("--source", src, "--publish", pub, "--save", str(tmp_path), "--threads", "1",
                        "--status-every", "0.2")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=OUTSIDE)
    try:
        ctx = zmq.Context.instance()
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        push.connect(src)
        pull.connect(pub)
        pull.setsockopt(zmq.RCVTIMEO, 30000)
        frames = noisy_frames(5)
        acked = []
        for i in range(25):
            push.send_multipart([json.dumps({"v": 1, "dtype": "<u2", "shape": [64, 64], "frame_id": i,
                                             "channel": "c", "t": i}).encode(), frames[i % 5].tobytes()])
            acked.append(json.loads(pull.recv_multipart()[0])["frame_id"])
        proc.send_signal(signal.SIGKILL)  # at once: a frame is published only after it is on disk
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    files = sorted(tmp_path.glob("*.ome.tif"))
    assert len(files) == 1
    with tifffile.TiffFile(files[0]) as tif:
        pages = [json.loads(p.description)["frame_id"] for p in tif.pages]
        data = np.stack([p.asarray() for p in tif.pages])
    assert pages == acked == list(range(25))
    assert data.shape == (25, 64, 64)
    fault_row("serve killed with SIGKILL mid-stream", 25, len(acked), len(pages), 0,
              "every acknowledged frame read back from the TIFF")
    # a restart writes a new file next to it and never touches the old one
    before = files[0].read_bytes()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=OUTSIDE)
    try:
        time.sleep(3)
        push.send_multipart([json.dumps({"v": 1, "dtype": "<u2", "shape": [64, 64], "frame_id": 0,
                                         "channel": "c"}).encode(), frames[0].tobytes()])
        pull.recv_multipart()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out.decode().strip().splitlines()[-1])["counts"]["out"] == 1
    assert files[0].read_bytes() == before
    assert len(sorted(tmp_path.glob("*.ome.tif"))) == 2
    fault_row("restart after SIGKILL, then SIGTERM", 1, 1, 1, 0, "new file; old one untouched; exit 0")
    push.close(0)
    pull.close(0)


def test_remote_bind_needs_explicit_opt_in():
    from fm2s_stream.adapters.zmq import check_endpoint

    with pytest.raises(ValueError, match="not a loopback"):
        check_endpoint("tcp://0.0.0.0:5555", allow_remote=False)
    assert check_endpoint("tcp://127.0.0.1:5555", allow_remote=False)
    assert check_endpoint("tcp://localhost:5555", allow_remote=False)
    assert check_endpoint("tcp://10.1.2.3:5555", allow_remote=True)  # allowed, with a warning
    with pytest.raises(ValueError, match="unsupported endpoint"):
        check_endpoint("udp://127.0.0.1:1", allow_remote=False)


def test_registration_follows_a_panning_stage_and_the_guard_rejects_a_new_scene():
    from fm2s_stream.channel import aligned_pair

    rng = np.random.default_rng(0)
    from scipy import ndimage

    scene = ndimage.gaussian_filter(rng.uniform(0, 1, (300, 300)), 3) * 4
    a = scene[20:276, 20:276] + rng.normal(0, 0.05, (256, 256))
    b = scene[12:268, 15:271] + rng.normal(0, 0.05, (256, 256))  # stage moved by (8, 5)
    t = lambda x: torch.from_numpy(x.astype(np.float32))  # noqa: E731
    pair = aligned_pair(t(a), t(b), threshold=3.0)
    assert pair is not None and pair[0].shape == (248, 251)
    np.testing.assert_allclose(pair[0].numpy(), pair[1].numpy(), atol=0.4)
    other = ndimage.gaussian_filter(rng.uniform(0, 1, (256, 256)), 3) * 4
    assert aligned_pair(t(a), t(other), threshold=3.0) is None
    # the temporal average's registration of the two frames, where it ran, is taken as it is (rounded)
    given = aligned_pair(t(a), t(b), threshold=3.0, shift=(-8.2, -4.9))  # a[y] ~ b[y - shift]
    assert given is not None and given[0].shape == (248, 251)
    np.testing.assert_array_equal(given[0].numpy(), pair[0].numpy())
    assert aligned_pair(t(a), t(b), threshold=3.0, shift=(2.0, -3.0)) is None  # a wrong one: the guard


def test_the_temporal_average_reports_the_shift_it_registered():
    from fm2s_stream.registration import subpixel_shift
    from fm2s_stream.temporal import TemporalAverage

    lapse = TimeLapse((128, 128), Camera(gain=2.0, read_noise=2.0, offset=100.0), seed=5, drift=(0.9, -0.6),
                      peak=60, background=3)
    avg = TemporalAverage(8)
    measured, truths = [], []
    for t in range(4):
        raw, truth = lapse.frame(t)
        truths.append(torch.from_numpy(truth.astype(np.float32)))
        avg.apply(torch.from_numpy(raw.astype(np.float32)), truths[-1])
        measured.append(avg.measured_shift)
    assert measured[0] is None  # no history yet
    for t in range(1, 4):  # aligned_pair's convention: cur[y] ~ prev[y - shift]
        true = subpixel_shift(truths[t], truths[t - 1])
        got = measured[t]
        assert true is not None and got is not None and abs(true[0]) + abs(true[1]) > 0.5
        assert abs(got[0] - true[0]) < 0.1 and abs(got[1] - true[1]) < 0.1, (t, got, true)
    assert TemporalAverage(8, motion=False).measured_shift is None


def test_serve_to_ome_zarr_sigkill_keeps_every_acknowledged_frame_and_a_clean_stop_finalises(tmp_path):
    zarr = pytest.importorskip("zarr")
    src, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    cmd = serve_command("--source", src, "--publish", pub, "--save", str(tmp_path), "--threads", "1",
                        "--status-every", "0", "--save-format", "ome-zarr", "--save-kind", "both")
    ctx = zmq.Context.instance()
    frames = noisy_frames(5)

    def stream(n: int, channels: tuple[str, ...]) -> list[int]:
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        push.connect(src)
        pull.connect(pub)
        pull.setsockopt(zmq.RCVTIMEO, 30000)
        acked = []
        for i in range(n):
            ch = channels[i % len(channels)]
            push.send_multipart([json.dumps({"v": 1, "dtype": "<u2", "shape": [64, 64], "frame_id": i,
                                             "channel": ch, "t": i // len(channels)}).encode(),
                                 frames[i % 5].tobytes()])
            acked.append(json.loads(pull.recv_multipart()[0])["frame_id"])
        push.close(0)
        pull.close(0)
        return acked

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=OUTSIDE)
    try:
        acked = stream(140, ("GFP", "RFP"))  # 70 per channel: past the first T extent (64) allocated
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    stores = sorted(tmp_path.glob("*.ome.zarr"))
    assert [s.name for s in stores] == ["fm2s_denoised_000.ome.zarr", "fm2s_raw_000.ome.zarr"]
    raw = zarr.open_group(str(stores[1]), mode="r")
    log = [json.loads(line) for line in (stores[1] / "fm2s_frames.jsonl").read_text().splitlines()]
    assert [h["frame_id"] for h in log] == acked == list(range(140))
    assert raw.attrs["fm2s"]["complete"] is False
    for h in log:  # every acknowledged raw frame reads back, bit for bit, where the log says
        np.testing.assert_array_equal(raw["0"][h["T"], h["C"]], frames[h["frame_id"] % 5])
    fault_row("serve --save-format ome-zarr killed with SIGKILL", 140, len(acked), len(log), 0,
              "every acknowledged frame read back from the OME-Zarr")

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=OUTSIDE)
    try:
        time.sleep(3)
        stream(4, ("GFP", "RFP"))
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    new = tmp_path / "fm2s_denoised_001.ome.zarr"
    group = zarr.open_group(str(new), mode="r")
    assert group.attrs["fm2s"]["complete"] is True and group["0"].shape == (2, 2, 64, 64)
    assert [c["label"] for c in group.attrs["ome"]["omero"]["channels"]] == ["GFP", "RFP"]
    heads = [json.loads(line) for line in (new / "fm2s_frames.jsonl").read_text().splitlines()]
    assert all(h["fm2s"]["status"] in ("bootstrap", "denoised") for h in heads)
