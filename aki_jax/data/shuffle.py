"""Checkpointable window shuffle for streams (grain's own is slow on small windows: ~30 ms per element
for a window of 4, ~0.1 ms for 1,000, as its index permutation walks cycles).

Elements are read in windows of `window` and emitted in a permutation drawn from (seed, window index).
The state is the parent's state at the window start plus the position inside the window; restoring
re-reads the window and skips what was emitted.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np


class WindowShuffleIterDataset(grain.IterDataset):
    def __init__(self, parent, window: int, seed: int):
        super().__init__(parent)
        self.window = window
        self.seed = seed

    def __iter__(self):
        return _WindowShuffleIterator(self._parent.__iter__(), self.window, self.seed)

    def __str__(self):
        return f"WindowShuffleIterDataset(window={self.window}, seed={self.seed})"


class _WindowShuffleIterator(grain.DatasetIterator):
    def __init__(self, parent, window: int, seed: int):
        super().__init__(parent)
        self._size = window
        self._seed = seed
        self._window: list = []
        self._index = -1  # window number
        self._position = 0  # elements of the current window already emitted
        self._start = self._parent.get_state()

    def _fill(self) -> None:
        self._start = self._parent.get_state()
        self._index += 1
        self._position = 0
        items = []
        for _ in range(self._size):
            try:
                items.append(next(self._parent))
            except StopIteration:
                break
        order = np.random.default_rng((self._seed, self._index)).permutation(len(items))
        self._window = [items[i] for i in order]

    def __next__(self):
        if self._position >= len(self._window):
            self._fill()
            if not self._window:
                raise StopIteration
        self._position += 1
        return self._window[self._position - 1]

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._start, "window_index": self._index, "position": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._window, self._position = [], 0
        self._index = state["window_index"] - 1 if state["window_index"] >= 0 else -1
        if state["window_index"] >= 0:
            self._fill()  # the window in progress, drawn again
            self._position = state["position"]
