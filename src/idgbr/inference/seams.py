"""What keeps a scene seam-free and safe, on plain arrays: the scene-level noise field (:class:`NoiseField`), the
"do no harm" gating band (:func:`gate_band`) and the seam score (:func:`seam_score`). Used by
:mod:`idgbr.inference.scene`.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from ..data.dataset import IGNORE_INDEX
from ..errors import IdgbrError
from ..nn.tiling import tile_grid

NOISE_BLOCK = 64  # side of one block of the scene-level noise field, in latent pixels


# ----------------------------------------------------------------------------------------------------------------
# Scene-level noise
# ----------------------------------------------------------------------------------------------------------------
class NoiseField:
    """Gaussian noise defined on the whole scene's latent grid (channels, rows, cols), generated lazily by blocks.

    Block ``(i, j)`` of sample ``s`` covers latent rows ``i*block:(i+1)*block`` and columns ``j*block:(j+1)*block``
    and is drawn from a CPU generator seeded by ``(seed, s, i, j)``, so any cut of the field is reproducible and
    two tiles that overlap see the same noise on their overlap.
    """

    def __init__(self, seed: int, channels: int, block: int = NOISE_BLOCK, cache: int = 64):
        if seed < 0:
            raise IdgbrError(f"seed must be >= 0, got {seed}")
        self.seed, self.channels, self.block = int(seed), int(channels), int(block)
        self._cache: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()
        self._cache_size = cache

    def _block(self, sample: int, i: int, j: int) -> torch.Tensor:
        key = (sample, i, j)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        state = np.random.SeedSequence([self.seed, sample, i, j]).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
        noise = torch.randn((self.channels, self.block, self.block), generator=gen)
        self._cache[key] = noise
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return noise

    def cut(self, sample: int, row: int, col: int, height: int, width: int) -> torch.Tensor:
        """Noise (channels, height, width) at latent rows ``row:row+height``, columns ``col:col+width``."""
        out = torch.empty((self.channels, height, width))
        b = self.block
        for i in range(row // b, (row + height - 1) // b + 1):
            for j in range(col // b, (col + width - 1) // b + 1):
                r0, r1 = max(row, i * b), min(row + height, (i + 1) * b)
                c0, c1 = max(col, j * b), min(col + width, (j + 1) * b)
                out[:, r0 - row:r1 - row, c0 - col:c1 - col] = self._block(sample, i, j)[:, r0 - i * b:r1 - i * b,
                                                                                          c0 - j * b:c1 - j * b]
        return out


# ----------------------------------------------------------------------------------------------------------------
# Gating and seam measurement (plain arrays)
# ----------------------------------------------------------------------------------------------------------------
def gate_band(labels: np.ndarray, width: int, low_confidence: np.ndarray | None = None) -> np.ndarray:
    """Pixels (H, W) bool to refine: within ``width`` px of a class boundary of ``labels`` (H, W), or low-confidence.

    A boundary pixel differs from one of its 4-neighbours, both valid (a class next to nodata is no boundary);
    the band is the boundary pixels dilated by a disc of radius ``width``.
    """
    import cv2

    valid = labels != IGNORE_INDEX
    edge = np.zeros(labels.shape, dtype=np.uint8)
    horizontal = (labels[:, 1:] != labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    vertical = (labels[1:] != labels[:-1]) & valid[1:] & valid[:-1]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:] |= vertical
    edge[:-1] |= vertical
    if width > 0:
        edge = cv2.dilate(edge, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1)))
    band = edge.astype(bool)
    if low_confidence is not None:
        band |= low_confidence
    return band & valid


def seam_score(labels: np.ndarray, tile: int, overlap: int, width: int = 2, nodata: int = IGNORE_INDEX) -> dict[str, float]:
    """Boundary density near internal tile edges vs elsewhere, for a refined (H, W) label map.

    A boundary pixel differs from its right or lower neighbour (both valid). ``border_rate`` is the fraction of
    boundary pixels among the valid pixels within ``width`` px of an internal edge of a window of
    ``tile_grid(H, W, tile, overlap)``; ``interior_rate`` the same fraction over all other valid pixels.
    ``ratio = border_rate / interior_rate`` is 1 without seams (edges of the tiling are invisible in the map) and
    grows when tiles disagree at their borders (seams add label boundaries along the tile edges).
    """
    labels = np.asarray(labels)
    height, width_px = labels.shape
    valid = labels != nodata
    boundary = np.zeros(labels.shape, dtype=bool)
    right = (labels[:, 1:] != labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    down = (labels[1:] != labels[:-1]) & valid[1:] & valid[:-1]
    boundary[:, :-1] |= right
    boundary[:-1] |= down
    near = np.zeros(labels.shape, dtype=bool)
    for window in tile_grid(height, width_px, tile, overlap):
        for row in (window.row, window.bottom):
            if 0 < row < height:
                near[max(0, row - width):row + width, window.col:window.right] = True
        for col in (window.col, window.right):
            if 0 < col < width_px:
                near[window.row:window.bottom, max(0, col - width):col + width] = True
    border, interior = near & valid, ~near & valid
    border_rate = float(boundary[border].mean()) if border.any() else 0.0
    interior_rate = float(boundary[interior].mean()) if interior.any() else 0.0
    if not border.any() or border_rate == interior_rate:  # no internal edge, or edges invisible
        ratio = 1.0
    else:
        ratio = border_rate / interior_rate if interior_rate > 0 else float("inf")
    return {"border_rate": border_rate, "interior_rate": interior_rate, "ratio": ratio}
