"""U²-Net (the full 44 M-parameter model), the frozen saliency net that turns CGN's shape output into a mask.

Our own implementation; module names follow the official `u2net.pth` (`stage1` … `stage6`, `stage5d` …
`stage1d`, `side1` … `side6`, `outconv`; inside a stage `rebnconvin`, `rebnconv<i>`, `rebnconv<i>d`, each
with `conv_s1` and `bn_s1`) so that checkpoint and CGN's copy of it load strictly. Upsampling is bilinear
with align_corners=True, as in CGN's copy. `forward` returns the fused logits d0; callers apply the sigmoid.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# (height, mid channels, out channels, dilated) of each stage; input widths follow from the wiring.
ENCODER = {"stage1": (7, 32, 64, False), "stage2": (6, 32, 128, False), "stage3": (5, 64, 256, False),
           "stage4": (4, 128, 512, False), "stage5": (4, 256, 512, True), "stage6": (4, 256, 512, True)}
DECODER = {"stage5d": (4, 256, 512, True), "stage4d": (4, 128, 256, False), "stage3d": (5, 64, 128, False),
           "stage2d": (6, 32, 64, False), "stage1d": (7, 16, 64, False)}


def upsample_like(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=reference.shape[2:], mode="bilinear", align_corners=True)


class ConvBNReLU(nn.Module):
    """3×3 convolution (optionally dilated), BatchNorm, ReLU: the official `REBNCONV`."""

    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """Residual U-block of the given height: a small U-Net whose output is added to its input projection.

    Plain blocks halve the resolution between encoder levels and reach the bottom with dilation 2; the
    dilated "F" blocks keep the resolution and widen the dilation (1, 2, 4, 8) instead.
    """

    def __init__(self, height: int, cin: int, mid: int, cout: int, dilated: bool = False):
        super().__init__()
        self.height, self.dilated = height, dilated

        def dilation(level: int) -> int:
            return 2 ** (level - 1) if dilated else 1

        self.rebnconvin = ConvBNReLU(cin, cout)
        for level in range(1, height):
            self.add_module(f"rebnconv{level}", ConvBNReLU(cout if level == 1 else mid, mid, dilation(level)))
        self.add_module(f"rebnconv{height}", ConvBNReLU(mid, mid, 2 ** (height - 1) if dilated else 2))
        for level in range(height - 1, 0, -1):
            self.add_module(f"rebnconv{level}d", ConvBNReLU(2 * mid, cout if level == 1 else mid, dilation(level)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.rebnconvin(x)
        skips, h = [], x_in
        for level in range(1, self.height):
            h = getattr(self, f"rebnconv{level}")(h)
            skips.append(h)
            if not self.dilated and level < self.height - 1:
                h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
        h = getattr(self, f"rebnconv{self.height}")(h)
        for level in range(self.height - 1, 0, -1):
            h = getattr(self, f"rebnconv{level}d")(torch.cat([h, skips[level - 1]], dim=1))
            if not self.dilated and level > 1:
                h = upsample_like(h, skips[level - 2])
        return h + x_in


class U2Net(nn.Module):
    """Six encoder stages, five decoder stages, six side outputs fused by a 1×1 convolution."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1):
        super().__init__()
        width = in_channels
        for name, (height, mid, cout, dilated) in ENCODER.items():
            self.add_module(name, RSU(height, width, mid, cout, dilated))
            width = cout
        skip_widths = [ENCODER[f"stage{i}"][2] for i in range(1, 6)]
        for (name, (height, mid, cout, dilated)), skip in zip(DECODER.items(), reversed(skip_widths)):
            self.add_module(name, RSU(height, width + skip, mid, cout, dilated))
            width = cout
        side_widths = [DECODER[f"stage{i}d"][2] for i in range(1, 6)] + [ENCODER["stage6"][2]]
        for i, cin in enumerate(side_widths, start=1):
            self.add_module(f"side{i}", nn.Conv2d(cin, out_channels, 3, padding=1))
        self.outconv = nn.Conv2d(6 * out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded, h = [], x
        for i in range(1, 7):
            h = getattr(self, f"stage{i}")(h)
            encoded.append(h)
            if i < 6:
                h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
        decoded = {6: h}
        for i in range(5, 0, -1):
            h = getattr(self, f"stage{i}d")(torch.cat([upsample_like(h, encoded[i - 1]), encoded[i - 1]], dim=1))
            decoded[i] = h
        sides = [getattr(self, f"side{i}")(decoded[i]) for i in range(1, 7)]
        sides = [sides[0]] + [upsample_like(side, sides[0]) for side in sides[1:]]
        return self.outconv(torch.cat(sides, dim=1))
