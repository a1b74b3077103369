"""Model families behind one registry: ``create("ViT-B/16", num_classes=1000)``."""

from vit_jax.models import vit as _vit  # noqa: F401  (registers the ViT family)
from vit_jax.models.registry import create, describe, names, resolve

__all__ = ["create", "describe", "names", "resolve"]
