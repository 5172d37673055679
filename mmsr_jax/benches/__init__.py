"""One module per benchmark of ``python -m mmsr_jax.bench``."""
