"""Model families behind one registry: ``create("ViT-B/16", num_classes=1000)``.

Every module of this package is imported here, so a family registers itself (one
``registry.register_family`` call in its file) with no edit anywhere else.
"""

import importlib
import pkgutil

from vit_jax.models.registry import create, describe, families, names, options, resolve

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["create", "describe", "families", "names", "options", "resolve"]
