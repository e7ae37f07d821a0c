import pytest
import torch

from fm2s_stream.learner import Learner, cold_start_schedule
from fm2s_stream.model import FM2SNet, FusedCPUNet, PaddedCPUNet, count_parameters, fused_for_cpu, load_answering
from fm2s_stream.presets import get_preset
from fm2s_stream.training import collapse_for_inference


def test_parameter_count_matches_paper():
    assert count_parameters(FM2SNet(1)) == 3529
    assert count_parameters(FM2SNet(2)) > 3529


def test_forward_keeps_shape_and_channels():
    net = FM2SNet(2)
    x = torch.rand(3, 2, 40, 56)
    assert net(x).shape == x.shape
    assert net.denoise(torch.rand(1, 1, 40, 56)).shape == (1, 1, 40, 56)


def test_collapsed_network_is_exactly_equivalent():
    torch.manual_seed(0)
    for c in (1, 2, 6):
        net = FM2SNet(c)
        x = torch.rand(1, 1, 33, 47)
        with torch.no_grad():
            ref = net.denoise(x)
            one = collapse_for_inference(net)(x)
        assert count_parameters(collapse_for_inference(net)) == 3529
        torch.testing.assert_close(one, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_network_answers_as_the_eager_one(dtype):
    torch.manual_seed(1)
    net = FM2SNet(1)
    with torch.no_grad():  # a strongly negative bias: most pre-activations are below 0, so the slope matters
        net.body[0].bias.sub_(0.3)
    net = net.to(dtype).eval()
    fused = fused_for_cpu(net)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN: the eager network is used")
    if dtype == torch.bfloat16 and fused is net:
        with pytest.raises(RuntimeError, match="bf16"):  # the only reason to fall back: the CPU lacks bf16
            FusedCPUNet(net)(torch.rand(1, 1, 8, 8, dtype=dtype))
        pytest.skip("this CPU has no bfloat16 convolutions: the eager network is used")
    assert isinstance(fused, PaddedCPUNet if dtype == torch.float32 else FusedCPUNet)
    x = torch.rand(2, 1, 45, 61, dtype=dtype)
    with torch.inference_mode():
        want, got = net(x).float(), fused(x).float()
        relu = net.body[4](torch.relu(net.body[2](torch.relu(net.body[0](x))))).float()
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    assert float((got - want).abs().max()) <= tol, float((got - want).abs().max())
    if dtype == torch.float32:  # the fused op applies the leaky slope, not a plain ReLU
        assert float((relu - want).abs().max()) > 100 * float((got - want).abs().max())


def test_padded_network_follows_new_weights_and_stays_exact():
    torch.manual_seed(2)
    net = FM2SNet(1).eval()
    padded = fused_for_cpu(net)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN: the eager network is used")
    assert isinstance(padded, PaddedCPUNet)
    assert count_parameters(padded) == 0  # its weights are buffers, copies of the network's
    x = torch.rand(1, 1, 70, 33)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with torch.inference_mode():
        stale = float((padded(x) - net(x)).abs().max())
        load_answering(padded, list(net.parameters()))
        fresh = float((padded(x) - net(x)).abs().max())
        # the zero filters stay zero: nothing of the padding reaches the answer
        assert float(padded.w1[12:].abs().max()) == 0 and float(padded.w2[12:].abs().max()) == 0
    assert stale > 1e-3 and fresh <= 2e-6, (stale, fresh)


def test_cpu_learner_answers_with_the_fused_network():
    learner = Learner(get_preset("widefield"), cold_start_schedule(10), torch.device("cpu"), inference_dtype="float32")
    learner.infer(torch.rand(32, 32))
    fused = isinstance(learner._inference_net, (FusedCPUNet, PaddedCPUNet))
    assert fused == torch.backends.mkldnn.is_available()


def test_the_answering_network_follows_every_step_restore_and_load():
    learner = Learner(get_preset("confocal"), cold_start_schedule(6), torch.device("cpu"), inference_dtype="float32")
    unit = torch.rand(48, 48)

    def fresh() -> torch.Tensor:  # the network as a newly built inference copy answers
        with torch.inference_mode():
            return fused_for_cpu(collapse_for_inference(learner.net))(unit[None, None])[0, 0]

    first = learner.infer(unit)
    torch.testing.assert_close(first, fresh(), atol=1e-6, rtol=1e-6)
    while not learner.ready:
        learner.cold_step(unit)
    learner.finetune_step(unit)
    moved = learner.infer(unit)
    assert float((moved - first).abs().max()) > 1e-4  # the steps changed the answer ...
    torch.testing.assert_close(moved, fresh(), atol=1e-6, rtol=1e-6)  # ... and it is the network's
    state = learner.tensors()
    learner.finetune_step(unit)
    learner.load_tensors(state)
    torch.testing.assert_close(learner.infer(unit), moved, atol=1e-6, rtol=1e-6)
