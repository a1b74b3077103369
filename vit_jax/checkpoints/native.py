"""This library's own checkpoints (the trainer's orbax step directories), for every family.

Their names are the model's own parameter paths, so the mapping is the identity; blocks saved
by a ``scan=True`` model are stacked and are split per layer by the loader.
"""

from __future__ import annotations

from vit_jax.checkpoints.mapping import Format, register_format, rename

register_format(Format(family="*", name="vit_jax", rules=(rename("{name:*}", "{name:*}"),),
                       detect=lambda keys: True, containers=("orbax",)))
