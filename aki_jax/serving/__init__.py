"""Serving: answer questions about images for people, in a browser.

    from aki_jax.serving import Answerer, AskSettings, model_view

    answerer = Answerer.from_pretrained(checkpoint_dir)     # loads the model and compiles it (warm_up)
    for text in answerer.answer("What digit is this?", ["seven.png"], AskSettings(max_new_tokens=8)):
        print(text)                                          # the answer so far, growing token by token
    pictures = model_view(answerer.prompt(...)["modality_ids"])   # modality strip + MMA / causal masks

`aki_jax.serving.demo.build_demo(answerer)` wraps this in a Gradio page (`aki-demo` on the command
line). This package imports no web framework; only `aki_jax.serving.demo` imports Gradio.
"""

from aki_jax.serving.answerer import Answerer, AskSettings, RequestError
from aki_jax.serving.views import MODALITY_COLORS, mask_picture, modality_strip, model_view

__all__ = [
    "MODALITY_COLORS",
    "Answerer",
    "AskSettings",
    "RequestError",
    "mask_picture",
    "modality_strip",
    "model_view",
]
