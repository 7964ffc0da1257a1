"""Components for GRPO-family RL training of language models on TorchRL."""
