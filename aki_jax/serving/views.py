"""What the model sees: a prompt's modality layout and its attention masks as RGB pictures (numpy only).

Every token is one square cell of `cell` pixels, coloured by its modality (`MODALITY_COLORS`):

    modality_strip(ids)       uint8[rows * cell, L * cell, 3]: the tokens left to right
    mask_picture(mask, ids)   uint8[(L + 1) * cell, (L + 1) * cell, 3]: row t, column s is dark where
                              query t may attend to key s, white where not; the top row and left column
                              repeat the modality strip so rows and columns can be read off

For layout `T I I Q Q T` the MMA picture shows the worked example of `aki_jax.mask`: the two image
rows are also open at the two query columns ahead of them; those cells (open under MMA, closed under
causal attention) get `MMA_ONLY_COLOR` so the difference stands out next to the causal picture.
"""

from __future__ import annotations

import jax
import numpy as np

from aki_jax.mask import IMAGE, PAD, QUERY, TEXT, attention_mask

MODALITY_COLORS = {  # RGB; also the legend of the demo page
    PAD: (225, 225, 225),
    TEXT: (140, 140, 140),
    IMAGE: (31, 119, 180),
    QUERY: (255, 127, 14),
}
MODALITY_NAMES = {PAD: "pad", TEXT: "text", IMAGE: "image", QUERY: "query"}
OPEN_COLOR = (40, 40, 40)
CLOSED_COLOR = (255, 255, 255)
MMA_ONLY_COLOR = (214, 39, 40)
CORNER_COLOR = (255, 255, 255)
STRIP_ROWS = 3  # the layout strip is this many cells tall, to be seen at a glance
PICTURE_PIXELS = 480  # a mask picture aims at about this width; cells are whole pixels


def cell_size(length: int, pixels: int = PICTURE_PIXELS) -> int:
    """Pixels per token so that L + 1 cells fit in about `pixels` (at least 1, at most 16)."""
    return int(np.clip(pixels // (length + 1), 1, 16))


def _colors(modality_ids) -> np.ndarray:
    """int[L] modality ids -> uint8[L, 3] colours (unknown ids raise, naming them)."""
    ids = np.asarray(modality_ids)
    unknown = sorted(set(np.unique(ids).tolist()) - set(MODALITY_COLORS))
    if unknown:
        raise ValueError(f"modality ids must be in {sorted(MODALITY_COLORS)}, got {unknown}")
    table = np.zeros((max(MODALITY_COLORS) + 1, 3), np.uint8)
    for modality, color in MODALITY_COLORS.items():
        table[modality] = color
    return table[ids]


def _cells(grid: np.ndarray, cell: int) -> np.ndarray:
    """uint8[R, C, 3] -> uint8[R * cell, C * cell, 3] (each entry a cell x cell square)."""
    return np.repeat(np.repeat(grid, cell, axis=0), cell, axis=1)


def modality_strip(modality_ids, cell: int | None = None, rows: int = 1) -> np.ndarray:
    """int[L] modality ids -> uint8[rows * cell, L * cell, 3] (rows: how many cells tall)."""
    ids = np.asarray(modality_ids).reshape(-1)
    cell = cell_size(len(ids)) if cell is None else cell
    return _cells(np.repeat(_colors(ids)[None], rows, axis=0), cell)


def mask_picture(mask, modality_ids, cell: int | None = None, highlight=None) -> np.ndarray:
    """bool[L, L] mask (query rows, key columns) -> uint8[(L + 1) * cell, (L + 1) * cell, 3].

    highlight: optional bool[L, L]; open cells there are drawn in `MMA_ONLY_COLOR` instead of `OPEN_COLOR`.
    """
    mask = np.asarray(mask, bool)
    ids = np.asarray(modality_ids).reshape(-1)
    if mask.shape != (len(ids), len(ids)):
        raise ValueError(f"mask must be bool[L, L] with L = {len(ids)} modality ids, got shape {mask.shape}")
    cell = cell_size(len(ids)) if cell is None else cell
    grid = np.where(mask[..., None], np.uint8(OPEN_COLOR), np.uint8(CLOSED_COLOR)).astype(np.uint8)
    if highlight is not None:
        grid[np.asarray(highlight, bool) & mask] = MMA_ONLY_COLOR
    colors = _colors(ids)
    framed = np.empty((len(ids) + 1, len(ids) + 1, 3), np.uint8)
    framed[0, 0] = CORNER_COLOR
    framed[0, 1:] = colors
    framed[1:, 0] = colors
    framed[1:, 1:] = grid
    return _cells(framed, cell)


@jax.jit
def _masks(modality_ids):
    return attention_mask(modality_ids, kind="mma"), attention_mask(modality_ids, kind="causal")


def model_view(modality_ids, pad_to_multiple: int = 1) -> dict:
    """int[L] modality ids of one prompt -> {"strip", "mma", "causal": uint8 pictures, "summary": str}.

    The masks are computed on the ids right-padded with PAD to a multiple of `pad_to_multiple` and cut
    back to L x L (PAD after the prompt changes nothing among its tokens): a server passes its prompt
    bucket, so it compiles one program per bucket instead of one per prompt length.
    """
    ids = np.asarray(modality_ids).reshape(1, -1)
    length = ids.shape[1]
    padded = np.pad(ids, ((0, 0), (0, -length % pad_to_multiple)), constant_values=PAD)
    mma, causal = (np.asarray(m)[0, :length, :length] for m in _masks(padded))
    cell = cell_size(ids.shape[1])
    return {
        "strip": modality_strip(ids[0], cell, rows=STRIP_ROWS),
        "mma": mask_picture(mma, ids[0], cell, highlight=mma & ~causal),
        "causal": mask_picture(causal, ids[0], cell),
        "summary": layout_summary(ids[0], int((mma & ~causal).sum())),
    }


def layout_summary(modality_ids, mma_only: int) -> str:
    """One line: how many tokens of each modality, and how many attention pairs MMA adds."""
    ids = np.asarray(modality_ids).reshape(-1)
    counts = ", ".join(
        f"{int((ids == m).sum())} {MODALITY_NAMES[m]}" for m in (TEXT, IMAGE, QUERY, PAD) if (ids == m).any()
    )
    return f"{len(ids)} tokens ({counts}); MMA opens {mma_only} image-to-query pairs that causal attention closes"
