"""Starting points of a new channel's network: the shipped generic network, a donor channel, random."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm2s_stream.channel import ChannelConfig
from fm2s_stream.frame import Frame
from fm2s_stream.model import FM2SNet
from fm2s_stream.pipeline import Pipeline, PipelineConfig
from fm2s_stream.presets import get_preset
from fm2s_stream.sinks import MemorySink
from fm2s_stream.starting import expand, generic_state
from fm2s_stream.training import collapse_for_inference
from tests.streamkit import noisy_frames


def test_the_generic_network_ships_as_plain_arrays_and_expands_to_the_same_function():
    state = generic_state()
    assert state is not None and sum(v.numel() for v in state.values()) == sum(
        p.numel() for p in FM2SNet(1).parameters())
    one = FM2SNet(1)
    one.load_state_dict(state)
    two = FM2SNet(2)
    two.load_state_dict(expand(state, 2))
    x = torch.rand(1, 1, 40, 40)
    with torch.no_grad():
        a = one(x)
        b = two(x.expand(-1, 2, -1, -1).contiguous())
    torch.testing.assert_close(b[:, :1], a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[:, 1:], a, atol=1e-5, rtol=1e-5)
    c = collapse_for_inference(two)  # what inference runs: the same network again
    with torch.no_grad():
        torch.testing.assert_close(c(x), a, atol=1e-5, rtol=1e-5)
    assert one(x).std() > 0  # a trained network, not zeros


def _first_weights(init: str, preset: str = "confocal") -> torch.Tensor:
    config = PipelineConfig(ChannelConfig(get_preset(preset), init=init, cold_start_steps=5, cold_start_crop=32),
                            threads=1)
    pipe = Pipeline(config, [MemorySink()])
    channel = pipe.channel_for("c", noisy_frames(1)[0])
    return channel.learner.net.state_dict()["body.0.weight"].clone()


@pytest.mark.parametrize("preset", ["confocal", "widefield"])  # 2 and 1 input channels
def test_init_generic_and_auto_load_the_generic_network_random_does_not(preset):
    generic = expand(generic_state(), get_preset(preset).n_chan)["body.0.weight"]
    torch.testing.assert_close(_first_weights("generic", preset), generic)
    torch.testing.assert_close(_first_weights("auto", preset), generic)
    assert not torch.allclose(_first_weights("random", preset), generic)


def test_init_channel_starts_warm_from_that_channel_and_falls_back_when_it_is_not_ready(caplog):
    config = PipelineConfig(ChannelConfig(get_preset("confocal"), init="GFP", cold_start_steps=8,
                                          cold_start_crop=32, finetune_crop=32), threads=1, cold_start="wait")
    sink = MemorySink()
    pipe = Pipeline(config, [sink]).start()
    try:
        early = pipe.channel_for("DAPI", noisy_frames(1)[0])  # GFP does not exist yet: auto (generic) instead
        assert not early.ready and "no trained network" in caplog.text
        frames = noisy_frames(3)
        for i, f in enumerate(frames):
            pipe.submit(Frame(f, channel="GFP", frame_id=i))
        sink.wait_for(2)  # the last frame's answer
        pipe.stop()  # the worker is done: GFP's network no longer changes under the comparison below
        late = pipe.channel_for("mCherry", frames[0])
        assert late.ready  # started from GFP's trained network: no cold start
        gfp = pipe.channels["GFP"].learner.net.state_dict()
        np.testing.assert_array_equal(late.learner.net.state_dict()["body.0.weight"].numpy(),
                                      gfp["body.0.weight"].numpy())
    finally:
        pipe.stop()
