"""The per-frame engine on a real CUDA device (skipped without one; `benchmarks/gpu.sh` runs these)."""

import json

import numpy as np
import pytest
import torch

from fm2s_stream.channel import Channel, ChannelConfig
from fm2s_stream.frame import Frame
from fm2s_stream.pipeline import Pipeline, PipelineConfig
from fm2s_stream.presets import get_preset
from fm2s_stream.sinks import MemorySink
from fm2s_stream.synthetic import Camera, TimeLapse

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def frames(n: int, size: int = 256) -> list[np.ndarray]:
    lapse = TimeLapse((size, size), Camera(gain=2.0, read_noise=3.0, offset=100.0), seed=0, drift=(0.2, 0.1))
    return [lapse.frame(t)[0] for t in range(n)]


def test_a_cuda_stream_is_network_denoised_and_keeps_learning():
    sink = MemorySink()
    config = PipelineConfig(ChannelConfig(get_preset("confocal"), device=CUDA, cold_start_steps=60), threads=2,
                            cold_start="wait")
    with Pipeline(config, sinks=[sink]) as pipe:
        for i, f in enumerate(frames(40)):
            pipe.submit(Frame(f, channel="c", frame_id=i))
    statuses = [r.status for r in sink.results]
    counts = pipe.stats()["counts"]
    assert statuses == ["denoised"] * 40, statuses
    assert counts.get("train_failures", 0) == 0 and pipe.channels["c"].learner.restores == 0, counts
    assert pipe.channels["c"].steps > 60, pipe.channels["c"].steps  # fine-tune steps after the cold start
    assert all(r.pixels.dtype == np.uint16 for r in sink.results)


def test_one_frame_sized_copy_each_way_per_frame(tmp_path):
    channel = Channel("c", ChannelConfig(get_preset("confocal"), device=CUDA, cold_start_steps=10))
    fs = frames(6, 512)
    for f in fs[:4]:  # cold start done, history present
        prep = channel.prepare(f)
        channel.answer(prep)
        channel.remember(prep)
        while not channel.ready:
            channel.learn_step(prep)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prep = channel.prepare(fs[4])
        channel.answer(prep)
        torch.cuda.synchronize()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    frame_bytes = fs[4].nbytes
    big = [(e["name"], e.get("args", {}).get("bytes", 0)) for e in events
           if "Memcpy" in e.get("name", "") and e.get("args", {}).get("bytes", 0) >= frame_bytes // 2]
    assert sorted(n.split()[1] for n, _ in big) == ["DtoH", "HtoD"], big  # the frame up, the result down


def test_cuda_and_cpu_engines_agree_on_one_frame():
    outs = {}
    for dev in (torch.device("cpu"), CUDA):
        channel = Channel("c", ChannelConfig(get_preset("confocal"), device=dev, inference_dtype="float32",
                                             average_frames=1))
        channel.learner.steps = channel.learner.schedule.total_steps  # answer with the (same) network
        channel.learner.net.load_state_dict({k: v.to(dev) for k, v in
                                             Channel("x", ChannelConfig(get_preset("confocal"))).learner.net
                                             .state_dict().items()})
        outs[dev.type] = channel.answer(channel.prepare(frames(1, 300)[0]))[0].astype(np.int32)
    assert np.abs(outs["cpu"] - outs["cuda"]).max() <= 1
