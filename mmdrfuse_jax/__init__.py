"""mmdrfuse_jax: a JAX/Flax reimplementation of MMDRFuse (ACM MM 2024)."""

__version__ = "0.1.0"
