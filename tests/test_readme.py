"""The README's model example runs as written."""

import re
from pathlib import Path

import numpy as np


def test_readme_model_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## The model, the mask and the API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    config = scope["config"]
    assert scope["logits"].shape == (1, 3 + config.image_token_count + 9, config.logits_size)
    assert np.isfinite(float(scope["loss"])) and float(scope["count"]) > 0
