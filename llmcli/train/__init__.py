"""Training: pretraining (the loop, runs, resume) and fine-tuning (instructions, classification, LoRA)."""
