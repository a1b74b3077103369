"""Tiny hybrid, BiT, Mixer and TNT models trained from scratch on the embedded digits (8x8x1).

Everything but ``model`` is configs/default.py; ARG picks the family.

Run:     python train.py --config configs/families.py:hybrid --workdir workdirs/hybrid
         (ARG: hybrid | bit | mixer | tnt)
Reaches (top-1 on the 300 held-out digits after 2,000 steps; minutes on 2 busy CPU cores):
         hybrid 98.3% (4 min), bit 96.7% (1 min), mixer 98.7% (9 min), tnt 97.0% (4 min).
The full-size models are the registered names themselves ("R50+ViT-B/16", "BiT-R50x1",
"Mixer-B/16", "TNT-S/16", ...): set --config.model.name and the image size and data.
"""

import ml_collections

from configs import base, default

MODELS = {
    # ResNet root (7x7/2 conv, 3x3/2 pool) and one stage of one unit: a 2x2 map of 128 channels
    # of which every pixel is a token (patch size 1).
    "hybrid": dict(name="R+ViT-Ti/16", channels=1, resnet_layers=(1,), resnet_width=32,
                   gn_groups=8, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128),
    # Pre-activation ResNetV2 with two stages of one unit (outputs 128 and 256 channels).
    "bit": dict(name="BiT-R50x1", channels=1, layers=(1, 1), width=32, gn_groups=8),
    # 2x2 patches: 16 tokens.
    "mixer": dict(name="Mixer-S/2", channels=1, hidden_size=64, num_layers=4, tokens_mlp_dim=32,
                  channels_mlp_dim=128),
    # 4x4 patches (4 tokens), each embedded into 2x2 pixel tokens by a stride-2 conv.
    "tnt": dict(name="TNT-S/4", channels=1, hidden_size=64, inner_size=16, num_layers=4,
                num_heads=4, inner_heads=2, pixel_stride=2),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in MODELS:
    raise ValueError(f"configs/families.py takes one of {sorted(MODELS)} as ARG "
                     f"(configs/families.py:mixer), got {arg!r}")
  c = default.get_config()
  c.model = base.model_block(**MODELS[arg])
  return c
