"""Faults with real processes, sockets and files: every frame is delivered, written, or reported."""

import json
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import zmq

from fm2s_stream.demo import free_port
from fm2s_stream.frame import Frame
from tests.streamkit import Client, noisy_frames, start_service

pytestmark = pytest.mark.slow


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))  # ~11 frames of 256x256 uint16
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG instead of killing


def test_disk_full_is_reported_and_zmq_output_continues(tmp_path):
    src, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fm2s_stream.cli", "serve", "--source", src, "--publish", pub, "--save",
         str(tmp_path), "--roll-every", "1000000", "--threads", "1", "--status-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limit_file_size,
    )
    ctx = zmq.Context.instance()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.connect(src)
    pull.connect(pub)
    pull.setsockopt(zmq.RCVTIMEO, 60000)
    frames = noisy_frames(4, (256, 256))
    got = []
    try:
        for i in range(30):
            push.send_multipart([json.dumps({"v": 1, "dtype": "<u2", "shape": [256, 256], "frame_id": i,
                                             "channel": "c"}).encode(), frames[i % 4].tobytes()])
            got.append(json.loads(pull.recv_multipart()[0])["frame_id"])
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        push.close(0)
        pull.close(0)
    assert proc.returncode == 0, err.decode()[-2000:]
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert got == list(range(30))  # the ZMQ output never stopped
    files = report["files"]["denoised"]
    missing = sum(g["count"] for g in files["gaps"])
    assert files["written"] + missing == 30 and missing > 0  # every frame written or reported
    assert files["gaps"][0]["reason"] and "cannot write" in err.decode()
    written = 0
    for path in files["files"]:
        try:
            with tifffile.TiffFile(path) as tif:
                written += len(tif.pages)
        except (tifffile.TiffFileError, ValueError):
            pass
    assert written >= files["written"] - 1  # pages on disk read back (the last may be cut by the limit)


def test_no_receiver_and_a_receiver_that_leaves_do_not_stall_disk(tmp_path):
    service = start_service(save=tmp_path)
    frames = noisy_frames(3)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.connect(service.options.source)
    from fm2s_stream.wire import encode

    for i in range(20):  # nobody listens on the publish socket
        push.send_multipart(encode(Frame(frames[i % 3], channel="c", frame_id=i)), copy=False)
    client = Client(service)  # a receiver connects ...
    for i in range(20, 40):
        client.send(Frame(frames[i % 3], channel="c", frame_id=i))
    deadline = time.monotonic() + 60
    while 39 not in {h["frame_id"] for h, _ in list(client.results)} and time.monotonic() < deadline:
        time.sleep(0.02)
    client.close()  # ... and leaves
    time.sleep(0.3)
    for i in range(40, 60):
        push.send_multipart(encode(Frame(frames[i % 3], channel="c", frame_id=i)), copy=False)
    deadline = time.monotonic() + 60
    while service.pipeline.counts["out"] < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    report = service.stop()
    push.close(0)
    assert report["counts"]["out"] == 60
    assert report["files"]["denoised"]["written"] == 60  # disk got every frame throughout
    pub = report["publish"]
    assert pub["sent"] >= 20 and pub["sent"] + pub["no_receiver"] == 60
    ids = [r[0]["frame_id"] for r in client.results]
    assert ids == sorted(ids) and set(range(20, 40)) <= set(ids)


def test_bad_frames_through_the_api_are_counted_and_the_stream_survives():
    from fm2s_stream.channel import ChannelConfig
    from fm2s_stream.pipeline import Pipeline, PipelineConfig
    from fm2s_stream.presets import get_preset

    pipe = Pipeline(PipelineConfig(ChannelConfig(get_preset("confocal"), bootstrap_steps=5, bootstrap_crop=32))).start()
    bad = [np.full((16, 16), np.nan), np.ones((16, 16), np.float64), np.ones((16, 16), np.int32),
           np.ones((16, 16), bool), np.ones((0, 16), np.uint8), np.ones((1, 1), np.uint16),
           np.ones((4, 16, 16), np.uint16), np.ones((16, 16, 3), np.uint8)]
    assert not any(pipe.submit(Frame(b, channel="c")) for b in bad)
    assert not pipe.submit(Frame(np.ones((16, 16), np.uint16), channel="\udcff bad"))
    assert pipe.submit(Frame(np.ones((16, 16), np.uint16) * 100, channel="c"))
    pipe.stop()
    s = pipe.stats()
    assert s["counts"]["rejected"] == len(bad) + 1 and s["counts"]["out"] == 1
