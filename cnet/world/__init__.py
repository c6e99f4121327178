"""The miniature Stable Diffusion world: procedural scenes with exact conditions
(:mod:`cnet.world.data`), exact fidelity metrics (:mod:`cnet.world.metrics`), a Stable
Diffusion built small from diffusers' classes (:mod:`cnet.world.model`), its pretraining
(:mod:`cnet.world.pretrain`), the measurement of what the pretrained base does
(:mod:`cnet.world.evaluation`), and its decoder's dark speck with a refinement of the decoder
alone (:mod:`cnet.world.decoder`).

    python -m cnet.world pretrain --profile quick --out runs/quick-sd
    python -m cnet.world evaluate --model models/miniature-sd
"""

from .data import (
    CONDITIONS,
    PALETTE,
    SHAPES,
    FillDataset,
    ShapesDataset,
    render_fill,
    render_shapes,
)

__all__ = [
    "CONDITIONS",
    "PALETTE",
    "SHAPES",
    "FillDataset",
    "ShapesDataset",
    "render_fill",
    "render_shapes",
]
