"""Security edges: CurveZMQ keys (encryption + client authentication) and loopback-only binding."""

import contextlib
import shutil

import pytest
import zmq

from fm2s_stream.adapters.curve import CurveKeys, curve_available, make_keys
from fm2s_stream.adapters.zmq import check_endpoint
from fm2s_stream.cli import main
from fm2s_stream.frame import Frame
from fm2s_stream.wire import encode
from tests.streamkit import Client, noisy_frames, start_service

needs_curve = pytest.mark.skipif(not curve_available(), reason="libzmq without CURVE")


@needs_curve
@pytest.mark.slow
def test_curve_admits_authorised_clients_only(tmp_path):
    keys = CurveKeys(tmp_path / "keys")
    make_keys(keys.directory)
    stranger = CurveKeys(tmp_path / "stranger")  # a valid key pair the server was never told about
    make_keys(stranger.directory)
    shutil.copy(keys.directory / "server.key", stranger.directory / "server.key")  # knows the server

    service = start_service(curve=keys.directory)
    frames = noisy_frames(3)
    try:
        intruder, plain = Client(service, curve=stranger), Client(service)
        for i in range(5):
            for stranger in (intruder, plain):
                with contextlib.suppress(zmq.Again):  # a refused peer may get no pipe: never block on it
                    stranger.push.send_multipart(encode(Frame(frames[i % 3], channel="c", frame_id=i)), zmq.NOBLOCK)
        friend = Client(service, curve=keys)
        for i in range(5):
            friend.send(Frame(frames[i % 3], channel="c", frame_id=100 + i))
        assert friend.wait(5, timeout=60)
        intruder.wait(1, timeout=1)
    finally:
        report = service.stop()
        for c in (intruder, plain, friend):
            c.close()
    assert [h["frame_id"] for h, _ in friend.results] == list(range(100, 105))
    assert intruder.results == [] and plain.results == []  # nothing in, nothing out for strangers
    assert report["source"]["received"] == 5


@needs_curve
def test_keys_command_refuses_to_overwrite_and_serve_needs_keys(tmp_path, capsys):
    assert main(["keys", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k" / "authorized" / "client.key").is_file()
    assert oct((tmp_path / "k" / "server.key_secret").stat().st_mode & 0o777) == "0o600"
    assert main(["keys", str(tmp_path / "k")]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not found"):
        CurveKeys(tmp_path / "missing").load("server", secret=True)


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://192.168.1.4:5555", "tcp://*:5555"])
def test_remote_binding_needs_explicit_consent(endpoint, caplog):
    with pytest.raises(ValueError, match="--bind"):
        check_endpoint(endpoint, allow_remote=False)
    assert check_endpoint(endpoint, allow_remote=True) == endpoint
    assert "unencrypted" in caplog.text
    caplog.clear()
    check_endpoint(endpoint, allow_remote=True, encrypted=True)
    assert "unencrypted" not in caplog.text



def test_channel_names_and_prefixes_cannot_escape_the_save_directory(tmp_path):
    import numpy as np
    import tifffile

    from fm2s_stream.frame import Result
    from fm2s_stream.tiffsink import TiffSink

    save = tmp_path / "save"
    sink = TiffSink(save, "raw", prefix="../../outside")
    sink.open()
    for name in ("../../etc/passwd", "/abs/path", "..", "C:\\\\x"):
        frame = Frame(np.ones((16, 16), np.uint16), channel=name)
        frame.validate()
        sink.write(Result(frame, frame.pixels, "raw", False, 0, 0.0))
    sink.close()
    made = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert made and all(p.parent == save for p in made)
    with tifffile.TiffFile(made[0]) as tif:
        assert "../../etc/passwd" in tif.ome_metadata  # the name is kept as data, never used as a path
