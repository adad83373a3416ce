"""The page: an image completion tab, an audio tab and a models tab, and how the server is launched.

Sampling events share one concurrency id per device with a limit of 1, so users queue (and see
their place in the queue) instead of running several jobs into the device's memory at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from media.audio import SAMPLE_RATE
from models import LSTMConfig
from sampling import SamplingOptions

from .api import api_functions
from .cards import card_markdown, layout_picture, weight_layout_picture
from .handlers import CONTINUE, FROM_SCRATCH, MAX_SAMPLES, MAX_SEED, MAX_TEMPERATURE, Studio, crop_preview
from .history import HISTORY_SIZE, HistoryEntry
from .registry import Registry

EXAMPLES = Path(__file__).resolve().parent / "examples"
# No outbound network: gradio reads its telemetry switch when it serves; the hub variables keep any hub
# client offline (nothing here calls the hub). Set by launch(), before the server starts.
OFFLINE_ENVIRONMENT = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "DO_NOT_TRACK": "1"}
QUEUE_SIZE = 32  # jobs waiting at most; more are turned away with a message
MAX_UPLOAD = "20mb"
THEME = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate",  # system fonts: no requests to font hosts
                       font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])
CSS = """
.pixelated img { image-rendering: pixelated; }
#title { margin-bottom: 0; }
.caption { font-size: var(--text-sm); color: var(--body-text-color-subdued); }
"""
HEADER = """# Sparse Transformer studio
Complete 64×64 pictures from their top rows and generate 12 kHz audio with Sparse Transformers
(Child et al., 2019) running on this project's block-sparse attention kernels."""
# Playback while sampling, in the page (no ffmpeg needed): each update of the result (a growing 16-bit WAV,
# every 0.5 s of audio) is fetched and the part not yet scheduled is queued on one Web Audio clock, so the
# clip plays on without gaps or restarts while the rest is sampled. START_PLAYER runs on the Generate click
# (a user gesture: browsers let a page start audio then); STOP_PLAYER on Stop.
START_PLAYER = """(live) => {
  const old = window.studioPlayer;
  if (old && old.ctx) old.ctx.close();
  window.studioPlayer = live ? {ctx: new AudioContext(), scheduled: 0, start: null, chain: Promise.resolve(),
                                sources: [], log: []} : null;
}"""
PLAY_GROWN = """(clip) => {
  const s = window.studioPlayer;
  if (!s || !clip || !clip.url) return;
  s.chain = s.chain.then(async () => {
    const data = await (await fetch(clip.url)).arrayBuffer();
    const audio = await s.ctx.decodeAudioData(data);
    if (audio.duration <= s.scheduled + 1e-3) return;
    if (s.start === null) s.start = s.ctx.currentTime + 0.1;
    const when = Math.max(s.start + s.scheduled, s.ctx.currentTime + 0.02);
    const src = s.ctx.createBufferSource();
    src.buffer = audio;
    src.connect(s.ctx.destination);
    src.start(when, s.scheduled);
    s.start = when - s.scheduled;
    s.log.push({at: performance.now(), from: s.scheduled, to: audio.duration});
    s.scheduled = audio.duration;
  }).catch((e) => { s.error = String(e); });
}"""
STOP_PLAYER = """() => { const s = window.studioPlayer; if (s && s.ctx) s.ctx.close(); window.studioPlayer = null; }"""
TRAIN_HINT = "python train.py {kind} --data DIR --out runs/{kind} --config {kind}-cpu --export {name}"


def no_models(registry: Registry) -> str:
    """What to do when the checkpoint folder holds no usable model."""
    problems = "".join(f"\n- could not use {p}" for p in registry.problems)
    return f"""## No models yet
The app serves the checkpoints (`NAME.safetensors` and its card `NAME.json`) in `{registry.folder}`,
and found none there.{problems}

- Put the shipped checkpoints `image64` and `audio12k` in that folder, or
- train your own: `{TRAIN_HINT.format(kind="image", name="image64")}`
  (or `audio`, exporting `audio12k`), or
- point the app at another folder: `python app.py --checkpoints DIR`.

Then start `python app.py` again."""


