"""Damage tracking: what each viewer has not been sent since it changed, as a boolean grid of ``tile x tile``
pixel tiles (its :class:`Damage`), and the rectangles that cover a grid's set tiles (:func:`mask_rects`).

Marking happens after an update's pixels are in the framebuffer, and taking (clearing) before an encode reads
it; so a tile that changes while being encoded is marked again and sent again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from vgpuctl.service.stream.codec import Rect

Mask = npt.NDArray[np.bool_]
Grid = tuple[int, int]
"""(tile rows, tile columns) of a screen."""
Tiles = tuple[slice, slice]
"""The tiles a rectangle touches: rows, columns of a mask."""


def grid_shape(width: int, height: int, tile: int) -> Grid:
    return (-(-height // tile), -(-width // tile))


def tiles_of(rect: Rect, tile: int) -> Tiles:
    x, y, w, h = rect
    return (slice(y // tile, -(-(y + h) // tile)), slice(x // tile, -(-(x + w) // tile)))


class Damage:
    """The tiles one viewer has not been sent since they changed; all of them to begin with (a full frame)."""

    def __init__(self, grid: Grid) -> None:
        self.mask: Mask = np.ones(grid, np.bool_)

    def any(self) -> bool:
        return bool(self.mask.any())

    def key(self) -> bytes:
        """Equal for viewers with the same pending tiles (they can share an encode)."""
        return self.mask.tobytes() + str(self.mask.shape).encode()

    def mark(self, tiles: Sequence[Tiles]) -> None:
        for rows, columns in tiles:
            self.mask[rows, columns] = True

    def mark_all(self) -> None:
        self.mask[:] = True

    def reset(self, grid: Grid) -> None:
        """The screen has a new size: all of it is pending."""
        self.mask = np.ones(grid, np.bool_)

    def clear(self) -> None:
        self.mask[:] = False

    def take(self) -> Mask:
        """What is pending (a copy), now cleared."""
        taken = self.mask.copy()
        self.mask[:] = False
        return taken


def mask_rects(mask: Mask, tile: int, width: int, height: int, max_rect_pixels: int) -> list[Rect]:
    """Rectangles covering the set tiles, clipped to the screen: runs of tiles per tile row, merged downwards
    while the next row has the same run, then cut into bands of at most ``max_rect_pixels``."""
    rows, _ = mask.shape
    runs_by_row: list[list[tuple[int, int]]] = []
    for ty in range(rows):
        row = mask[ty]
        if not row.any():
            runs_by_row.append([])
            continue
        padded = np.concatenate(([False], row, [False]))
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        runs_by_row.append(list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True)))
    open_rects: dict[tuple[int, int], int] = {}  # run -> first tile row
    tile_rects: list[tuple[int, int, int, int]] = []  # tx0, ty0, tx1, ty1
    for ty in range(rows + 1):
        runs = set(runs_by_row[ty]) if ty < rows else set()
        for run in [r for r in open_rects if r not in runs]:
            tile_rects.append((run[0], open_rects.pop(run), run[1], ty))
        for run in runs:
            open_rects.setdefault(run, ty)
    rects: list[Rect] = []
    for tx0, ty0, tx1, ty1 in sorted(tile_rects, key=lambda r: (r[1], r[0])):
        x, y = tx0 * tile, ty0 * tile
        w, bottom = min(tx1 * tile, width) - x, min(ty1 * tile, height)
        if w <= 0 or bottom <= y:
            continue
        band = max(tile, (max_rect_pixels // w) // tile * tile)
        for top in range(y, bottom, band):
            rects.append((x, top, w, min(band, bottom - top)))
    return rects
