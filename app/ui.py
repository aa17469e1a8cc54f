"""The page: a Gradio app with the stylized output large on the left (the camera preview small in its
corner) and, on the right, the stream and camera pickers, Start/Stop and the live controls, which reach
the running stream over its data channel (or, for a listed WHIP stream, over ``/streams/<id>/params``).

The page's behaviour lives in ``static/diffcam.js``; its look in ``static/page.css``, written with
Gradio's theme variables so that light and dark themes both read well.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from engine.config import StreamConfig

STATIC = Path(__file__).resolve().parent / "static"

#: the output, the camera preview in its corner, and the stats under them
STAGE = """
<div id="diffcam-stage" class="mirrored">
  <video id="diffcam-output" autoplay muted playsinline title="double-click: output only"></video>
  <video id="diffcam-local" autoplay muted playsinline title="your camera"></video>
  <button id="diffcam-fullscreen" class="diffcam-button" title="show only the output, full screen">Output only</button>
</div>
<div id="diffcam-stats">output – fps · latency – · dropped – · skipped –</div>
"""

#: what to stream and how: stream, camera, Start/Stop, status; a listed stream's player URL. The Stream row
#: is there from the start where streams are listed (``{streams_hidden}`` empty), so that Start never moves
#: down under a click when the first list arrives.
BAR = """
<div id="diffcam-bar">
  <div class="diffcam-row" id="diffcam-streams"{streams_hidden}>
    <label for="diffcam-stream">Stream</label>
    <select id="diffcam-stream"><option value="">my camera</option></select>
  </div>
  <div class="diffcam-row" id="diffcam-camera-row">
    <label for="diffcam-camera">Camera</label>
    <select id="diffcam-camera"></select>
  </div>
  <div class="diffcam-row">
    <button id="diffcam-start" class="diffcam-button primary">Start</button>
    <button id="diffcam-stop" class="diffcam-button" disabled>Stop</button>
    <label class="diffcam-toggle"><input type="checkbox" id="diffcam-mirror" checked> Mirror</label>
    <label class="diffcam-toggle"><input type="checkbox" id="diffcam-preview" checked> Preview</label>
  </div>
  <div id="diffcam-status" data-kind="info" role="status">press Start and allow the camera</div>
  <div class="diffcam-row" id="diffcam-view-link" hidden>
    <label for="diffcam-view-url" title="add it to OBS as a Browser Source">Player</label>
    <input id="diffcam-view-url" readonly>
    <button id="diffcam-copy" class="diffcam-button">Copy</button>
  </div>
  <div id="diffcam-notice" class="diffcam-field-error" hidden></div>
</div>
"""

#: (component attribute name, stream parameter) for the controls that stream live.
LIVE_CONTROLS = (("prompt", "prompt"), ("negative", "negative_prompt"), ("strength", "strength"),
                 ("guidance", "guidance_scale"), ("delta", "delta"), ("seed", "seed"),
                 ("similarity", "similarity_filter"), ("threshold", "similarity_threshold"))


MAX_UPLOAD = "64kb"


def mount_ui(app: FastAPI, config: StreamConfig, styles: list[dict], *, random_weights: bool = False,
             listed: bool = False) -> FastAPI:
    """Mount the page at ``/`` (after every API route: the mount catches all other paths); ``listed``: whether
    the server lists streams (``GET /streams``), which the page then offers from the start."""
    demo = build_blocks(config, styles, random_weights, listed)
    head = f"<script>{(STATIC / 'diffcam.js').read_text('utf-8')}</script>"
    # the page takes no files: refuse uploads past a small form's size (Gradio stores them otherwise)
    return gr.mount_gradio_app(app, demo, path="/", head=head, css=(STATIC / "page.css").read_text("utf-8"),
                               footer_links=[], max_file_size=MAX_UPLOAD)


def build_blocks(config: StreamConfig, styles: list[dict], random_weights: bool, listed: bool = False) -> gr.Blocks:
    with gr.Blocks(title="diffcam", analytics_enabled=False, fill_width=True) as demo:
        gr.HTML(_title(random_weights), apply_default_css=False, js_on_load=None, elem_id="diffcam-header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=420):
                gr.HTML(STAGE, apply_default_css=False, js_on_load=None)
            with gr.Column(scale=2, min_width=340, elem_id="diffcam-controls"):
                bar = BAR.format(streams_hidden="" if listed else " hidden")
                gr.HTML(bar, apply_default_css=False, js_on_load=None)
                _wire(_controls(config, styles), styles)
    return demo


def _title(random_weights: bool) -> str:
    note = (' · <strong>test model with random weights</strong>: expect abstract noise (run without '
            '<code>--model tiny</code> for a real model)') if random_weights else ""
    return f'<div id="diffcam-title"><strong>diffcam</strong> — your camera, restyled live{note}</div>'


def _controls(config: StreamConfig, styles: list[dict]) -> dict[str, gr.components.Component]:
    """The live controls, main ones first; each ``elem_id`` is ``diffcam-param-<parameter>``, where the page
    shows the server's refusal of that parameter."""
    ids = {name: f"diffcam-param-{field}" for name, field in LIVE_CONTROLS}
    c: dict[str, gr.components.Component] = {}
    c["style"] = gr.Dropdown([s["name"] for s in styles], value=None, label="Style preset", elem_id="diffcam-style")
    c["prompt"] = gr.Textbox(value=_text(config.prompt), label="Prompt", lines=2, max_lines=4, elem_id=ids["prompt"])
    c["strength"] = gr.Slider(0.0, 1.0, value=_strength(config), step=0.01, label="Strength",
                              info="0 keeps the camera image, 1 re-imagines it", elem_id=ids["strength"])
    c["negative"] = gr.Textbox(value=config.negative_prompt, label="Negative prompt", elem_id=ids["negative"])
    with gr.Row():
        c["guidance"] = gr.Slider(0.0, 3.0, value=config.guidance_scale, step=0.05, label="Guidance",
                                  elem_id=ids["guidance"])
        c["delta"] = gr.Slider(0.0, 2.0, value=config.delta, step=0.05, label="Delta (RCFG)", elem_id=ids["delta"])
    with gr.Row():
        c["seed"] = gr.Number(value=config.seed, precision=0, minimum=0, label="Seed", elem_id=ids["seed"])
        c["threshold"] = gr.Slider(0.5, 1.0, value=config.similarity_threshold, step=0.005,
                                   label="Similarity threshold", elem_id=ids["threshold"])
    c["similarity"] = gr.Checkbox(value=config.similarity_filter, label="Skip near-duplicate frames",
                                  elem_id=ids["similarity"])
    return c


def _wire(c: dict[str, gr.components.Component], styles: list[dict]) -> None:
    for name, field in LIVE_CONTROLS:
        c[name].change(fn=None, inputs=c[name], js=f"(v) => {{ window.diffcam.set({{ {field}: v }}); }}")
    by_name = {s["name"]: s for s in styles}

    def pick(name: str | None):
        style = by_name.get(name or "")
        if style is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        return style["prompt"], style["negative_prompt"], style["strength"], style["guidance_scale"]

    c["style"].change(pick, inputs=c["style"], outputs=[c["prompt"], c["negative"], c["strength"], c["guidance"]],
                      api_name=False)


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else ", ".join(text for text, _ in prompt)


def _strength(config: StreamConfig) -> float:
    """The strength whose mapping starts where ``t_index_list`` starts (the inverse of the mapping)."""
    span = config.num_inference_steps - config.denoising_steps
    return round(1.0 - config.t_index_list[0] / span, 2) if span > 0 else 1.0
