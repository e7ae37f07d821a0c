import torch

from fm2s_stream.model import FM2SNet, count_parameters
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
