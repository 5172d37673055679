r"""A local web demo of controllable super-resolution for a trained run (Gradio).

  python -m mmsr_jax.app --workdir=runs/tiny [--port=7860] [--host=127.0.0.1]

Upload an image, set the caption, guidance, steps, seed, strength and each modality group's
switch and temperature (optionally give your own depth / seg / edge maps), and compare the x4
result with bicubic; every result is written to ``--output`` as a PNG with the JSON sidecar of
its settings, as ``python -m mmsr_jax.sample`` writes it. The weights are loaded once, the
sampler is compiled once per padded input size (``--bucket``), and requests are queued, one at
a time. Needs the optional packages of ``requirements-app.txt``. The work of a request is done
by :class:`mmsr_jax.inference.web_demo.DemoSession`, its page by ``mmsr_jax.inference.web_page``.
"""

from __future__ import annotations

import os
import tempfile

from absl import app, flags

from mmsr_jax import cli
from mmsr_jax.data import images as image_io
from mmsr_jax.inference.super_resolver import SuperResolver
from mmsr_jax.inference.web_demo import DEFAULT_BUCKET, DemoSession
from mmsr_jax.inference.web_page import check_port_free, import_gradio, serve
from mmsr_jax.runtime import checkpoint as ckpt_lib
from mmsr_jax.schema.sr import TEXT_DEVICES


def define_flags() -> None:
  d = flags
  d.DEFINE_string("workdir", None, "Training run directory (config + checkpoints).")
  d.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  d.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0: every interface).")
  d.DEFINE_integer("port", 7860, "Port to serve on.")
  d.DEFINE_string("output", None, "Folder for the results and their JSON sidecars (default: a "
                  "new temporary folder, printed at start).")
  d.DEFINE_integer("max_pixels", None, "Largest input image (pixels, checked from the file's "
                   "header before decoding; default: the run's config.sampling.max_input_pixels).")
  cli.define_work_limit_flags()
  d.DEFINE_integer("bucket", DEFAULT_BUCKET, "Pad the LR sides to a multiple of this many "
                   "pixels, so that images of similar size share one compiled sampler (0: pad "
                   "only to the model's multiple).")
  d.DEFINE_integer("max_queue", 16, "Requests that may wait while one runs.")
  d.DEFINE_bool("share", False, "Ask Gradio for a public share link (e.g. on Colab).")
  cli.define_annotator_flags()
  d.DEFINE_enum("text_device", None, list(TEXT_DEVICES), "Where the text encoder runs (see "
                "python -m mmsr_jax.sample --help).")


def main(argv):
  del argv
  F = flags.FLAGS
  if not F.workdir:
    raise app.UsageError("--workdir is required")
  import_gradio()  # a missing extra is an error before the model is loaded
  if not 0 < F.port < 65536:
    raise ValueError(f"--port={F.port}: expected 1..65535")
  if F.bucket < 0:
    raise ValueError(f"--bucket={F.bucket}: expected >= 0")
  if F.max_pixels is not None:
    image_io.check_limit(F.max_pixels, "--max_pixels")
  if F.output and os.path.exists(F.output) and not os.path.isdir(F.output):
    raise NotADirectoryError(f"--output={F.output} exists and is not a folder")
  check_port_free(F.host, F.port)
  run_config = ckpt_lib.load_config(F.workdir)  # fails early on a folder that is not a run
  cli.work_limits(run_config, F.max_pixels)  # bad limits fail before the model loads
  if F.output:
    cli.lock_if_inside(F.workdir, F.output, "the web demo writing into the run")
  annotator = cli.annotator_from_flags()
  sr = SuperResolver.from_workdir(F.workdir, step=F.step, text_device=F.text_device,
                                  max_input_pixels=F.max_pixels, max_tiles=F.max_tiles,
                                  max_aspect_ratio=F.max_aspect_ratio)
  output = F.output or tempfile.mkdtemp(prefix="mmsr_app_")
  session = DemoSession(sr, output, annotator=annotator, max_pixels=F.max_pixels,
                        bucket=F.bucket or None)
  print(f"results and sidecars go to {session.output_dir}", flush=True)
  serve(session, host=F.host, port=F.port, share=F.share, max_queue=F.max_queue,
        user_errors=cli.USER_ERRORS)


if __name__ == "__main__":
  cli.run(main, define_flags)
