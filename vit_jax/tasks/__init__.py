"""Tasks: everything task-specific (model, loss, metrics, evaluator, batch format, data).

``create(config)`` builds the task named by ``config.task``. A task is one module in this
package that calls ``register(name, cls)``; every module here is imported on first use.
"""

from vit_jax.tasks.base import Evaluator, LossTerms, SumEvaluator, Task, create, names, register

__all__ = ["Evaluator", "LossTerms", "SumEvaluator", "Task", "create", "names", "register"]
