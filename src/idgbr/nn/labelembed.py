"""The label embedding: class-index maps <-> 3-channel pseudo-images (paper §III-A; reference §2).

E_e maps each pixel's class k to ``2 * sigmoid(table[k]) - 1`` in (-1, 1)^3 (a K x 3 table, no spatial op).
D_e maps a 3-channel map back to K logits with two 1x1 convs (3 -> hidden -> K, ReLU in between).

The module is a diffusers ``ModelMixin`` + ``ConfigMixin`` whose state-dict keys match the authors' released files
(``embedding_table.weight``, ``embedding_conv.0.*``, ``embedding_conv.2.*``), so
``LabelEmbedding.from_pretrained(".../labelembednet8")`` loads them; their extra config keys (``bit_scale``,
``_name_or_path``) are ignored.

Training (:func:`train_label_embedding`) differs from the authors' script on purpose: gradients flow through
``encode`` so the table itself learns (their script wrapped ``encode`` in ``no_grad``, reference §10.11), and the
table starts at well-separated points (cube corners for K <= 8).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

IGNORE_INDEX = 255


class LabelEmbedding(ModelMixin, ConfigMixin):
    """E_e: K x 3 table with ``2 sigmoid - 1``; D_e: 1x1 conv 3 -> hidden, ReLU, 1x1 conv hidden -> K."""

    config_name = "config.json"
    # The authors' configs carry these; they are accepted and ignored.
    ignore_for_config = ["bit_scale"]

    @register_to_config
    def __init__(self, num_classes: int = 6, label_emb_inchannels: int = 3, hidden: int = 128, bit_scale: float = 1):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes, label_emb_inchannels)
        self.embedding_conv = nn.Sequential(
            nn.Conv2d(label_emb_inchannels, hidden, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(hidden, num_classes, kernel_size=1),
        )
        # The value check in `encode` reads min/max back to the host (a sync per call on a GPU). The trainer turns
        # it off after validating every training label map once at load.
        self.check_labels = True

    @property
    def num_classes(self) -> int:
        return self.embedding_table.num_embeddings

    @property
    def embed_dim(self) -> int:
        return self.embedding_table.embedding_dim

    def class_embeddings(self) -> torch.Tensor:
        """The K embedding points ``2 sigmoid(table) - 1``, shape (K, 3)."""
        return 2 * torch.sigmoid(self.embedding_table.weight) - 1

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """E_e.

        Args:
            labels: long (B, H, W) or (B, 1, H, W) class indices, or float (B, K, H, W) class probabilities
                (soft input: the expected embedding ``sum_k p_k E_k``). Pixels equal to ``IGNORE_INDEX`` (255) get
                class 0's embedding; losses must mask them (the trainer does). Other values outside [0, K) raise
                ValueError unless ``check_labels`` is False (the caller then guarantees valid labels).
        Returns:
            (B, 3, H, W) embedding in (-1, 1).
        """
        points = self.class_embeddings()  # (K, 3)
        if labels.is_floating_point():
            if labels.ndim != 4 or labels.shape[1] != self.num_classes:
                raise ValueError(f"soft labels must be (B, {self.num_classes}, H, W), got {tuple(labels.shape)}")
            return torch.einsum("bkhw,kc->bchw", labels.to(points.dtype), points)
        if labels.ndim == 4:
            if labels.shape[1] != 1:
                raise ValueError(f"hard labels must be (B, H, W) or (B, 1, H, W), got {tuple(labels.shape)}")
            labels = labels[:, 0]
        labels = labels.long()
        labels = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)
        if self.check_labels and labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"label values must lie in [0, {self.num_classes}) or be {IGNORE_INDEX}")
        return points[labels].permute(0, 3, 1, 2).contiguous()

    def decode(self, embedding: torch.Tensor) -> torch.Tensor:
        """D_e: (B, 3, H, W) embedding (possibly noisy or VAE-decoded) -> (B, K, H, W) logits.

        The 1x1 convolutions run on channels-last memory (the same values; on 2 CPU cores the decoder's forward and
        backward take about half the time of the NCHW layout, which the deterministic objective pays every step).
        Without autograd on the CPU (inference) they run as two matrix products over blocks of pixels instead: the
        same per-pixel function, but the 128-channel hidden layer of a block stays in cache rather than a whole
        tile's going through memory (a 512² tile decodes about 4x faster on one core)."""
        if not torch.is_grad_enabled() and embedding.device.type == "cpu" and embedding.dtype == torch.float32:
            return self._decode_blocks(embedding)
        return self.embedding_conv(embedding.contiguous(memory_format=torch.channels_last))

    def _decode_blocks(self, embedding: torch.Tensor, block: int = 2048) -> torch.Tensor:
        first, last = self.embedding_conv[0], self.embedding_conv[2]
        w1, b1 = first.weight.flatten(1).t(), first.bias
        w2, b2 = last.weight.flatten(1).t(), last.bias
        batch, channels, height, width = embedding.shape
        pixels = embedding.permute(0, 2, 3, 1).reshape(-1, channels)
        out = torch.empty(pixels.shape[0], w2.shape[1], dtype=pixels.dtype)
        for start in range(0, pixels.shape[0], block):
            hidden = torch.addmm(b1, pixels[start:start + block], w1).relu_()
            torch.addmm(b2, hidden, w2, out=out[start:start + block])
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)  # channels-last memory, like the convolutions

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """``decode(encode(labels))``: (B, H, W) -> (B, K, H, W) logits."""
        return self.decode(self.encode(labels))


