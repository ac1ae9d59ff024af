"""Recovery fine-tuning: low-rank adapters trained on top of the quantized model (issue 15)."""
