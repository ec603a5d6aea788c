"""The browser page: upload images, ask, watch the answer stream in, and see what the model sees.

    answerer = Answerer.from_pretrained(directory)
    demo = build_demo(answerer, note="loaded in 3.1 s")
    launch(demo, host="127.0.0.1", port=7860)            # blocks; block=False returns at once

`aki-demo` (aki_jax/cli/demo.py) does exactly this. The page's one event, "ask" (also the API name for
`gradio_client`: `client.submit(files, question, mode, temperature, top_k, top_p, seed, max_new_tokens,
api_name="/ask")`), streams (answer, layout strip, MMA mask, causal mask, layout summary, status); the
pictures and summary come in the first message only (`job.outputs()[0]`).
Requests queue and run one at a time; a request that cannot be answered (empty question, unreadable
image, prompt too long) shows its reason on the page as an error and the server carries on.

Gradio is told not to phone home: analytics off, no share link, no server-side rendering, system fonts.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import gradio as gr  # noqa: E402

from aki_jax.serving.answerer import PROMPT_BUCKET, Answerer, AskSettings, RequestError  # noqa: E402
from aki_jax.serving.views import MMA_ONLY_COLOR, MODALITY_COLORS, MODALITY_NAMES, model_view  # noqa: E402

MODES = ("greedy", "sampling")
MAX_QUEUE = 64  # waiting requests beyond this are turned away with Gradio's "queue is full"
DEFAULT_MAX_NEW_TOKENS = 64


def _swatch(color, name: str) -> str:
    r, g, b = color
    return f'<span style="display:inline-block;width:0.9em;height:0.9em;background:rgb({r},{g},{b})"></span> {name}'


LEGEND = " &nbsp; ".join(
    [_swatch(MODALITY_COLORS[m], MODALITY_NAMES[m]) for m in sorted(MODALITY_COLORS)]
    + [_swatch(MMA_ONLY_COLOR, "open under MMA only"), _swatch((40, 40, 40), "open"), "white: closed"]
)


def settings_from_controls(mode, temperature, top_k, top_p, seed, max_new_tokens) -> AskSettings:
    """The page's controls -> AskSettings (greedy ignores temperature, top-k and top-p)."""
    if mode not in MODES:
        raise RequestError(f"decoding must be one of {MODES}, got {mode!r}")
    sampling = mode == "sampling"
    return AskSettings(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature) if sampling else 0.0,
        top_k=int(top_k) if sampling else 0,
        top_p=float(top_p) if sampling else 1.0,
        seed=int(seed or 0),
    )


def _paths(files) -> list[str]:
    """Gradio's File value (None, paths, or file objects) -> paths."""
    return [f if isinstance(f, str) else getattr(f, "path", None) or f.name for f in files or []]


def build_demo(answerer: Answerer, note: str = "", title: str = "aki-jax: ask the model about images") -> gr.Blocks:
    """The page around `answerer` (not launched; see `launch`)."""
    limit = answerer.max_positions
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\n{note}")
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="images")
                preview = gr.Gallery(
                    label="Uploaded",
                    columns=6,
                    fit_columns=False,
                    height=110,
                    object_fit="contain",
                    preview=False,
                    allow_preview=False,
                    elem_id="preview",
                    interactive=False,
                )
                question = gr.Textbox(label="Question", lines=2, placeholder="What digit is this?", elem_id="question")
                with gr.Accordion("Generation", open=True):
                    mode = gr.Radio(list(MODES), value="greedy", label="Decoding", elem_id="mode")
                    with gr.Row():
                        temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (sampling)")
                        top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (sampling, 0: off)")
                    with gr.Row():
                        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (sampling, 1: off)")
                        seed = gr.Number(value=0, precision=0, label="Seed (sampling)")
                    max_new_tokens = gr.Slider(
                        1,
                        min(limit, 1024),
                        value=min(DEFAULT_MAX_NEW_TOKENS, limit),
                        step=1,
                        label="Max new tokens",
                        elem_id="max-new-tokens",
                    )
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="answer")
                status = gr.Markdown(elem_id="status")
                gr.Markdown("### What the model sees\n" + LEGEND)
                summary = gr.Markdown(elem_id="layout")
                gr.Markdown("Prompt layout, one column per token, left to right:")
                strip = gr.Image(format="png", interactive=False, show_label=False, container=False, height=48)
                gr.Markdown("Attention masks, query rows attend to key columns: MMA (left) and causal (right)")
                with gr.Row():
                    mma = gr.Image(format="png", interactive=False, show_label=False, elem_id="mma")
                    causal = gr.Image(format="png", interactive=False, show_label=False, elem_id="causal")

        def show_uploads(uploaded):
            readable = []
            for path in _paths(uploaded):  # an unreadable file is reported when asked about, not here
                try:
                    answerer.load_images([path])
                    readable.append(path)
                except RequestError:
                    pass
            return readable

        def respond(uploaded, question_text, *controls):
            start = time.perf_counter()
            try:
                settings = settings_from_controls(*controls)
                images = _paths(uploaded)
                example = answerer.prompt(question_text, images, settings)
            except RequestError as e:
                raise gr.Error(str(e), duration=None, print_exception=False) from e
            view = model_view(example["modality_ids"], PROMPT_BUCKET)
            pictures = {strip: view["strip"], mma: view["mma"], causal: view["causal"], summary: view["summary"]}
            yield {answer: "", status: "generating...", **pictures}
            text = ""
            try:
                for text in answerer.answer(question_text, images, settings):
                    yield {answer: text}
            except RequestError as e:
                raise gr.Error(str(e), duration=None, print_exception=False) from e
            except Exception as e:  # a bug or a resource problem: say so on the page, keep serving
                raise gr.Error(f"generation failed: {type(e).__name__}: {e}", duration=None) from e
            # The pictures are sent once, first: sending them again would rewrite their cached files
            # while the browser may still be fetching them.
            yield {answer: text, status: f"done in {time.perf_counter() - start:.1f} s"}

        inputs = [files, question, mode, temperature, top_k, top_p, seed, max_new_tokens]
        outputs = [answer, strip, mma, causal, summary, status]
        files.change(show_uploads, files, preview, concurrency_limit=None, show_progress="hidden", api_name=False)
        ask.click(respond, inputs, outputs, api_name="ask")
        question.submit(respond, inputs, outputs, api_name=False)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True, quiet=False):
    """Queue requests one at a time and serve on host:port; returns (local URL) when block is False."""
    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    system_fonts = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # the default theme would fetch web fonts
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        show_error=True,
        ssr_mode=False,
        quiet=quiet,
        theme=system_fonts,
    )
    return demo.local_url
