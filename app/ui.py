"""The page: a Gradio app with a WebRTC view (camera picker, start/stop, local preview beside the
stylized output), live controls that reach the running stream over its data channel, and stats."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from engine.config import StreamConfig

STATIC = Path(__file__).resolve().parent / "static"

VIEW = """
<div id="diffcam">
  <div class="diffcam-bar">
    <label>Camera <select id="diffcam-camera"></select></label>
    <button id="diffcam-start" class="diffcam-button primary">Start</button>
    <button id="diffcam-stop" class="diffcam-button" disabled>Stop</button>
    <span id="diffcam-status" data-kind="info">press Start and allow the camera</span>
  </div>
  <div class="diffcam-videos">
    <figure><video id="diffcam-local" autoplay muted playsinline></video><figcaption>camera</figcaption></figure>
    <figure><video id="diffcam-output" autoplay muted playsinline></video><figcaption>stylized</figcaption></figure>
  </div>
  <div id="diffcam-stats">output – fps · latency – · dropped – · skipped –</div>
</div>
"""

CSS = """
#diffcam .diffcam-bar { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin-bottom: 8px; }
#diffcam .diffcam-videos { display: flex; gap: 12px; flex-wrap: wrap; }
#diffcam figure { margin: 0; flex: 1 1 320px; }
#diffcam video { width: 100%; aspect-ratio: 1; background: #111; border-radius: 8px; object-fit: cover; }
#diffcam figcaption { font-size: 0.85em; opacity: 0.7; text-align: center; }
#diffcam .diffcam-button { padding: 6px 16px; border-radius: 6px; border: 1px solid #888; cursor: pointer; }
#diffcam .diffcam-button.primary { background: #f97316; color: white; border-color: #f97316; }
#diffcam .diffcam-button:disabled { opacity: 0.4; cursor: default; }
#diffcam-status[data-kind="error"] { color: #dc2626; font-weight: 600; }
#diffcam-status[data-kind="ok"] { color: #16a34a; }
#diffcam-stats { font-family: monospace; margin-top: 6px; }
"""

#: (component attribute name, stream parameter) for the controls that stream live.
LIVE_CONTROLS = (("prompt", "prompt"), ("negative", "negative_prompt"), ("strength", "strength"),
                 ("guidance", "guidance_scale"), ("delta", "delta"), ("seed", "seed"),
                 ("similarity", "similarity_filter"), ("threshold", "similarity_threshold"))


MAX_UPLOAD = "64kb"


def mount_ui(app: FastAPI, config: StreamConfig, styles: list[dict], *, random_weights: bool = False) -> FastAPI:
    """Mount the page at ``/`` (after every API route: the mount catches all other paths)."""
    demo = build_blocks(config, styles, random_weights)
    head = f"<style>{CSS}</style><script>{(STATIC / 'diffcam.js').read_text('utf-8')}</script>"
    # the page takes no files: refuse uploads past a small form's size (Gradio stores them otherwise)
    return gr.mount_gradio_app(app, demo, path="/", head=head, footer_links=[], max_file_size=MAX_UPLOAD)


def build_blocks(config: StreamConfig, styles: list[dict], random_weights: bool) -> gr.Blocks:
    with gr.Blocks(title="diffcam", analytics_enabled=False) as demo:
        gr.Markdown("## diffcam — your camera, restyled live")
        if random_weights:
            gr.Markdown("**Test model with random weights**: the stylized picture is abstract noise shaped by "
                        "your camera and the prompt. Run without `--model tiny` for a real model.")
        gr.HTML(VIEW, js_on_load=None)
        _wire(_controls(config, styles), styles)
    return demo


def _controls(config: StreamConfig, styles: list[dict]) -> dict[str, gr.components.Component]:
    c: dict[str, gr.components.Component] = {}
    with gr.Row():
        c["style"] = gr.Dropdown([s["name"] for s in styles], value=None, label="Style preset")
        c["prompt"] = gr.Textbox(value=_text(config.prompt), label="Prompt", scale=3)
        c["negative"] = gr.Textbox(value=config.negative_prompt, label="Negative prompt", scale=2)
    with gr.Row():
        c["strength"] = gr.Slider(0.0, 1.0, value=_strength(config), step=0.01, label="Strength",
                                  info="0 keeps the camera image, 1 re-imagines it")
        c["guidance"] = gr.Slider(0.0, 3.0, value=config.guidance_scale, step=0.05, label="Guidance")
        c["delta"] = gr.Slider(0.0, 2.0, value=config.delta, step=0.05, label="Delta (RCFG)")
        c["seed"] = gr.Number(value=config.seed, precision=0, minimum=0, label="Seed")
    with gr.Row():
        c["similarity"] = gr.Checkbox(value=config.similarity_filter, label="Skip near-duplicate frames")
        c["threshold"] = gr.Slider(0.5, 1.0, value=config.similarity_threshold, step=0.005,
                                   label="Similarity threshold")
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
