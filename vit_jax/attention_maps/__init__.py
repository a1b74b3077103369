"""Looking inside the models: attention capture, rollout, the ViT paper's Figure 7, detection maps.

``capture`` (every attention layer's weights as arrays), ``rollout`` (Abnar & Zuidema's rollout
and Chefer et al.'s gradient-weighted variant), ``figure7`` (embedding filters, position
embedding similarity, mean attention distance), ``detection_maps`` (DETR's and YOLOS's queries),
``plots`` (the PNGs visualize.py writes).
"""
