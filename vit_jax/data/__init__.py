"""Input data for vit_jax: datasets, preprocessing ops and deterministic, exactly resumable batches.

Importing this package does not import TensorFlow; the functions below import it on first use.
"""

from vit_jax.data.pipeline import eval_batches, num_eval_batches, train_batches
from vit_jax.data.preprocess_ops import get_op, parse_pp, register
from vit_jax.data.sources import DatasetInfo, dataset_info

__all__ = ["DatasetInfo", "dataset_info", "train_batches", "eval_batches", "num_eval_batches", "parse_pp",
           "register", "get_op"]
