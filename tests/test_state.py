"""Persistent channel state: a known channel starts warm; bad state never costs a frame."""

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fm2s_stream.channel import ChannelConfig
from fm2s_stream.cli import main
from fm2s_stream.frame import Frame
from fm2s_stream.offline import denoise_kept
from fm2s_stream.pipeline import Pipeline, PipelineConfig
from fm2s_stream.presets import get_preset
from fm2s_stream.sinks import MemorySink
from fm2s_stream.state import StateStore
from fm2s_stream.training import SCHEDULES, scaled
from tests.streamkit import OUTSIDE, fault_row, noisy_frames

FAST = dict(cold_start_steps=12, cold_start_crop=32, finetune_crop=32)


def run(state_dir, frames, channel="GFP", cold_start="wait", **kw):
    sink = MemorySink()
    config = PipelineConfig(ChannelConfig(get_preset("confocal"), **FAST), threads=1, cold_start=cold_start,
                            state_dir=str(state_dir), **kw)
    with Pipeline(config, [sink]) as pipe:
        for i, f in enumerate(frames):
            pipe.submit(Frame(f, channel=channel, t=i, frame_id=i))
    return pipe, [r.status for r in sink.results]


def test_a_known_channel_is_network_denoised_from_its_first_frame(tmp_path):
    frames = noisy_frames(6)
    first, _ = run(tmp_path, frames)
    assert first.stats()["state"]["saved"] >= 1
    second, statuses = run(tmp_path, frames[:3], cold_start="classical")
    assert statuses == ["denoised"] * 3, statuses
    assert second.state_loaded == {"GFP": "resumed"}
    learnt = second.channels["GFP"].learner
    assert learnt.steps >= first.channels["GFP"].learner.steps  # it continues from where the first run stopped
    saved = torch.load(StateStore(tmp_path).path_for("GFP"), weights_only=True)
    assert set(saved["tensors"]["net"]) == set(learnt.net.state_dict())
    assert json.loads(saved["meta"])["frames_learnt"] == 6 + 3  # both runs' frames


def test_an_unfinished_cold_start_continues_in_the_next_run(tmp_path):
    config = dict(cold_start_steps=400)
    sink = MemorySink()
    cfg = PipelineConfig(ChannelConfig(get_preset("confocal"), **{**FAST, **config}), threads=1,
                         state_dir=str(tmp_path))
    with Pipeline(cfg, [sink]) as pipe:
        pipe.submit(Frame(noisy_frames(1)[0], channel="GFP"))
        while pipe.channels.get("GFP") is None or pipe.channels["GFP"].steps < 30:
            time.sleep(0.01)
    first = pipe.channels["GFP"].steps
    assert not pipe.channels["GFP"].ready
    with Pipeline(cfg, [MemorySink()]) as again:
        again.submit(Frame(noisy_frames(1)[0], channel="GFP"))
    assert again.state_loaded == {"GFP": "resumed"}
    assert again.channels["GFP"].steps >= first  # the schedule's position was kept, not restarted


def test_state_listing_names_the_channel(tmp_path, capsys):
    run(tmp_path, noisy_frames(3), channel="mCherry 561")
    assert main(["state", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mCherry 561" in out and "<u2" in out


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign version", "other dtype", "pickle",
                                    "bad noise parameters"])
