"""Training: guard and causal-LM LoRA adapters from recipes (transformers.Trainer + peft)."""
