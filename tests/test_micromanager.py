"""The Micro-Manager edge against a real MMCore (pymmcore-plus UniMMCore with a Python camera)."""

import time

import numpy as np
import pytest

pytest.importorskip("pymmcore_plus", reason="needs the micromanager extra (pymmcore-plus)")
useq = pytest.importorskip("useq", reason="needs useq-schema")

from fm2s_stream.adapters.mm_demo import build_core  # noqa: E402
from fm2s_stream.adapters.mmcore import MMCoreSource, SignalSink  # noqa: E402
from fm2s_stream.adapters.pycromanager import Fm2sHook  # noqa: E402
from fm2s_stream.channel import ChannelConfig  # noqa: E402
from fm2s_stream.pipeline import Pipeline, PipelineConfig  # noqa: E402
from fm2s_stream.presets import get_preset  # noqa: E402
from fm2s_stream.sinks import MemorySink  # noqa: E402

pytestmark = [pytest.mark.hardware, pytest.mark.slow]

QUICK = ChannelConfig(get_preset("confocal"), cold_start_steps=15, cold_start_crop=64, finetune_crop=64)


@pytest.fixture(scope="module")
def core():
    return build_core(("GFP", "mCherry"), shape=(512, 512))


def test_mda_two_channels_twenty_timepoints_every_frame_denoised_in_order(core):
    sink, shown = MemorySink(), []
    signal = SignalSink()
    signal.frameDenoised.connect(lambda px, frame, info: shown.append(frame.frame_id))
    pipe = Pipeline(PipelineConfig(QUICK, threads=2, cold_start="wait"), [sink, signal]).start()
    source = MMCoreSource(core, block=True)
    source.start(pipe)
    t0 = time.perf_counter()
    core.mda.run(useq.MDASequence(channels=["GFP", "mCherry"], time_plan={"interval": 0, "loops": 20}))
    source.stop()
    pipe.stop()
    wall = time.perf_counter() - t0
    res = sink.results
    assert len(res) == 40 and source.dropped == 0
    assert {r.status for r in res} == {"denoised"}
    assert set(pipe.channels) == {"GFP", "mCherry"}
    for ch in ("GFP", "mCherry"):
        ts = [r.frame.t for r in res if r.frame.channel == ch]
        assert ts == list(range(20))
    assert all(r.pixels.dtype == np.uint16 and r.pixels.shape == (512, 512) for r in res)
    assert all(r.latency_ms > 0 for r in res) and sorted(shown) == list(range(40))
    lat = np.array([r.latency_ms for r in res])
    print(f"\nMDA 2x20 512x512 uint16: {40 / wall:.1f} frames/s end to end, latency p50 {np.median(lat):.0f} ms "
          f"p99 {np.percentile(lat, 99):.0f} ms (includes the two cold starts), acquisition-thread time "
          f"per frame p50 {1000 * np.median(source.callback_s):.2f} ms")


def test_live_mode_forwards_every_frame(core):
    sink = MemorySink()
    pipe = Pipeline(PipelineConfig(QUICK, threads=2), [sink]).start()
    source = MMCoreSource(core, block=True, live_channel="live")
    source.start(pipe)
    core.setExposure(20)
    source.start_live()
    time.sleep(2.0)
    source.stop()
    pipe.stop()
    assert source.submitted >= 10 and source.dropped == 0
    assert len(sink.results) == source.submitted
    assert [r.frame.t for r in sink.results] == list(range(source.submitted))


def mda_frames(core, n=6):
    """Real images and events from the core's MDA, with pycromanager-style metadata (Axes)."""
    frames = []
    core.mda.events.frameReady.connect(
        lambda img, ev, md: frames.append((np.array(img), {"Axes": {"time": ev.index.get("t", 0),
                                                                   "channel": ev.channel.config}})))
    core.mda.run(useq.MDASequence(channels=["GFP"], time_plan={"interval": 0, "loops": n}))
    core.mda.events.frameReady.disconnect()
    return frames


@pytest.mark.parametrize("mode", ["divert", "replace", "both"])
def test_pycromanager_hook_modes_keep_dtype_and_never_raise(core, mode):
    frames = mda_frames(core)
    sink = MemorySink()
    hook = Fm2sHook(PipelineConfig(QUICK, threads=2, cold_start="wait"), mode=mode, sinks=[sink], deadline_s=30)
    outs = [hook(img, dict(md)) for img, md in frames]
    report = hook.close()
    assert len(sink.results) == len(frames)
    for (img, _), out in zip(frames, outs):
        if mode == "divert":
            assert out[0] is img  # untouched, no copy handed back
        elif mode == "replace":
            assert out[0].dtype == img.dtype and out[0].shape == img.shape and not np.array_equal(out[0], img)
            assert out[1]["fm2s"]["status"] == "denoised"
        else:
            (raw, _), (den, md) = out
            assert raw is img and den.dtype == img.dtype and md["Axes"]["channel"] == "GFP-fm2s"
    if mode == "divert":
        assert report["hook"]["p50_ms"] < 1.0, report["hook"]


def test_hook_failure_inside_the_denoiser_passes_raw_and_keeps_going(core, monkeypatch):
    frames = mda_frames(core, n=4)
    hook = Fm2sHook(PipelineConfig(QUICK, threads=2, cold_start="wait"), mode="replace", deadline_s=30)
    model = hook.pipeline.channel_for("GFP")

    calls = {"n": 0}
    real_answer = model.answer

    def flaky(prep):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected CUDA-like failure")
        return real_answer(prep)

    monkeypatch.setattr(model, "answer", flaky)
    outs = [hook(img, dict(md)) for img, md in frames]
    report = hook.close()
    statuses = [o[1]["fm2s"]["status"] for o in outs]
    assert statuses == ["denoised", "raw", "denoised", "denoised"]
    assert outs[1][0] is frames[1][0] and report["hook"]["errors"] == 1
    assert report["counts"]["raw"] == 1 and model.learner.restores >= 1


@pytest.mark.parametrize("mode", ["divert", "replace"])
def test_hook_inside_a_real_pycromanager_acquisition_writes_ndtiff(tmp_path, mode):
    ndtiff = pytest.importorskip("ndtiff", reason="needs ndtiff")
    pytest.importorskip("pycromanager", reason="needs pycromanager")
    from tests.pycromanager_shim import run_acquisition

    sink = MemorySink()
    hook = Fm2sHook(PipelineConfig(QUICK, threads=2, cold_start="wait"), mode=mode, sinks=[sink], deadline_s=30)
    path = run_acquisition(str(tmp_path), hook, timepoints=4)
    report = hook.close()
    data = np.asarray(ndtiff.Dataset(path).as_array())
    assert data.shape[-2:] == (128, 128) and data.reshape(-1, 128, 128).shape[0] == 4
    assert data.dtype == np.uint16
    assert len(sink.results) == 4 and report["hook"]["calls"] == 4
    stored = data.reshape(-1, 128, 128)
    if mode == "divert":
        np.testing.assert_array_equal(stored, np.stack([r.frame.pixels for r in sink.results]))
    else:
        np.testing.assert_array_equal(stored, np.stack([r.pixels for r in sink.results]))
        assert report["hook"]["denoised"] == 4
