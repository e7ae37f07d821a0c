"""The FM2S network: three convolutions, about 3.5k parameters for one channel."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FM2SNet", "FusedCPUNet", "PaddedCPUNet", "count_parameters", "fused_for_cpu", "load_answering"]

NEGATIVE_SLOPE = 1e-3  # the paper's LeakyReLU slope
PADDED_WIDTH = 16  # PaddedCPUNet's middle width: the 12 filters padded to a multiple of the 8 float32 AVX2 lanes


class FM2SNet(nn.Module):
    """conv5x5 C->24, LeakyReLU(1e-3), conv3x3 24->12, LeakyReLU, conv5x5 12->C ("same" padding).

    The grey frame is replicated into `n_chan` channels at the input; `denoise` returns the
    channel mean, the paper's inference rule.
    """

    def __init__(self, n_chan: int = 1) -> None:
        super().__init__()
        self.n_chan = n_chan
        self.body = nn.Sequential(
            nn.Conv2d(n_chan, 24, 5, padding=2),
            nn.LeakyReLU(NEGATIVE_SLOPE),
            nn.Conv2d(24, 12, 3, padding=1),
            nn.LeakyReLU(NEGATIVE_SLOPE),
            nn.Conv2d(12, n_chan, 5, padding=2),
        )

    def convs(self) -> tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]:
        """The three convolutions, in order."""
        a, b, c = (m for m in self.body if isinstance(m, nn.Conv2d))
        return a, b, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map an (N, n_chan, H, W) batch to an (N, n_chan, H, W) batch."""
        return self.body(x)

    def denoise(self, image: torch.Tensor) -> torch.Tensor:
        """Denoise an (N, 1, H, W) batch: replicate, run, and average the output channels."""
        x = image.expand(-1, self.n_chan, -1, -1).contiguous(memory_format=torch.channels_last)
        return self.body(x).mean(dim=1, keepdim=True)


