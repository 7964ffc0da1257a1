"""``python -m grpo_utils.config``: every config key with its type, default and doc."""

from grpo_utils.config.schema import (
    AsyncModeConfig,
    EvalRunConfig,
    GRPOConfig,
    LoggerConfig,
    RolloutConfig,
    SyncModeConfig,
    describe,
)

print("\n".join(describe(GRPOConfig)))
for name, cls in (("mode (mode=sync)", SyncModeConfig), ("mode (mode=async)", AsyncModeConfig),
                  ("logger", LoggerConfig), ("rollout", RolloutConfig)):
    print(f"{name}:")
    print("\n".join("  " + line for line in describe(cls)))
print("loss: the keys of the preset's class (loss._target_); see config/loss/ and grpo_utils/algo/losses.py")
print("\ngrpo-eval.py (config/grpo_eval.yaml):")
print("\n".join("  " + line for line in describe(EvalRunConfig)))