def missing_kind(registry: Registry, kind: str) -> None:
    name = "image64" if kind == "image" else "audio12k"
    gr.Markdown(f"No {kind} model in `{registry.folder}`. Export one with "
                       f"`{TRAIN_HINT.format(kind=kind, name=name)}` and start the app again.")


def model_picker(registry: Registry, kind: str) -> gr.Dropdown:
    """A model selector, shown only when there is a choice."""
    names = [e.name for e in registry.of_kind(kind)]
    return gr.Dropdown(names, value=names[0], label="Model", visible=len(names) > 1)


def seed_controls() -> tuple[gr.Number, gr.Checkbox]:
    with gr.Row():
        seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", min_width=120)
        randomize = gr.Checkbox(True, label="Random seed", info="a new seed each run", min_width=120)
    return seed, randomize


def temperature_control(defaults: SamplingOptions) -> gr.Slider:
    # steps of 0.01: a card's default (two decimals, e.g. 1.03) sits exactly on the track, not on the nearest 0.05
    return gr.Slider(0, MAX_TEMPERATURE, defaults.temperature, step=0.01, label="Temperature",
                     info="0 = always the likeliest value; starts at the model's default")


def advanced_controls(defaults: SamplingOptions) -> tuple[gr.Slider, gr.Slider]:
    with gr.Accordion("Advanced", open=False):
        top_k = gr.Slider(0, 256, defaults.top_k or 0, step=1, label="Top-k",
                          info="keep the k likeliest values (0 = off)")
        top_p = gr.Slider(0.01, 1, defaults.top_p or 1, step=0.01, label="Top-p",
                          info="keep the likeliest values up to this mass (1 = off)")
    return top_k, top_p


def model_defaults(registry: Registry, kind: str, model: gr.Dropdown, controls: list[gr.Slider]) -> None:
    """When another model is picked, set temperature, top-k and top-p to its card's sampling defaults."""
    def defaults(name: str) -> tuple[float, int, float]:
        options = registry.entry(name, kind).defaults
        return options.temperature, options.top_k or 0, options.top_p or 1.0

    model.change(defaults, model, controls, api_visibility="private", queue=False)


def run_buttons(label: str) -> tuple[gr.Button, gr.Button]:
    with gr.Row():
        run = gr.Button(label, variant="primary", scale=3)
        stop = gr.Button("Stop", variant="stop", scale=1)
    return run, stop


def image_tab(studio: Studio, history: gr.State) -> None:
    registry = studio.registry
    if not registry.of_kind("image"):
        missing_kind(registry, "image")
        return
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=360):
            with gr.Row(equal_height=True):
                picture = gr.Image(label="Picture", type="filepath", sources=["upload", "clipboard"],
                                   format="png", height=240)
                crop = gr.Image(label="What the model sees: 64×64", interactive=False, format="png", height=240,
                                buttons=[], elem_id="image-crop")
            rows = gr.Slider(0, 63, 32, step=1, label="Prompt rows", elem_id="prompt-rows",
                             info="rows kept from the top (above the red line); the model draws the rest")
            defaults = registry.of_kind("image")[0].defaults  # the first model's, as the picker's choice
            with gr.Row():
                temperature = temperature_control(defaults)
                samples = gr.Slider(1, MAX_SAMPLES, 4, step=1, label="Samples", elem_id="image-samples")
            seed, randomize = seed_controls()
            top_k, top_p = advanced_controls(defaults)
            model = model_picker(registry, "image")
            model_defaults(registry, "image", model, [temperature, top_k, top_p])
            run, stop = run_buttons("Complete")
            gr.Examples(sorted(str(p) for p in EXAMPLES.glob("*.png")), inputs=[picture],
                        label="Examples (drawn by app/examples/make_examples.py)")
        with gr.Column(scale=7, min_width=400):
            preview = gr.Image(label="Prompt | completions | original", interactive=False, format="png",
                               elem_id="image-preview")
            gallery = gr.Gallery(label="Samples (64×64 PNG, shown enlarged)", columns=6, height=250, format="png",
                                 object_fit="contain", buttons=["download", "download_all", "fullscreen"],
                                 interactive=False, elem_id="image-gallery", elem_classes="pixelated")
            status = gr.Markdown(elem_id="image-status")
    gr.on([picture.change, rows.release], crop_preview, [picture, rows], crop, preprocess=False,
          api_name="crop_preview", show_progress="hidden")
    event = run.click(studio.complete_images, [picture, rows, temperature, samples, seed, randomize, top_k, top_p,
                                               model, history], [preview, gallery, seed, status, history],
                      preprocess=False, api_name="complete_image", api_visibility="undocumented",
                      **sampling(registry))
    stop.click(None, cancels=[event], api_name=False)


