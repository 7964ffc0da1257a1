"""GRPO from a script: the quick-start task through the Python API (CPU, under a minute).

    .venv/bin/python examples/api_quickstart.py [output_dir]

A tiny Qwen2 (built locally once, nothing downloaded) learns to name the largest of five digits,
rewarded by a plain Python function. The run directory gets metrics.jsonl, checkpoint-<N>/,
final_model/ and summary.json, as a recipe run does.
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_utils import GRPOConfig, GRPOTrainer, SimplePromptDataset
from grpo_utils.data.datasets import quickstart_rows
from grpo_utils.models.quickstart import ensure_quickstart_model


def exact_answer(prompts, completions, answer, **columns):
    """1 when the completion is the reference answer (each row field arrives as a list)."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def main(output_dir: str) -> None:
    path = ensure_quickstart_model()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = quickstart_rows(2000, seed=1)
    heldout = quickstart_rows(100, seed=2)
    config = GRPOConfig(batch_size=8, num_generations_per_prompt=8, max_new_tokens=4, learning_rate=2e-3,
                        max_steps=40, warmup_steps=5, save_steps=20, output_dir=output_dir)
    trainer = GRPOTrainer(
        model=model, tokenizer=tokenizer, config=config,
        train_dataset=SimplePromptDataset([r["question"] for r in train], answers=[r["answer"] for r in train]),
        eval_dataset=heldout, reward=exact_answer)
    summary = trainer.train()
    print(f"held-out accuracy {summary['heldout_accuracy_before']:.2f} -> {summary['heldout_accuracy_after']:.2f}; "
          f"final model in {output_dir}/final_model")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "grpo_output")
