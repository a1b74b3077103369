"""Model families behind one registry: ``create("ViT-B/16", num_classes=1000)``."""

from vit_jax.models import vit as _vit  # noqa: F401  (registers the ViT family)
from vit_jax.models import mixer as _mixer  # noqa: F401  (MLP-Mixer)
from vit_jax.models import resnet as _resnet  # noqa: F401  (BiT ResNets)
from vit_jax.models import tnt as _tnt  # noqa: F401  (Transformer iN Transformer)
from vit_jax.models import vit_hybrid as _vit_hybrid  # noqa: F401  (ResNet + ViT hybrids)
from vit_jax.models.registry import create, describe, names, resolve

__all__ = ["create", "describe", "names", "resolve"]