def separated_table(num_classes: int, dim: int = 3, scale: float = 2.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Raw table values whose ``2 sigmoid - 1`` images are well separated, shape (K, dim).

    K <= 2^dim: distinct cube corners ``±scale`` (the authors' trained 8-class table sits at the 8 corners,
    reference §2.4). Larger K: random points of norm ``scale * sqrt(dim)``.
    """
    if num_classes <= 2**dim:
        corners = torch.tensor(list(itertools.product((1.0, -1.0), repeat=dim)))
        # Spread the chosen corners: take every (2^dim / K)-th corner in Gray-like order of the product.
        step = max(1, (2**dim) // num_classes)
        index = [(i * step) % (2**dim) for i in range(num_classes)]
        if len(set(index)) < num_classes:
            index = list(range(num_classes))
        return corners[index] * scale
    points = torch.randn(num_classes, dim, generator=generator)
    return points / points.norm(dim=1, keepdim=True) * scale * math.sqrt(dim)


def train_label_embedding(
    num_classes: int,
    steps: int,
    noise_std: float = 0.15,
    lr: float = 1e-2,
    batch: int = 4,
    res: int = 64,
    seed: int = 0,
    hidden: int = 128,
    progress: bool = True,
) -> LabelEmbedding:
    """Train E_e and D_e on random i.i.d. labels with cross-entropy on ``D_e(E_e(y) + N(0, noise_std^2))``.

    As in the authors' recipe (reference §2.3: synthetic 4 x 64 x 64 labels, sigma 0.15) except that the table
    learns (gradients flow through ``encode``) and it starts at separated points. Deterministic given ``seed``
    (a local generator; the global RNG is untouched).
    """
    generator = torch.Generator().manual_seed(seed)
    model = LabelEmbedding(num_classes=num_classes, hidden=hidden)
    with torch.no_grad():
        model.embedding_table.weight.copy_(separated_table(num_classes, generator=generator))
        for layer in (model.embedding_conv[0], model.embedding_conv[2]):
            bound = 1 / math.sqrt(layer.in_channels)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train-embed", unit="step")
    model.train()
    for _ in range(steps):
        labels = torch.randint(0, num_classes, (batch, res, res), generator=generator)
        embedding = model.encode(labels)
        noise = torch.randn(embedding.shape, generator=generator) * noise_std
        loss = F.cross_entropy(model.decode(embedding + noise), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if bar is not None:
        bar.close()
    model.eval()
    return model


@torch.no_grad()
def embedding_accuracy(model: LabelEmbedding, noise_std: float, samples: int = 4096, seed: int = 1) -> float:
    """Per-pixel accuracy of ``argmax D_e(E_e(y) + N(0, noise_std^2))`` on random labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, model.num_classes, (1, 1, samples), generator=generator)
    embedding = model.encode(labels)
    embedding = embedding + torch.randn(embedding.shape, generator=generator) * noise_std
    return (model.decode(embedding).argmax(1) == labels).float().mean().item()
