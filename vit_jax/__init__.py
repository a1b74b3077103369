"""vit_jax: Vision Transformers in JAX/Flax NNX, from one CPU to a pod."""

__version__ = "0.1.0"
