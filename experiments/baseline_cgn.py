"""The SKDCGN paper's §4.2 baseline: a CGN whose three generators are TinyGAN students (training/students.py
TinyGenerator), trained from scratch on real double-coloured digits with CGN's own MNIST procedure. No teacher,
no distillation: it shows what distillation adds.

CGN's procedure (mnists/train_cgn.py and mnists/config.py of the official repository; REFERENCE.md): each step
draws class labels uniformly, renders mask, foreground and background for that label (fresh noise per
mechanism; texture and background pass through the shuffler, a random circular shift), composes
x = m·f + (1 − m)·b and updates
- the generators with MSE(D(x, y), 1) + 0.5 · binary entropy of the mask + a perceptual (style) loss between x and
  a batch of real images, style weights [0, 0.05, 0.05, 0] on four feature layers;
- the class-conditional discriminator with (MSE(D(real, y_real), 1) + MSE(D(x, y), 0)) / 2.
Adam lr 2e-4, betas (0.5, 0.999), batch 64, orthogonal initialisation with gain 0.5.

Substitutions, all forced by what exists offline, each recorded in the result:
- real data: the 5,000 digits of MNIST t10k[:5000] in the biased training style (each digit wears its label's
  colours), the set and split the invariant-classifier experiment already uses (t10k[5000:] stays the test set);
  CGN trained on the 60,000 training digits.
- perceptual features: CGN uses an ImageNet VGG, which cannot be had offline. We use the project's digit CNN
  (experiments.fidelity.digit_recogniser: a SmallCNN trained on binarised real digits t10k[:5000]),
  frozen, applied to each colour channel separately; Gram matrices of its 2nd and 3rd conv blocks (of 3) take
  CGN's two non-zero style weights 0.05, on Gram differences measured relative to the real Grams' energy (CGN's
  weights were set for VGG's feature scale; ours is ~1e3× smaller).
- discriminator: a class-conditional MLP (label embedding concatenated to the flattened image, three hidden
  layers of 512 with LeakyReLU 0.2 and dropout 0.4), the shape of CGN's linear MNIST discriminator.
- length: CGN's 5 epochs of 60,000 digits are 4,690 steps at batch 64; here `steps` and a wall-clock cap decide.
- initialisation: orthogonal (gain 0.5) on every conv and linear weight except the conditional BatchNorm's γ/β
  maps, which keep TinyGAN's identity start.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from core.atomic import atomic_path
from core.noise import NoiseSpec
from core.vocabulary import MECHANISMS
from training.students import ConditionalBatchNorm, StudentConfig, TinyGenerator

CGN_STEPS = 4690  # CGN's 5 epochs of 60,000 digits at batch 64
CHECKPOINT = "checkpoint.pt"
GENERATORS = "generators.pt"


@dataclass
class BaselineConfig:
    steps: int = CGN_STEPS
    batch_size: int = 64
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    binary_weight: float = 0.5
    style_weights: tuple[float, float] = (0.05, 0.05)  # CGN's [0, 0.05, 0.05, 0]: the 2nd and 3rd feature layers
    ndf: int = 512
    init_gain: float = 0.5
    seed: int = 0
    max_minutes: float | None = None  # stop early (and checkpoint) after this much wall clock in one call
    checkpoint_every: int = 250
    log_every: int = 100
    student: dict = field(default_factory=lambda: StudentConfig(channels=[64, 32, 16, 8], upsample="nearest").to_dict())

    def to_dict(self) -> dict:
        out = asdict(self)
        out["betas"], out["style_weights"] = list(self.betas), list(self.style_weights)
        return out


class ConditionalMLPDiscriminator(nn.Module):
    """CGN's linear MNIST discriminator: [flattened image, label embedding] → MLP → one score (no sigmoid: MSE)."""

    def __init__(self, n_classes: int = 10, ndf: int = 512, image_shape: tuple[int, int, int] = (3, 32, 32)):
        super().__init__()
        self.embedding = nn.Embedding(n_classes, n_classes)
        self.model = nn.Sequential(
            nn.Linear(n_classes + int(np.prod(image_shape)), ndf), nn.LeakyReLU(0.2),
            nn.Linear(ndf, ndf), nn.Dropout(0.4), nn.LeakyReLU(0.2),
            nn.Linear(ndf, ndf), nn.Dropout(0.4), nn.LeakyReLU(0.2),
            nn.Linear(ndf, 1),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(torch.cat([x.flatten(1), self.embedding(y)], dim=1))


class ChannelwiseStyleFeatures(nn.Module):
    """A frozen 1-channel digit CNN (experiments.classifier.SmallCNN) applied to each colour channel.

    Returns the ReLU outputs of its conv blocks 2 and 3 with the colour channels stacked on the feature axis,
    [B, 3·C, h, w], so Gram matrices also see how colours co-occur.
    """

    LAYERS = (4, 7)  # indices of the ReLUs after conv 2 and conv 3 in SmallCNN.features

    def __init__(self, digit_cnn: nn.Module):
        super().__init__()
        self.features = digit_cnn.features
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen, always eval
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        batch, channels, height, width = x.shape
        h = x.reshape(batch * channels, 1, height, width)
        out = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in self.LAYERS:
                out.append(h.reshape(batch, channels * h.shape[1], *h.shape[2:]))
            if index >= max(self.LAYERS):
                break
        return out


def gram(features: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = features.shape
    flat = features.reshape(batch, channels, height * width)
    return flat @ flat.transpose(1, 2) / (channels * height * width)


def style_loss(generated: list[torch.Tensor], real: list[torch.Tensor], weights) -> torch.Tensor:
    """Σ w · ‖G(x) − G(real)‖² / ‖G(real)‖² over the layers: Gram differences relative to the real Grams' energy.

    CGN's weights were set for VGG's feature scale; the relative form keeps their meaning (a 0.05 share per layer)
    for a feature net of any scale (our digit CNN's Grams are ~1e-3, the plain MSE ~1e-5).
    """
    total = 0.0
    for w, g, r in zip(weights, generated, real):
        gram_g, gram_r = gram(g), gram(r)
        total = total + w * ((gram_g - gram_r) ** 2).sum(dim=(1, 2)).div((gram_r ** 2).sum(dim=(1, 2)) + 1e-12).mean()
    return total


def binary_entropy(mask: torch.Tensor) -> torch.Tensor:
    """CGN's mask loss: mean binary entropy (bits), zero only for masks of exact 0s and 1s."""
    m = mask.clamp(1e-4, 0.9999)
    return (-m * torch.log2(m) - (1 - m) * torch.log2(1 - m)).mean()


def orthogonal_init(module: nn.Module, gain: float) -> None:
    """Orthogonal weights (gain `gain`) and zero biases on every conv and linear layer, except conditional BN maps."""
    skip = {id(m) for cbn in module.modules() if isinstance(cbn, ConditionalBatchNorm) for m in (cbn.gamma, cbn.beta)}
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in skip:
            nn.init.orthogonal_(m.weight, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CGN's shuffler in torch: a random circular shift per image."""
    size = images.shape[-1]
    offsets = torch.randint(0, size, (len(images), 2), generator=generator)
    return torch.stack([torch.roll(img, shifts=(-int(dy), -int(dx)), dims=(-2, -1))
                        for img, (dy, dx) in zip(images, offsets)])


def build_models(config: BaselineConfig) -> tuple[dict[str, TinyGenerator], ConditionalMLPDiscriminator]:
    torch.manual_seed(config.seed)
    student = StudentConfig(**config.student)
    generators = {m: TinyGenerator(student, m) for m in MECHANISMS}
    for g in generators.values():
        orthogonal_init(g, config.init_gain)
    discriminator = ConditionalMLPDiscriminator(student.n_classes, config.ndf, (3, student.image_size, student.image_size))
    orthogonal_init(discriminator, config.init_gain)
    return generators, discriminator


def render(generators: dict[str, TinyGenerator], z: dict[str, torch.Tensor], y: torch.Tensor,
           shift: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(composite, mask) with one label for all three mechanisms, as CGN trains."""
    mask = generators["shape"](z["shape"], y)
    foreground, background = generators["texture"](z["texture"], y), generators["background"](z["background"], y)
    if shift is not None:
        foreground, background = random_shift(foreground, shift), random_shift(background, shift)
    return mask * foreground + (1 - mask) * background, mask


def _recipe(config: dict) -> dict:
    """The settings a resumed run must share (length, time cap and logging may change)."""
    return {k: v for k, v in config.items() if k not in ("steps", "max_minutes", "checkpoint_every", "log_every")}


def train_baseline(config: BaselineConfig, real_images: np.ndarray, real_labels: np.ndarray, style_net: nn.Module,
                   work_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Train (or resume from `work_dir`) and save the generators; returns the training record.

    `real_images` float32 [N, 3, 32, 32] in [-1, 1]. The checkpoint holds generators, discriminator, both
    optimisers, the step, the RNG states and the loss history, so a later call continues where this one stopped.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    generators, discriminator = build_models(config)
    g_params = [p for g in generators.values() for p in g.parameters()]
    opt_g = torch.optim.Adam(g_params, lr=config.lr, betas=tuple(config.betas))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=tuple(config.betas))
    batch_rng = np.random.default_rng(config.seed)
    torch_rng = torch.Generator().manual_seed(config.seed)
    step, seconds, history = 0, 0.0, []
    checkpoint = work_dir / CHECKPOINT
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if _recipe(state["config"]) != _recipe(config.to_dict()):
            raise ValueError(f"{checkpoint} was trained with other settings; use another --work-dir")
        for m, g in generators.items():
            g.load_state_dict(state["generators"][m])
        discriminator.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        batch_rng.bit_generator.state = state["batch_rng"]
        torch_rng.set_state(state["torch_rng"])
        step, seconds, history = state["step"], state["seconds"], state["history"]
        log(f"resumed at step {step} ({seconds / 60:.1f} min so far)")

    def save_checkpoint():
        state = {"config": config.to_dict(), "generators": {m: g.state_dict() for m, g in generators.items()},
                 "discriminator": discriminator.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                 "batch_rng": batch_rng.bit_generator.state, "torch_rng": torch_rng.get_state(), "step": step,
                 "seconds": seconds, "history": history}
        with atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)

    x_real_all, y_real_all = torch.from_numpy(real_images), torch.from_numpy(real_labels.astype(np.int64))
    n_classes, z_dim = generators["shape"].config.n_classes, generators["shape"].config.z_dim
    for g in generators.values():
        g.train()
    discriminator.train()
    started, sums = time.perf_counter(), {}
    call_started = started  # the time cap counts this call only; `started` restarts at each checkpoint
    budget = None if config.max_minutes is None else config.max_minutes * 60
    while step < config.steps and (budget is None or time.perf_counter() - call_started < budget):
        index = torch.from_numpy(batch_rng.integers(0, len(x_real_all), config.batch_size))
        x_real, y_real = x_real_all[index], y_real_all[index]
        y = torch.randint(0, n_classes, (config.batch_size,), generator=torch_rng)
        z = {m: torch.randn(config.batch_size, z_dim, generator=torch_rng) for m in MECHANISMS}
        x_gen, mask = render(generators, z, y, torch_rng)
        ones = torch.ones(config.batch_size, 1)
        with torch.no_grad():
            real_features = style_net(x_real)
        losses = {"adv": F.mse_loss(discriminator(x_gen, y), ones),
                  "binary": config.binary_weight * binary_entropy(mask),
                  "perc": style_loss(style_net(x_gen), real_features, config.style_weights)}
        opt_g.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt_g.step()
        d_loss = (F.mse_loss(discriminator(x_real, y_real), ones)
                  + F.mse_loss(discriminator(x_gen.detach(), y), torch.zeros_like(ones))) / 2
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        step += 1
        for name, value in {**losses, "d": d_loss}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        if step % config.log_every == 0 or step == config.steps:
            count = step % config.log_every or config.log_every
            history.append({"step": step, **{k: v / count for k, v in sums.items()}})
            sums = {}
            log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k != "step"))
        if step % config.checkpoint_every == 0:
            seconds_now = seconds + time.perf_counter() - started
            seconds, started = seconds_now, time.perf_counter()
            save_checkpoint()
    seconds += time.perf_counter() - started
    save_checkpoint()
    for g in generators.values():
        g.eval()
    with atomic_path(work_dir / GENERATORS) as tmp:
        torch.save({"student": config.student, "generators": {m: g.state_dict() for m, g in generators.items()}}, tmp)
    record = {"config": config.to_dict(), "steps_done": step, "seconds": round(seconds, 1), "history": history,
              "finished": step >= config.steps, "work_dir": str(work_dir)}
    (work_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def load_generators(work_dir: str | Path) -> dict[str, TinyGenerator]:
    state = torch.load(Path(work_dir) / GENERATORS, weights_only=False)
    student = StudentConfig(**state["student"])
    generators = {}
    for m in MECHANISMS:
        g = TinyGenerator(student, m)
        g.load_state_dict(state["generators"][m])
        generators[m] = g.eval()
    return generators


def baseline_source(generators: dict[str, TinyGenerator], name: str, batch: int = 1000):
    """The baseline as an evaluation Source (same noise scheme and shuffler as the teacher)."""
    from experiments.sources import Source

    def run(mechanism: str, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        g = generators[mechanism]
        with torch.no_grad():
            return torch.cat([g(torch.from_numpy(np.ascontiguousarray(z[i:i + batch])),
                                torch.from_numpy(np.ascontiguousarray(y[i:i + batch])))
                              for i in range(0, len(z), batch)]).numpy()

    config = next(iter(generators.values())).config
    return Source(name, NoiseSpec(dim=config.z_dim), config.image_size, True, run)
