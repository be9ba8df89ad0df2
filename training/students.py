"""TinyGAN students and the projection discriminator used to distil them.

The generator follows TinyGAN: a learned class embedding drives conditional BatchNorm in residual blocks
built from depthwise-separable convolutions, upsampling from 4×4 to the teacher's resolution. The head
gives a mask in [0, 1] (sigmoid) for the shape mechanism or an image in [-1, 1] (tanh) for the others.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm

from core.manifest import MECHANISM_OUTPUTS

OUTPUT_CHANNELS = {"shape": 1, "texture": 3, "background": 3}
HEADS = {m: (MECHANISM_OUTPUTS[m], OUTPUT_CHANNELS[m]) for m in MECHANISM_OUTPUTS}  # output tensor name, channels
UPSAMPLE_MODES = ("nearest", "bilinear")
# How the last ×2 is made: "conv", a ResBlockUp to full size then a 3×3 conv; "subpixel" (ESPCN), a 3×3 conv at half
# size to 4× the output channels, then depth-to-space. Sub-pixel keeps every hidden tensor below full size: on CPU
# these students are bound by memory passes over the 32×32 tensors, not by multiply-adds.
HEAD_KINDS = ("conv", "subpixel")
DISCRIMINATOR_CHANNELS = (16, 32, 64, 128, 128)  # five stride-2 convolutions: 32 px down to 1×1


@dataclass
class StudentConfig:
    z_dim: int = 32
    n_classes: int = 10
    image_size: int = 32
    embed_dim: int = 32
    # 4×4, then one per ResBlockUp: one per ×2 for the conv head, one fewer for the sub-pixel head.
    channels: list[int] = field(default_factory=lambda: [128, 64, 32, 32])
    # "bilinear" (v1 students) or "nearest" (BigGAN/TinyGAN's choice: a copy, not a Resize kernel, so the
    # memory-bound upsampling that dominated CPU inference costs much less).
    upsample: str = "bilinear"
    head: str = "conv"
    # Blocks whose output is larger than this many pixels a side normalise with plain BatchNorm rather than the
    # label-conditioned one; None conditions every block (the students up to v5/v6/v4). Why: onnxruntime runs the
    # convolutions in its blocked NCHWc layout and leaves it around every per-sample scale-and-shift, which at the
    # high resolutions, where the bytes are, cost more than the convolutions; the label still reaches those blocks
    # through the lower ones.
    conditioned_up_to: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without affine; γ and β come from a linear map of the class embedding.

    The normalisation passes an explicit unit scale and zero shift (non-persistent buffers): the ONNX
    exporter needs them, or the channel count, to export batch_norm, and the channel count is lost behind
    the batch-dynamic reshape at the generator's input.
    """

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.register_buffer("unit_scale", torch.ones(channels), persistent=False)
        self.register_buffer("zero_shift", torch.zeros(channels), persistent=False)
        self.gamma = nn.Linear(embed_dim, channels)
        self.beta = nn.Linear(embed_dim, channels)
        nn.init.zeros_(self.gamma.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.weight)
        nn.init.zeros_(self.beta.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        normalised = F.batch_norm(x, norm.running_mean, norm.running_var, self.unit_scale, self.zero_shift, self.training,
                                  norm.momentum, norm.eps)
        return normalised * self.gamma(embedding)[:, :, None, None] + self.beta(embedding)[:, :, None, None]


class PlainBatchNorm(nn.BatchNorm2d):
    """BatchNorm with a learned affine, called like ConditionalBatchNorm (the embedding is not used)."""

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class SeparableConv(nn.Sequential):
    """Depthwise 3×3 then pointwise 1×1: TinyGAN's cheap replacement for a full 3×3 convolution."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cin, 3, padding=1, groups=cin), nn.Conv2d(cin, cout, 1))


def upsample2x(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "nearest":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class ResBlockUp(nn.Module):
    def __init__(self, cin: int, cout: int, embed_dim: int, upsample: str, conditioned: bool = True):
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.upsample = upsample
        self.norm1 = ConditionalBatchNorm(cin, embed_dim) if conditioned else PlainBatchNorm(cin)
        self.conv1 = SeparableConv(cin, cout)
        self.norm2 = ConditionalBatchNorm(cout, embed_dim) if conditioned else PlainBatchNorm(cout)
        self.conv2 = SeparableConv(cout, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = upsample2x(F.relu(self.norm1(x, embedding)), self.upsample)
        h = self.conv2(F.relu(self.norm2(self.conv1(h), embedding)))
        # The 1×1 shortcut runs before upsampling: both upsamplings mix pixels with weights summing to one,
        # so they commute with a 1×1 conv (bias included), and the upsampled tensor has cout ≤ cin channels.
        return h + upsample2x(self.shortcut(x), self.upsample)


class TinyGenerator(nn.Module):
    """Student for one mechanism: (z [B, Z], y int64 [B]) → mask [B,1,H,W] or image [B,3,H,W]."""

    def __init__(self, config: StudentConfig, mechanism: str):
        super().__init__()
        if mechanism not in HEADS:
            raise ValueError(f"unknown mechanism {mechanism!r}; expected one of {', '.join(HEADS)}")
        if config.head not in HEAD_KINDS:
            raise ValueError(f"head must be one of {HEAD_KINDS}, got {config.head!r}")
        subpixel = config.head == "subpixel"
        upsamplings = int(math.log2(config.image_size // 4))
        widths = upsamplings + (0 if subpixel else 1)
        if 4 * 2**upsamplings != config.image_size or len(config.channels) != widths:
            per = "one per ×2 but the last, which the sub-pixel head makes" if subpixel else "one per ×2"
            raise ValueError(f"image_size {config.image_size} with the {config.head} head needs {widths} channel "
                             f"widths (4×4, then {per}), got {config.channels}")
        self.config, self.mechanism = config, mechanism
        self.output_name, out_channels = HEADS[mechanism]
        self.embedding = nn.Embedding(config.n_classes, config.embed_dim)
        self.linear = nn.Linear(config.z_dim + config.embed_dim, config.channels[0] * 16)
        limit = config.conditioned_up_to
        self.blocks = nn.ModuleList(
            ResBlockUp(cin, cout, config.embed_dim, config.upsample, limit is None or 8 * 2**index <= limit)
            for index, (cin, cout) in enumerate(zip(config.channels[:-1], config.channels[1:]))
        )
        last = config.channels[-1]
        self.head = nn.Sequential(
            nn.BatchNorm2d(last), nn.ReLU(),
            *((nn.Conv2d(last, out_channels * 4, 3, padding=1), nn.PixelShuffle(2)) if subpixel
              else (nn.Conv2d(last, out_channels, 3, padding=1),))
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding(y)
        # view(-1, ...), not view(len(z), ...): ONNX tracing would freeze len(z) and with it the batch size;
        # unflatten would lose the channel count that BatchNorm's export needs.
        h = self.linear(torch.cat([z, embedding], dim=1)).view(-1, self.config.channels[0], 4, 4)
        for block in self.blocks:
            h = block(h, embedding)
        out = self.head(h)
        return torch.sigmoid(out) if self.mechanism == "shape" else torch.tanh(out)


class ProjectionDiscriminator(nn.Module):
    """Spectral-norm conv stack (4×4, stride 2) with a class projection; returns the score and the features.

    Inputs are in [-1, 1] (masks are mapped there by the caller). Five convolutions at 32 px end at 1×1.
    """

    def __init__(self, in_channels: int, n_classes: int, channels: list[int] | None = None):
        super().__init__()
        channels = channels or list(DISCRIMINATOR_CHANNELS)
        widths = [in_channels] + list(channels)
        self.convs = nn.ModuleList(
            spectral_norm(nn.Conv2d(cin, cout, 4, stride=2, padding=1)) for cin, cout in zip(widths[:-1], widths[1:])
        )
        self.linear = spectral_norm(nn.Linear(channels[-1], 1))
        self.embedding = spectral_norm(nn.Embedding(n_classes, channels[-1]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        h = x
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            features.append(h)
        pooled = h.sum(dim=(2, 3))
        score = self.linear(pooled).squeeze(1) + (self.embedding(y) * pooled).sum(dim=1)
        return score, features


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
