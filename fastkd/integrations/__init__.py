"""fastkd inside other trainers. Each submodule imports its optional dependency and nothing below it imports them:

- :mod:`fastkd.integrations.transformers`: ``DistillationTrainer``, a Hugging Face ``Trainer`` that distils
  (``pip install fastkd[hf]``).
"""
