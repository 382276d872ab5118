"""Training: fine-tuning recipes (full and LoRA) for task models (:mod:`sparsemerge.train.finetune`)."""
