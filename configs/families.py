"""Tiny hybrid, BiT, Mixer and TNT models trained from scratch on the embedded digits (8x8x1).

Everything but ``model`` (and the learning rate) is configs/default.py; ARG picks the family.

Run:     python train.py --config configs/families.py:hybrid --workdir workdirs/hybrid
         (ARG: hybrid | bit | mixer | tnt)
Reaches (top-1 on the 300 held-out digits after 3,000 steps, 2 CPU cores):
         hybrid RESULT_HYBRID, bit RESULT_BIT, mixer RESULT_MIXER, tnt RESULT_TNT.
The full-size models are the registered names themselves ("R50+ViT-B/16", "BiT-R50x1",
"Mixer-B/16", "TNT-S/16", ...): set --config.model.name and the image size and data.
"""

import ml_collections

from configs import default

MODELS = {
    # ResNet root (7x7/2 conv, 3x3/2 pool) and one stage of one unit: a 2x2 map of 64 channels
    # of which every pixel is a token (patch size 1).
    "hybrid": dict(name="R+ViT-Ti/16", channels=1, resnet_layers=(1,), resnet_width=16,
                   gn_groups=8, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128),
    # Pre-activation ResNetV2 with two stages of one unit (widths 64, 128).
    "bit": dict(name="BiT-R50x1", channels=1, layers=(1, 1), width=16, gn_groups=8),
    # 2x2 patches: 16 tokens.
    "mixer": dict(name="Mixer-S/2", channels=1, hidden_size=64, num_layers=4, tokens_mlp_dim=32,
                  channels_mlp_dim=128),
    # 2x2 patches (16 tokens), each embedded into 2x2 pixel tokens by a stride-1 conv.
    "tnt": dict(name="TNT-S/2", channels=1, hidden_size=64, inner_size=16, num_layers=4,
                num_heads=4, inner_heads=2, pixel_stride=1),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in MODELS:
    raise ValueError(f"configs/families.py takes one of {sorted(MODELS)} as ARG "
                     f"(configs/families.py:mixer), got {arg!r}")
  c = default.get_config()
  c.model = ml_collections.ConfigDict(MODELS[arg])
  return c
