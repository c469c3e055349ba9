"""fastkd inside other trainers. Each submodule imports its optional dependency and nothing below it imports them:

- :mod:`fastkd.integrations.transformers`: ``DistillationTrainer``, a Hugging Face ``Trainer`` that distils
  (``pip install fastkd[hf]``).
- :mod:`fastkd.integrations.trl`: ``generalized_jsd_loss``, TRL's GKD divergence on fastkd's kernels
  (``pip install fastkd[trl]``; the function itself imports nothing from TRL).
- :mod:`fastkd.integrations.lightning`: ``DistillationModule``, a ``LightningModule`` around a Distiller
  (``pip install fastkd[lightning]``).
"""
