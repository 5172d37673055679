"""mmsr-jax: multimodal diffusion super-resolution (MMSR) in JAX/Flax."""

__version__ = "0.1.0"