def audio_tab(studio: Studio, history: gr.State) -> None:
    registry = studio.registry
    if not registry.of_kind("audio"):
        missing_kind(registry, "audio")
        return
    longest = max(e.config.seq_len for e in registry.of_kind("audio")) / SAMPLE_RATE
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=360):
            mode = gr.Radio([FROM_SCRATCH, CONTINUE], value=FROM_SCRATCH, label="Start")
            clip = gr.Audio(label="Clip to continue (any format soundfile reads)", type="filepath",
                            sources=["upload"])
            prompt_seconds = gr.Slider(0.05, round(longest, 2), round(min(1.0, longest / 2), 2), step=0.01,
                                       label="Prompt length (s)", info="the clip's first seconds, continued")
            length = gr.Slider(0.01, round(longest, 2), round(min(2.0, longest / 2), 2), step=0.01,
                               label="Length (s)", info=f"up to {longest:.2f} s (the model's context) with the prompt",
                               elem_id="audio-length")
            defaults = registry.of_kind("audio")[0].defaults
            temperature = temperature_control(defaults)
            seed, randomize = seed_controls()
            top_k, top_p = advanced_controls(defaults)
            model = model_picker(registry, "audio")
            model_defaults(registry, "audio", model, [temperature, top_k, top_p])
            run, stop = run_buttons("Generate")
            gr.Examples([[str(p), CONTINUE] for p in sorted(EXAMPLES.glob("*.flac"))], inputs=[clip, mode],
                        label="Examples (synthesised by app/examples/make_examples.py)")
        with gr.Column(scale=7, min_width=400):
            picture = gr.Image(label="Waveform and spectrogram: prompt grey, generated indigo", interactive=False,
                               format="png", height=300, buttons=["download"], elem_id="audio-picture")
            result = gr.Audio(label="Result (16-bit WAV, 12 kHz; grows while sampling)", type="numpy", format="wav",
                              interactive=False, buttons=["download"], elem_id="audio-result")
            live = gr.Checkbox(True, label="Play while generating", elem_id="audio-live",
                               info="hear the clip as it is sampled")
            status = gr.Markdown(elem_id="audio-status")
    clip.upload(lambda: CONTINUE, None, mode, api_name=False, queue=False)
    run.click(None, [live], None, js=START_PLAYER, api_visibility="private", queue=False)
    event = run.click(studio.generate_clip, [mode, clip, prompt_seconds, length, temperature, seed, randomize,
                                             top_k, top_p, model, history], [picture, result, seed, status, history],
                      preprocess=False, api_name="generate_audio", api_visibility="undocumented",
                      **sampling(registry))
    result.change(None, [result], None, js=PLAY_GROWN, api_visibility="private", queue=False)
    stop.click(None, cancels=[event], api_name=False, js=STOP_PLAYER)


