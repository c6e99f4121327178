"""The world's colours: twelve named palette colours, and the styles that paint scenes with them.

A prompt names colours from :data:`PALETTE`; nearest-colour classification of a generated image
(:func:`cnet.world.metrics.classify_colours`) reads them back in the palette of the style the
model paints in (:data:`STYLES`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PALETTE", "COLOUR_NAMES", "PALETTE_RGB", "STYLES", "colour_index", "palette_of"]

# Well-separated named colours (RGB, 0-255): nearest-colour classification of a generated image
# must be unambiguous, so no two entries are close.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 160, 60),
    "cyan": (40, 210, 220),
    "blue": (40, 70, 220),
    "purple": (130, 50, 180),
    "pink": (250, 140, 200),
    "brown": (120, 70, 30),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)
PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32) / 255.0  # (colours, 3) in [0, 1]

# A style is the palette a scene is painted with: the same scenes, prompts and conditions (but
# Canny edges, found in the painted image), other colours. "plain" is the palette above, the one
# the shipped base learned. "cycled" is what a community fine-tune changes: every colour word
# painted as the next palette colour (red as orange, ..., black as red), so the same prompt gives
# another picture. It stays within the 12 colours because the miniature VAE was trained on those
# alone and is not made to reproduce others (SD's VAE reproduces photos of any style).
STYLES: dict[str, np.ndarray] = {
    "plain": PALETTE_RGB,
    "cycled": np.roll(PALETTE_RGB, -1, axis=0),
}


def colour_index(name: str) -> int:
    """Index of a named colour in :data:`PALETTE`; ValueError naming the palette otherwise."""
    if name not in PALETTE:
        raise ValueError(f"unknown colour {name!r}; expected one of {', '.join(COLOUR_NAMES)}")
    return COLOUR_NAMES.index(name)


def palette_of(style: str) -> np.ndarray:
    """The (colours, 3) RGB palette in [0, 1] of a style of :data:`STYLES`; ValueError naming
    the allowed styles for any other."""
    if style not in STYLES:
        raise ValueError(f"style: {style!r} is not allowed; expected one of {', '.join(STYLES)}")
    return STYLES[style]
