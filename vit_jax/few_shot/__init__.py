"""Few-shot linear evaluation of a classifier's frozen pre-logits features (the ViT paper's).

``FewShotEvaluator(setup).run(state)`` evaluates a run's model on ``config.few_shot.datasets``
(``evaluator``); ``features`` computes the features on the run's mesh; ``solver`` is the
closed-form l2-regularised least squares. few_shot.py is the command line, and the trainer runs
it during training when ``config.few_shot.datasets`` is set.
"""

from vit_jax.few_shot.evaluator import (DatasetSpec, FewShotEvaluator, Result, as_json,
                                        check_options, evaluate, evaluate_features, format_table,
                                        metrics, parse_spec, subsets)

__all__ = ["DatasetSpec", "FewShotEvaluator", "Result", "as_json", "check_options", "evaluate",
           "evaluate_features", "format_table", "metrics", "parse_spec", "subsets"]
