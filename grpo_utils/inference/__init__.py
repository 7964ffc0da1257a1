"""Inference engines: what turns a batch of prompt ids into sampled completions.

``inference_model.backend`` picks one; both give the rollout the same thing (right-padded
response ids and, optionally, the sampler's own log-probs) and take new weights the same way:

* ``transformers`` (:mod:`.transformers`): TorchRL's ``TransformersWrapper`` around the training
  module itself (locally) or an actor's copy; weight sync is free where the module is shared.
* ``vllm`` (:mod:`.vllm_engine`): an in-process ``vllm.LLM`` (on the trainer's device, or on a Ray
  collector's own GPUs), loaded in place after each sync and checked by a log-prob probe.
"""

BACKENDS = ("transformers", "vllm")
