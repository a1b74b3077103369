"""Released checkpoints in and out of the models of ``vit_jax.models``; never imports TensorFlow.

    load_pretrained(model, path, *, format="auto", resample_posemb="zoom", load=(".*",), init=())
    export_npz(model, path, format="vit" | "big_vision", *, scan=False)
    infer_model(path) -> (ModelSpec, Checkpoint)   # which model a file holds (predict.py)

Read: the original ViT ``.npz`` (``npz_vit.py``), big_vision ``.npz`` including its scan layout
(``npz_big_vision.py``), timm names as ``.safetensors`` or torch state dicts
(``timm_names.py``; torch is imported only for torch files), and this library's orbax
checkpoints (``native.py``). Position embeddings are resampled to the model's grid
(``posemb.py``). Which parameters come from the file is the caller's choice: ``load`` and
``init`` are full-match regexes of per-layer model names; a parameter matching ``load`` and no
``init`` pattern is loaded, the others keep the model's initialisation (``init=["head/.*"]``: a
new head for other classes), and checkpoint arrays matching ``init`` are dropped
(``"pre_logits/.*"``: a representation layer the model lacks). Anything else that does not fit
raises ``CheckpointMismatchError`` listing every misshaped, missing and unexpected path and the
``init`` patterns that would accept them.

Extension point (other model families): add a module ``vit_jax/checkpoints/<family>.py``; it
is imported automatically (every module of this package is, on first use) and registers
  * ``mapping.register_family(Family(name, model_type=YourModel, layer_lists=..., posemb=...,
    head=..., infer=...))``: the model side;
  * ``mapping.register_format(Format(family=name, name="vit", rules=(...), detect=...,
    containers=("npz",), prepare=..., finish=...))``: one per checkpoint naming scheme, with
    ``Rule`` s mapping checkpoint templates to per-layer model templates (``rename`` for plain
    renames; ``load``/``save`` functions for reshapes, fused arrays, ...).
Rules are tried in order, so end with a catch-all ``rename("{name:*}", "{name:*}")``. The rule
tuples here are public (``npz_vit.RULES``, ...) to be reused: a hybrid's "vit" format is its
stem's rules plus ``npz_vit.RULES``. The model's own tree (unrolled or scanned blocks) is
handled by ``param_tree`` from ``Family.layer_lists``; converters never see it.
"""

from vit_jax.checkpoints.export import export_npz
from vit_jax.checkpoints.loading import CheckpointMismatchError, infer_model, load_pretrained
from vit_jax.checkpoints.mapping import Family, Format, ModelSpec, Rule, register_family, register_format, rename
from vit_jax.checkpoints.readers import CheckpointError, CheckpointNotFoundError

__all__ = ["load_pretrained", "export_npz", "infer_model", "CheckpointError", "CheckpointMismatchError",
           "CheckpointNotFoundError", "Family", "Format", "ModelSpec", "Rule", "register_family",
           "register_format", "rename"]
