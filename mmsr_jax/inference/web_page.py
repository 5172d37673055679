"""The web demo's page (Gradio) for a :class:`~mmsr_jax.inference.web_demo.DemoSession`: its
controls, before / after view, maps, caption and downloads, and the server that queues its
requests (``python -m mmsr_jax.app``).
"""

from __future__ import annotations

import contextvars
import os
import socket
import traceback

from mmsr_jax.data import images as image_io
from mmsr_jax.diffusion.guidance import GUIDANCE_MODES
from mmsr_jax.formats.records import CONTEXT_GROUPS, MODALITIES
from mmsr_jax.inference.web_demo import MAX_SEED, DemoSession

INSTALL = "pip install -r requirements.txt && pip install --no-deps -r requirements-app.txt"
TEMPERATURE_RANGE = (0.25, 10.0)  # the paper's useful range is about 0.4 to 10


def import_gradio():
  """Gradio, with analytics off (set before the import: it reads the variable then)."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  try:
    import gradio as gr
  except ImportError as e:
    raise ValueError(f"the web demo needs gradio ({e}); install it with: {INSTALL}") from e
  return gr


def _rgb(pic: image_io.Picture):
  """8-bit RGB PIL image of a picture, for display."""
  return image_io.to_pil(pic).convert("RGB")


def _callbacks(gr, session: DemoSession, user_errors: tuple):
  """The page's two handlers: an upload checked and shown, and a request run."""
  def on_upload(path):
    """Checks an upload at once (header first) and shows it; an error is shown, not raised."""
    if not path:
      return None, ""
    try:
      pic = session.read_input(path)
    except (ValueError, FileNotFoundError) as e:
      return None, f"**Cannot use this file:** {e}"
    return _rgb(pic), session.describe(pic)

  def on_run(path, caption, negative_prompt, guidance, scale, steps, seed, strength, *rest,
             progress=gr.Progress()):
    n = len(CONTEXT_GROUPS)
    enabled = dict(zip(CONTEXT_GROUPS, rest[:n]))
    temperature = dict(zip(CONTEXT_GROUPS, rest[n:2 * n]))
    map_paths = dict(zip(MODALITIES, rest[2 * n:]))
    # The sampler calls back from JAX's thread: run Gradio's progress in this request's context.
    ctx = contextvars.copy_context()

    def report(done, total):
      # Before the first step: maps, text and VQ encoding, and for a new padded size the compile.
      desc = "DDIM steps" if done else "preparing (a new image size compiles the sampler)"
      ctx.run(progress, (done, total), desc=desc, unit="steps")

    try:
      result = session.run(
          path, caption=caption, map_paths=map_paths, progress=report,
          negative_prompt=negative_prompt, guidance=guidance, scale=scale, steps=steps,
          seed=seed, strength=strength, temperature=temperature, enabled=enabled)
    except user_errors as e:
      raise gr.Error(str(e.args[0] if isinstance(e, KeyError) and e.args else e),
                     print_exception=False) from e
    except Exception as e:  # noqa: BLE001 - the server keeps serving; the page says what failed
      traceback.print_exc()
      raise gr.Error(f"internal error ({type(e).__name__}: {e}); the server log has the "
                     "traceback") from e
    before, after = _rgb(result.bicubic), _rgb(result.output)
    record = result.record
    caption_line = (f"{record['caption']!r} ({record['caption_source']})" if record["caption"]
                    else f"(none; {record['caption_source']})")
    with open(result.sidecar) as fh:
      sidecar_text = fh.read()
    return ((before, after), before, after, result.maps, caption_line,
            [result.png, result.sidecar], sidecar_text)

  return on_upload, on_run


