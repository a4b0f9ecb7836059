"""Built-in demo image tokenizer: k-means over RGB patches (no pretrained weights needed).

Each ``patch_size`` x ``patch_size`` RGB patch becomes the index of its nearest centroid;
decoding pastes the centroids back. Fitted in seconds on CPU to the demo images, it gives
recognisable reconstructions at the same interface as MAGVIT-v2. Saved as one safetensors file
(the centroids) whose metadata holds the JSON config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from omnidiff.data.tokenizers.base import ImageTokenizer, check_codes, check_images, register_media_tokenizer
from omnidiff.data.tokenizers.checkpoint import read_single_file, save_single_file
from omnidiff.data.tokenizers.kmeans import fit_kmeans, nearest_centroid

KIND = "kmeans_image"
MAX_CODEBOOK = 8192  # the image block of the unified vocabulary


@dataclass(frozen=True)
class PatchKMeansConfig:
    patch_size: int = 8
    image_size: int = 64
    codebook_size: int = 256


class PatchKMeansImageTokenizer(ImageTokenizer):
    def __init__(self, config: PatchKMeansConfig, centroids: torch.Tensor) -> None:
        expected = (config.codebook_size, 3 * config.patch_size**2)
        if tuple(centroids.shape) != expected:
            raise ValueError(f"patch k-means centroids have shape {tuple(centroids.shape)}, expected {expected}")
        self.config = config
        self.centroids = centroids.float()

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def downsample(self) -> int:
        return self.config.patch_size

    @classmethod
    def fit(cls, images: torch.Tensor | Sequence[torch.Tensor], codebook_size: int, seed: int, *,
            patch_size: int = 8, epochs: int = 20) -> PatchKMeansImageTokenizer:
        """Cluster all patches of ``images`` into ``codebook_size`` codes.

        ``images``: one ``[n, 3, H, W]`` batch in [-1, 1], or a sequence of such batches (or of
        single ``[3, H, W]`` images) of different sizes; the first one's width is the native size.
        """
        if not 1 <= codebook_size <= MAX_CODEBOOK:
            raise ValueError(f"image codebook size must be in [1, {MAX_CODEBOOK}], got {codebook_size}")
        batches = [images] if isinstance(images, torch.Tensor) else list(images)
        batches = [check_images(b if b.ndim == 4 else b.unsqueeze(0), patch_size) for b in batches]
        if not batches:
            raise ValueError("no images to fit the patch k-means tokenizer on")
        config = PatchKMeansConfig(patch_size, batches[0].shape[-1], codebook_size)
        patches = torch.cat([_to_patches(b, patch_size).reshape(-1, 3 * patch_size**2)
                             for b in batches])
        return cls(config, fit_kmeans(patches, codebook_size, seed, epochs=epochs))

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        patches = _to_patches(check_images(batch, p), p)  # [b, h, w, 3*p*p]
        return nearest_centroid(patches.reshape(-1, patches.shape[-1]), self.centroids).view(patches.shape[:3])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = check_codes(codes, self.codebook_size, ndim=3)
        b, h, w = codes.shape
        p = self.config.patch_size
        patches = self.centroids[codes].view(b, h, w, 3, p, p)
        return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h * p, w * p).clamp(-1.0, 1.0)

    def save(self, path: str | Path) -> Path:
        return save_single_file(path, KIND, self.config, {"centroids": self.centroids})

    @classmethod
    def load(cls, path: str | Path) -> PatchKMeansImageTokenizer:
        config, tensors = read_single_file(path, KIND)
        return cls(PatchKMeansConfig(**config), tensors["centroids"])


def _to_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """``[b, 3, H, W]`` -> ``[b, H/p, W/p, 3*p*p]`` (channel-major inside a patch)."""
    b, c, height, width = images.shape
    grid = images.reshape(b, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(b, height // p, width // p, c * p * p)


@register_media_tokenizer(KIND)
def _load(path: Path) -> PatchKMeansImageTokenizer:
    return PatchKMeansImageTokenizer.load(path)
