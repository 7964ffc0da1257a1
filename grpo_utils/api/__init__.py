"""The Python API: train from a script or a notebook on the same loop as the recipes.

    from grpo_utils import GRPOConfig, GRPOTrainer, SimplePromptDataset
    trainer = GRPOTrainer(model=model, tokenizer=tokenizer, reward_model=reward_model,
                          config=GRPOConfig(batch_size=4, learning_rate=1e-6, output_dir="out"),
                          train_dataset=SimplePromptDataset(prompts))
    trainer.train()
"""

from grpo_utils.api.config import GRPOConfig
from grpo_utils.api.data import SimplePromptDataset
from grpo_utils.api.trainer import GRPOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer", "SimplePromptDataset"]
