"""Model-independent parts of set-prediction detectors (DETR, YOLOS): box ops, Hungarian
matching, the set criterion and post-processing.

Models return ``{"logits" [B, Q, C+1], "boxes" [B, Q, 4]}`` (normalised cxcywh; DETR also
``aux_logits``/``aux_boxes`` [L-1, B, Q, ...]); targets are fixed-shape padded
``{"labels" [B, M], "boxes" [B, M, 4], "box_mask" [B, M]}``.
"""

from vit_jax.detection.boxes import (box_area, box_iou, cxcywh_to_xyxy, generalized_box_iou,
                                     paired_generalized_box_iou, xyxy_to_cxcywh)
from vit_jax.detection.matching import linear_sum_assignment, match, matching_cost
from vit_jax.detection.postprocess import postprocess, select_detections
from vit_jax.detection.set_loss import (SetLossConfig, check_labels, match_layers, objective,
                                        set_loss)

__all__ = ["SetLossConfig", "box_area", "box_iou", "check_labels", "cxcywh_to_xyxy",
           "generalized_box_iou", "linear_sum_assignment", "match", "match_layers",
           "matching_cost", "objective", "paired_generalized_box_iou", "postprocess",
           "select_detections", "set_loss", "xyxy_to_cxcywh"]