def history_tab(studio: Studio, history: gr.State) -> None:
    """This browser session's results, newest first, each with its settings and files to download."""
    gr.Markdown(f"This session's last {HISTORY_SIZE} results, newest first. Each downloads with its settings "
                "JSON: `python sample.py --from-json settings.json` makes the same samples again (same model "
                "weights, checked by their SHA-256).", elem_classes="caption")
    clear = gr.Button("Clear history", size="sm", elem_id="history-clear")
    clear.click(studio.history.clear, [history], [history], api_visibility="private", queue=False)

    @gr.render(inputs=[history])
    def show(entries: list) -> None:
        if not entries:
            gr.Markdown("No results yet: complete an image or generate a clip.", elem_id="history-empty")
            return
        for i, entry in enumerate(entries):
            if not isinstance(entry, HistoryEntry):
                continue
            with gr.Row(equal_height=False, elem_classes="history-entry"):
                with gr.Column(scale=3, min_width=300):
                    if entry.kind == "image":
                        gr.Image(str(entry.picture), label=f"{len(entries) - i}. images", interactive=False,
                                 format="png", buttons=["download"], height=200, elem_classes="pixelated")
                    else:
                        gr.Audio(str(entry.media[0]), label=f"{len(entries) - i}. audio", type="filepath",
                                 interactive=False, buttons=["download"])
                with gr.Column(scale=4, min_width=300):
                    gr.Markdown(f"**{entry.status}**\n\n{entry.settings_line()} · model `{entry.model_name}`")
                    gr.File(entry.downloads(), label="Settings JSON and samples", file_count="multiple",
                            interactive=False, height=140)


def models_tab(registry: Registry) -> None:
    if not registry.entries:
        gr.Markdown(f"No checkpoints in `{registry.folder}` yet: see above for how to get one.")
        return
    for entry in registry.entries:
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                gr.Markdown(card_markdown(entry))
            with gr.Column(scale=2):
                if isinstance(entry.config, LSTMConfig):
                    (picture, caption), what = weight_layout_picture(entry.config), "Weight layout"
                else:
                    (picture, caption), what = layout_picture(entry.config), "Attention layout"
                gr.Image(picture, label=f"{what} of {entry.name}", interactive=False, format="png",
                         buttons=[], height=340)
                gr.Markdown(caption, elem_classes="caption")
    for problem in registry.problems:
        gr.Markdown(f"**Could not use** {problem}")


def sampling(registry: Registry) -> dict:
    """Event settings of the sampling jobs: one at a time per device, queued."""
    return {"concurrency_limit": 1, "concurrency_id": f"sampling-{registry.device}"}


def document(demo: gr.Blocks, dependency: dict, fn) -> None:
    """Name each argument of a gr.api endpoint after its parameter and describe it from the function's
    docstring ("Args:" lines), for the page's API view (gr.api labels them "1st", "2nd", ...)."""
    _, described, _ = gr.utils.get_function_description(fn)
    for component, name in zip(demo.fns[dependency["id"]].inputs, described, strict=True):
        component.label = name
        component._api_info = {**component._api_info, "additional_description": described[name]}


def build_demo(registry: Registry) -> gr.Blocks:
    """The whole page for the checkpoints in ``registry``."""
    studio = Studio(registry)
    with gr.Blocks(title="Sparse Transformer studio", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(HEADER, elem_id="title")
        if not registry.entries:
            gr.Markdown(no_models(registry), elem_id="no-models")
        history = gr.State([], delete_callback=studio.history.clear)  # this browser session's results
        with gr.Tabs():
            with gr.Tab("Image completion", id="image"):
                image_tab(studio, history)
            with gr.Tab("Audio", id="audio"):
                audio_tab(studio, history)
            with gr.Tab("History", id="history"):
                history_tab(studio, history)
            with gr.Tab("Models", id="models"):
                models_tab(registry)
        for fn in api_functions(studio):
            document(demo, gr.api(fn, api_name=fn.__name__, **sampling(registry)), fn)
        gr.Markdown(f"Running on `{registry.device}` with the checkpoints in `{registry.folder}`.",
                    elem_classes="caption")
    demo.served_folders = [str(studio.history.root)]  # results (and API previews), for launch's allowed_paths
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
    """Serve ``demo`` on host:port: queue on, no share link, bounded uploads, no telemetry."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=2)
    demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                max_file_size=MAX_UPLOAD,
                allowed_paths=[str(EXAMPLES), *getattr(demo, "served_folders", [])], theme=THEME, css=CSS,
                show_error=True,
                ssr_mode=False, mcp_server=False, pwa=False, enable_monitoring=False, inbrowser=False,
                quiet=not block)