def test_bad_state_warns_and_the_channel_starts_cold_losing_nothing(tmp_path, damage, caplog):
    frames = noisy_frames(4)
    run(tmp_path, frames)
    path = StateStore(tmp_path).path_for("GFP")
    if damage == "corrupt":
        path.write_bytes(os.urandom(2000))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "foreign version":
        data = torch.load(path, weights_only=True)
        data["meta"] = data["meta"].replace('"format": 1', '"format": 99')
        torch.save(data, path)
    elif damage == "bad noise parameters":  # a readable file whose preset is out of range (rho <= 0.7)
        data = torch.load(path, weights_only=True)
        meta = json.loads(data["meta"])
        meta["preset"]["rho"] = 5.0
        data["meta"] = json.dumps(meta)
        torch.save(data, path)
    elif damage == "pickle":  # an object the safe loader must refuse (it would run code when unpickled)
        torch.save({"meta": "{}", "tensors": {}, "evil": os.system}, path)
    frames_in = frames if damage != "other dtype" else [(f // 256).astype(np.uint8) for f in frames]
    pipe, statuses = run(tmp_path, frames_in, cold_start="classical")
    assert len(statuses) == len(frames_in) and "raw" not in statuses  # every frame answered
    reason = pipe.state_loaded["GFP"]
    assert reason != "resumed" and (str(path) in reason or damage in ("other dtype", "bad noise parameters")), reason
    assert any("starts cold" in r.message for r in caplog.records)
    why = reason.split(": ", 1)[-1][:48]
    fault_row(f"state file {damage}", len(frames_in), len(statuses), "-", 0, f"channel cold: {why}")


def test_unwritable_state_dir_warns_and_the_stream_runs(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file-not-dir"  # root ignores permissions: a path under a regular file fails
        target.write_text("")
        state_dir = target / "state"
    else:
        state_dir = tmp_path / "ro"
        state_dir.mkdir()
        state_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    pipe, statuses = run(state_dir, noisy_frames(4))
    assert statuses == ["denoised"] * 4
    report = pipe.stats()["state"]
    assert report["writable"] is False and report["saved"] == 0
    fault_row("state dir not writable", 4, len(statuses), "-", 0, "warned at start; nothing saved; stream ran")


SAVER = """
import sys, torch
from fm2s_stream.state import StateStore
store = StateStore(sys.argv[1])
tensors, meta = store.load("GFP")
tensors["pad"] = torch.zeros(1 << 23)  # 32 MB: each save takes a while, so the kill lands inside one
print("saving", flush=True)
i = 0
while True:
    i += 1
    store.save("GFP", tensors, {**meta, "frames_learnt": i})
"""


def test_sigkill_during_saves_leaves_a_loadable_state(tmp_path):
    frames = noisy_frames(4)
    run(tmp_path, frames)
    store = StateStore(tmp_path)
    mid_save = attempt = 0
    while mid_save < 2 and attempt < 12:  # a real process, saving in a loop, killed at a random moment
        attempt += 1
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], stdout=subprocess.PIPE, cwd=OUTSIDE)
        assert saver.stdout is not None and saver.stdout.readline() == b"saving\n"
        time.sleep(0.2 + 0.07 * attempt)
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        leftovers = list(tmp_path.glob(".*.tmp-*"))
        mid_save += bool(leftovers)
        tensors, meta = store.load("GFP")  # the last complete save, whatever the kill interrupted
        assert meta["frames_learnt"] >= 1 and "net" in tensors
        for leftover in leftovers:
            leftover.unlink()
    assert mid_save >= 1  # at least one kill really landed inside a save
    _, statuses = run(tmp_path, frames[:2], cold_start="classical")
    assert statuses == ["denoised"] * 2
    fault_row("SIGKILL mid-save (a real saving process)", 2, len(statuses), "-", 0,
              f"last complete state loaded; {mid_save} of {attempt} kills inside a save")


def test_a_channel_learnt_by_denoise_starts_a_stream_warm(tmp_path):
    frames = noisy_frames(3)
    quick = dataclasses.replace(scaled(SCHEDULES["fast"], 0.05), crop=32)
    out, notes = denoise_kept(frames[0], tmp_path, "GFP", "confocal", quick, "cpu")
    assert out.shape == frames[0].shape and "saved to" in notes["GFP"]
    pipe, statuses = run(tmp_path, frames, cold_start="classical")
    assert statuses == ["denoised"] * 3, statuses
    assert pipe.state_loaded == {"GFP": "resumed"}
