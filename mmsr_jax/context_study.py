r"""The context experiment's evaluation: every run under every condition setting, both samplers,
mean and spread over seeds (docs/context_experiment.md).

  python -m mmsr_jax.context_study --runs=RUN1,RUN2,... --output=DIR [--figure=PNG]
  python -m mmsr_jax.context_study --runs=RUN1,RUN2,... --output=DIR --x0_by_step
  python -m mmsr_jax.context_study --runs=RUN1,RUN2,... --output=DIR --sensitivity
"""

from __future__ import annotations

from absl import flags

from mmsr_jax import cli
from mmsr_jax.training.context_ablation import context_sensitivity, run_study, x0_by_step


def define_flags() -> None:
  flags.DEFINE_list("runs", None, "trained runs (workdirs): any mix of maps_from 'hr' / 'lr' "
                    "and seeds, one run per (maps_from, seed)")
  flags.DEFINE_string("output", None, "folder for context_study.json and table.md")
  flags.DEFINE_string("figure", None, "write the figure (bicubic | no context | LR maps | "
                      "oracle maps | HR) here as PNG")
  flags.DEFINE_integer("images", 24, "held-out photos sampled (the x0 error uses all of them)")
  flags.DEFINE_integer("paper_steps", 20, "DDIM steps of the paper's sampler (strength 1)")
  flags.DEFINE_bool("x0_by_step", False, "instead: the x0 error at T-1 with all context and "
                    "none at every checkpoint the runs keep (x0_by_step.json / .png)")
  flags.DEFINE_bool("sensitivity", False, "instead: how much each run's newest checkpoint "
                    "changes its context and output when the conditions are nulled or swapped "
                    "between tiles, beside the x0 error of predicting 0 (sensitivity.json)")
  flags.DEFINE_bool("overwrite", False, "replace existing outputs")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  if not f.runs or not f.output:
    raise ValueError("give --runs=RUN1,RUN2,... and --output=DIR")
  if f.images < 1 or f.paper_steps < 1:
    raise ValueError("--images and --paper_steps must be >= 1")
  if f.sensitivity:
    context_sensitivity(f.runs, f.output, overwrite=f.overwrite, photos=f.images)
    return
  if f.x0_by_step:
    x0_by_step(f.runs, f.output, overwrite=f.overwrite)
    return
  run_study(f.runs, f.output, images=f.images, paper_steps=f.paper_steps,
            figure_path=f.figure, overwrite=f.overwrite)


if __name__ == "__main__":
  cli.run(main, define_flags)
