"""The FM2S network: three convolutions, about 3.5k parameters for one channel."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FM2SNet", "count_parameters"]


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
            nn.LeakyReLU(1e-3),
            nn.Conv2d(24, 12, 3, padding=1),
            nn.LeakyReLU(1e-3),
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


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