def build_demo(session: DemoSession, user_errors: tuple = (ValueError,)):
  """The page (a ``gr.Blocks``) for a :class:`DemoSession`; ``serve`` starts it. A request
  that raises one of ``user_errors`` shows its message; any other error is reported as an
  internal one, with the traceback in the server log."""
  gr = import_gradio()
  sr = session.sr
  sc = sr.config.sampling
  max_steps = sr.system.schedule.num_timesteps
  on_upload, on_run = _callbacks(gr, session, user_errors)

  with gr.Blocks(title="MMSR super-resolution") as demo:
    gr.Markdown(
        f"## MMSR x{sr.scale_factor} super-resolution\n"
        f"Run `{sr.workdir}`, checkpoint step {sr.step} (EMA weights). Upload an image, set the "
        "controls and press **Super-resolve**. Temperature below 1 makes the model attend more "
        "to that group, above 1 less; unticking a group gives the model its null token.")
    with gr.Row():
      with gr.Column(scale=2):
        with gr.Row():
          upload = gr.File(label=f"Input image ({', '.join(image_io.SUFFIXES)}; at most "
                           f"{session.max_pixels:,} pixels)",
                           file_types=list(image_io.SUFFIXES), type="filepath", height=160,
                           scale=3, elem_id="input-file")
          preview = gr.Image(label="Input", type="pil", format="png", interactive=False,
                             height=160, scale=2, elem_id="input-preview")
        info = gr.Markdown(elem_id="input-info")
        caption = gr.Textbox(label="Caption (empty: the annotator's if one is loaded, else none)",
                             elem_id="caption")
        negative = gr.Textbox(label="Negative prompt", value=sc.negative_prompt,
                              elem_id="negative-prompt")
        with gr.Row():
          guidance = gr.Dropdown(list(GUIDANCE_MODES), value=sc.guidance, label="Guidance",
                                 elem_id="guidance")
          scale = gr.Slider(0.0, 14.0, value=float(sc.scale), step=0.5,
                            label="Guidance scale (0: conditional only)", elem_id="scale")
        with gr.Row():
          steps = gr.Slider(1, min(200, max_steps), value=int(sc.steps), step=1,
                            label="DDIM steps", elem_id="steps")
          strength = gr.Slider(0.05, 1.0, value=float(sc.strength), step=0.05,
                               label="Strength (1: from noise; < 1: from the noised LR)",
                               elem_id="strength")
          seed = gr.Number(value=int(sc.seed), precision=0, minimum=0, maximum=MAX_SEED,
                           label="Seed", elem_id="seed")
        switches, temps = [], []
        with gr.Accordion("Modalities: switch and temperature", open=True):
          for g in CONTEXT_GROUPS:
            with gr.Row():
              switches.append(gr.Checkbox(value=True, label=f"use {g}", min_width=80, scale=1,
                                          elem_id=f"use-{g}"))
              temps.append(gr.Slider(*TEMPERATURE_RANGE, value=1.0, step=0.05, scale=4,
                                     label=f"{g} temperature", elem_id=f"temperature-{g}"))
        run = gr.Button("Super-resolve", variant="primary", elem_id="run")
        with gr.Accordion("Your own maps (optional; else extracted from the input)", open=False):
          user_maps = [gr.File(label=f"{k} map", file_types=list(image_io.SUFFIXES),
                               type="filepath", elem_id=f"map-{k}") for k in MODALITIES]
      with gr.Column(scale=3):
        slider = gr.ImageSlider(label="Before (bicubic) / after (MMSR): drag to compare",
                                type="pil", format="png", max_height=420, elem_id="compare")
        with gr.Row():
          bicubic = gr.Image(label="Bicubic", type="pil", format="png", interactive=False,
                             height=260, elem_id="bicubic")
          result = gr.Image(label="MMSR", type="pil", format="png", interactive=False,
                            height=260, elem_id="result")
        maps = gr.Gallery(label="Maps the model was given", format="png", columns=3,
                          height=220, elem_id="maps")
        caption_used = gr.Textbox(label="Caption the model was given", interactive=False,
                                  elem_id="caption-used")
        files = gr.File(label="Download: the PNG and its JSON sidecar", file_count="multiple",
                        interactive=False, elem_id="downloads")
        settings = gr.Code(label="Settings (the JSON sidecar)", language="json",
                           interactive=False, elem_id="sidecar")

    upload.change(on_upload, upload, [preview, info], concurrency_limit=4,
                  concurrency_id="upload")
    run.click(on_run, [upload, caption, negative, guidance, scale, steps, seed, strength,
                       *switches, *temps, *user_maps],
              [slider, bicubic, result, maps, caption_used, files, settings],
              concurrency_limit=1, concurrency_id="sample", show_progress_on=[slider])
  return demo


def serve(session: DemoSession, *, host: str = "127.0.0.1", port: int = 7860,
          share: bool = False, max_queue: int = 16, block: bool = True,
          user_errors: tuple = (ValueError,)):
  """Starts the page; requests beyond the one running wait in a queue of ``max_queue``.
  ``share`` asks Gradio for a public link (for a Colab runtime; never in tests)."""
  demo = build_demo(session, user_errors)
  demo.queue(max_size=max_queue, default_concurrency_limit=1)
  # Uploads may be at most 8 bytes per pixel of the limit (16-bit RGBA, uncompressed) + slack.
  demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
              allowed_paths=[session.output_dir], show_error=True,
              max_file_size=8 * session.max_pixels + 2 ** 24)
  return demo


def check_port_free(host: str, port: int) -> None:
  """ValueError when ``host:port`` cannot be served on (checked before the model loads)."""
  try:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
      s.bind((host, port))
  except OSError as e:
    raise ValueError(f"--host={host} --port={port}: cannot serve there ({e.strerror or e}); "
                     "pick another --port") from e