class FusedCPUNet(nn.Module):
    """An inference copy of an FM2SNet whose LeakyReLUs run inside the convolutions before them
    (oneDNN post-ops), so the 24- and 12-channel activations are not read and written once more.

    Measured on 2 cores (AMX, bf16, 256x256 tiles): 1024x1024 36 -> 29.5 ms, 2048x2048 131 -> 109 ms.
    Built by `fused_for_cpu` only where it gives the eager network's answer."""

    def __init__(self, net: FM2SNet) -> None:
        super().__init__()
        convs = net.convs()
        self.convs = nn.ModuleList(convs)
        self._geometry = [(list(c.padding), list(c.stride), list(c.dilation), c.groups) for c in convs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map an (N, n_chan, H, W) batch like the eager network."""
        last = len(self._geometry) - 1
        for i, (conv, (padding, stride, dilation, groups)) in enumerate(zip(self.convs, self._geometry)):
            activation, scalars = ("leaky_relu", [NEGATIVE_SLOPE]) if i < last else ("none", [])
            x = torch.ops.mkldnn._convolution_pointwise(
                x, conv.weight, conv.bias, padding, stride, dilation, groups, activation, scalars, "")
        return x


class PaddedCPUNet(nn.Module):
    """The float32 inference copy of a 1-channel FM2SNet, arranged for oneDNN's AVX2 kernels: the
    middle conv's 12 filters padded to PADDED_WIDTH with zero filters (zero after the LeakyReLU), and
    the last conv (12 -> 1, the slowest per multiply-add) run as a depthwise 5x5 over those channels
    plus a sum over them; LeakyReLUs fused as in FusedCPUNet. The same answer within float rounding.

    Measured on 2 AVX2 cores (AMD EPYC, no bf16), one thread per tile: 256x256 tile 9.5 -> 6.7 ms,
    128 x 1024 strip 17.9 -> 13.7 ms. It holds its own (padded) weights: refresh it with `load_`."""

    w0: torch.Tensor
    b0: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def __init__(self, net: FM2SNet) -> None:
        super().__init__()
        first, middle, last = net.convs()
        assert first.bias is not None
        dtype, device = first.weight.dtype, first.weight.device
        assert net.n_chan == 1 and last.weight.shape[0] == 1, "PaddedCPUNet runs a collapsed (1-channel) network"
        width, k = PADDED_WIDTH, last.kernel_size[0]
        cl = torch.channels_last
        self.register_buffer("w0", torch.empty_like(first.weight).contiguous(memory_format=cl))
        self.register_buffer("b0", torch.empty_like(first.bias))
        self.register_buffer("w1", torch.zeros((width, *middle.weight.shape[1:]), dtype=dtype, device=device)
                             .contiguous(memory_format=cl))
        self.register_buffer("b1", torch.zeros(width, dtype=dtype, device=device))
        self.register_buffer("w2", torch.zeros((width, 1, k, k), dtype=dtype, device=device)
                             .contiguous(memory_format=cl))
        self.register_buffer("b2", torch.zeros(width, dtype=dtype, device=device))  # the bias rides on channel 0
        self._geometry = [(list(c.padding), list(c.stride), list(c.dilation)) for c in (first, middle, last)]
        self.load_([p.detach() for p in net.parameters()])

    @torch.no_grad()
    def load_(self, params: Sequence[torch.Tensor]) -> None:
        """Copy a 1-channel FM2SNet's parameters (w0, b0, w1, b1, w2, b2, in `parameters()` order) in."""
        w0, b0, w1, b1, w2, b2 = params
        n = w1.shape[0]
        self.w0.copy_(w0)
        self.b0.copy_(b0)
        self.w1[:n].copy_(w1)
        self.b1[:n].copy_(b1)
        self.w2[:n].copy_(w2[0].unsqueeze(1))
        self.b2[0] = b2[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map an (N, 1, H, W) batch like the eager network."""
        conv = torch.ops.mkldnn._convolution_pointwise
        (p0, s0, d0), (p1, s1, d1), (p2, s2, d2) = self._geometry
        x = conv(x, self.w0, self.b0, p0, s0, d0, 1, "leaky_relu", [NEGATIVE_SLOPE], "")
        x = conv(x, self.w1, self.b1, p1, s1, d1, 1, "leaky_relu", [NEGATIVE_SLOPE], "")
        x = conv(x, self.w2, self.b2, p2, s2, d2, PADDED_WIDTH, "none", [], "")
        return x.sum(dim=1, keepdim=True)


def fused_for_cpu(net: FM2SNet) -> nn.Module:
    """`net` as this CPU runs it fastest where this torch has oneDNN's fused convolution: a
    PaddedCPUNet for a 1-channel float32 network, else a FusedCPUNet (bfloat16 on AMX, where it was
    measured); each taken only if it answers as the eager network does (within the rounding of
    `net`'s dtype), else `net` itself."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return net
    param = next(net.parameters())
    probe = torch.linspace(0, 1, 37 * 41, dtype=param.dtype).reshape(1, 1, 37, 41).repeat(1, net.n_chan, 1, 1)
    with torch.inference_mode():
        want = net(probe).float()
    tolerance = 4 * torch.finfo(param.dtype).eps * (1 + float(want.abs().max()))
    padded = param.dtype == torch.float32 and net.n_chan == 1
    for build in ([PaddedCPUNet] if padded else []) + [FusedCPUNet]:
        candidate = build(net)
        try:
            with torch.inference_mode():
                got = candidate(probe).float()
        except RuntimeError:  # the op exists but refuses this dtype or layout
            continue
        if got.shape == want.shape and float((got - want).abs().max()) <= tolerance:
            return candidate
    return net


def load_answering(answering: nn.Module, params: Sequence[torch.Tensor]) -> None:
    """Overwrite, in place, an answering copy built by `fused_for_cpu` (any of its forms) with a
    1-channel network's parameters (`training.collapsed_parameters`)."""
    with torch.no_grad():
        if isinstance(answering, PaddedCPUNet):
            answering.load_(params)
            return
        for dst, src in zip(answering.parameters(), params, strict=True):
            dst.copy_(src)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
