"""What the model sees: the pictures of the modality layout and masks read back as aki_jax.mask's examples."""

import subprocess
import sys

import numpy as np
import pytest

from aki_jax.mask import IMAGE, PAD, QUERY, TEXT
from aki_jax.serving.views import (
    CLOSED_COLOR,
    MMA_ONLY_COLOR,
    MODALITY_COLORS,
    OPEN_COLOR,
    STRIP_ROWS,
    cell_size,
    mask_picture,
    modality_strip,
    model_view,
)

T, V, Q, P = TEXT, IMAGE, QUERY, PAD  # V: an image (vision) token
CELL = 5


def cells(picture, length, cell=CELL):
    """The colour at the centre of each token cell: (frame row uint8[L, 3], frame column, grid uint8[L, L, 3])."""
    centres = np.arange(length + 1) * cell + cell // 2
    grid = picture[np.ix_(centres, centres)]
    return grid[0, 1:], grid[1:, 0], grid[1:, 1:]


def as_mask(grid):
    """Cell colours -> bool[L, L] (open: OPEN_COLOR or MMA_ONLY_COLOR; anything else must be CLOSED_COLOR)."""
    is_open = (grid == OPEN_COLOR).all(-1) | (grid == MMA_ONLY_COLOR).all(-1)
    assert ((grid == CLOSED_COLOR).all(-1) | is_open).all()
    return is_open


def test_the_mma_picture_shows_the_worked_example_of_the_mask_docstring():
    ids = np.array([T, V, V, Q, Q, T])
    view = model_view(ids)
    cell = cell_size(6)
    assert view["strip"].shape == (STRIP_ROWS * cell, 6 * cell, 3)
    assert view["mma"].shape == (7 * cell, 7 * cell, 3)  # L + 1 cells: the frame row/column, then the tokens
    # aki_jax/mask.py's docstring, layout `T I I Q Q T`, written out by hand:
    mma = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
        ],
        bool,
    )
    causal = np.tril(np.ones((6, 6), bool))
    top, left, grid = cells(view["mma"], 6, cell)
    assert (as_mask(grid) == mma).all()
    only_mma = (grid == MMA_ONLY_COLOR).all(-1)
    assert (only_mma == (mma & ~causal)).all()  # the image rows reading the query columns ahead of them
    expected_frame = np.array([MODALITY_COLORS[m] for m in ids], np.uint8)
    assert (top == expected_frame).all() and (left == expected_frame).all()
    assert (as_mask(cells(view["causal"], 6, cell)[2]) == causal).all()
    assert (
        view["summary"]
        == "6 tokens (2 text, 2 image, 2 query); MMA opens 4 image-to-query pairs that causal attention closes"
    )


def test_computing_the_masks_on_a_padded_bucket_draws_the_same_pictures():
    ids = np.array([T, V, V, V, Q, Q, T, T, V, Q, T])
    plain, bucketed = model_view(ids), model_view(ids, pad_to_multiple=16)
    assert all((plain[key] == bucketed[key]).all() for key in ("strip", "mma", "causal"))
    assert plain["summary"] == bucketed["summary"]


def test_padding_is_closed_in_both_pictures():
    ids = np.array([T, T, P])
    view = model_view(ids)
    cell = cell_size(3)
    for kind in ("mma", "causal"):
        grid_mask = as_mask(cells(view[kind], 3, cell)[2])
        assert (grid_mask == np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)).all()


def test_the_strip_has_one_cell_per_token_in_its_modality_colour():
    ids = np.array([T, V, Q, P, T])
    strip = modality_strip(ids, CELL, rows=2)
    assert strip.shape == (2 * CELL, 5 * CELL, 3) and strip.dtype == np.uint8
    for t, modality in enumerate(ids):
        assert (strip[:, t * CELL : (t + 1) * CELL] == MODALITY_COLORS[modality]).all()


def test_pictures_refuse_what_they_cannot_draw():
    with pytest.raises(ValueError, match=r"modality ids must be in \[0, 1, 2, 3\], got \[7\]"):
        modality_strip(np.array([1, 7]))
    with pytest.raises(ValueError, match=r"mask must be bool\[L, L\] with L = 3 modality ids, got shape \(2, 2\)"):
        mask_picture(np.ones((2, 2), bool), np.array([T, T, T]))


def test_the_library_and_the_demo_command_do_not_import_gradio():
    code = "import sys, aki_jax, aki_jax.serving, aki_jax.cli.demo; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
