"""The KL reference: where it lives (``ref_model.device``/``num_devices``, the device plan), what
it is (a copy of the initial policy, an in-memory model, or ``ref_model.path``), and that scoring
with it gives the same values wherever it is placed."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from grpo_utils import build
from grpo_utils.algo.logprobs import batch_log_probs, response_log_probs
from grpo_utils.algo.losses import BatchNormalizer, ClippedSurrogateLoss
from grpo_utils.config.cli import compose_jobs
from grpo_utils.distributed.resources import check_devices, collector_gpu_ids, plan_resources, reference_device
from grpo_utils.errors import ConfigError
from grpo_utils.models.tiny import save_tiny
from grpo_utils.train.run import check_run
from grpo_utils.train.trainer import PolicyTrainer
from tests.helpers import CONFIG, run_recipe, train_cfg, train_lines

CPU = torch.device("cpu")


def cfg_of(line: str, mode: str = "sync"):
    (cfg,) = compose_jobs(line.split(), CONFIG, "grpo_quickstart", mode)
    return cfg


def check(line: str, gpus: int = 0, mode: str = "sync"):
    return check_run(cfg_of(line, mode), mode, available_gpus=gpus)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """A second tiny model with the same vocabulary as ``tiny_dir`` but other weights (seed 1)."""
    return save_tiny(tmp_path_factory.mktemp("other") / "model", hidden_size=32, num_layers=1, seed=1)


@pytest.fixture(scope="module")
def policy(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def scored_batch(seed: int = 0, size: int = 6, prompt: int = 5, response: int = 4) -> TensorDict:
    """Random token ids with left-padded prompts and ragged responses, as a rollout leaves them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 257, (size, prompt + response), generator=g)
    attention = torch.ones_like(ids)
    response_mask = torch.ones(size, response, dtype=torch.bool)
    for i in range(size):
        attention[i, : i % 3] = 0  # left padding of the prompt
        response_mask[i, response - i % 2:] = False  # a shorter response
        attention[i, prompt:][~response_mask[i]] = 0
    advantage = torch.randn(size, generator=g)
    return TensorDict({"input_ids": ids, "attention_mask": attention, "response_mask": response_mask,
                       "advantage": advantage}, batch_size=[size])


def kl_metric(policy, batch: TensorDict, kl_coef: float = 0.1) -> float:
    """The loss's ``kl_ref`` metric for ``batch`` (annotated with ``ref_log_probs``) under ``policy``."""
    start = batch["input_ids"].shape[1] - batch["response_mask"].shape[1]
    log_probs, _ = response_log_probs(policy, batch["input_ids"], batch["attention_mask"], start)
    mask = batch["response_mask"]
    out = ClippedSurrogateLoss(kl_coef=kl_coef)(log_probs, log_probs.detach(), batch["advantage"], mask,
                                                ref_log_probs=batch["ref_log_probs"],
                                                normalizer=BatchNormalizer.from_mask(mask))
    return float(out.metrics["kl_ref"])


def annotated(policy, ref, batch: TensorDict) -> TensorDict:
    trainer = PolicyTrainer(policy, ClippedSurrogateLoss(kl_coef=0.1), train_cfg(), temperature=1.0, ref_model=ref)
    batch = batch.clone()
    trainer.annotate(batch, need_behaviour=False, micro_batch_size=4)
    return batch


# -------------------------------------------------------------------------------- scoring
def test_reference_placed_with_ref_model_device_scores_as_the_colocated_one(policy):
    colocated = build.reference(cfg_of("loss.kl_coef=0.1"), policy, CPU)
    placed = build.reference(cfg_of("loss.kl_coef=0.1 ref_model.device=cpu"), policy, CPU)
    assert placed is not colocated and placed is not policy
    assert placed.model.embed_tokens.weight.data_ptr() != policy.model.embed_tokens.weight.data_ptr()
    assert not any(p.requires_grad for p in placed.parameters()) and not placed.training
    batch = scored_batch()
    a, b = annotated(policy, colocated, batch), annotated(policy, placed, batch)
    assert torch.equal(a["ref_log_probs"], b["ref_log_probs"])
    assert kl_metric(policy, a) == kl_metric(policy, b) == 0.0  # the initial policy is its own reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_reference_on_another_device_than_the_batch(policy):
    """Trainer on the GPU, reference on the CPU: inputs go to the reference, results come back."""
    gpu = torch.device("cuda", 0)
    on_gpu = build.reference(cfg_of("loss.kl_coef=0.1"), policy, gpu)
    on_cpu = build.reference(cfg_of("loss.kl_coef=0.1 ref_model.device=cpu"), policy, gpu)
    assert next(on_cpu.parameters()).device == CPU and next(on_gpu.parameters()).device == gpu
    trained = policy.to(gpu)
    try:
        batch = scored_batch().to(gpu)
        a, b = annotated(trained, on_gpu, batch), annotated(trained, on_cpu, batch)
        assert b["ref_log_probs"].device == gpu
        torch.testing.assert_close(a["ref_log_probs"], b["ref_log_probs"], atol=1e-4, rtol=1e-4)
        assert kl_metric(trained, b) == pytest.approx(kl_metric(trained, a), abs=1e-5)
    finally:
        policy.to(CPU)


def test_ref_model_path_loads_that_model_as_the_reference(policy, other_dir):
    from transformers import AutoModelForCausalLM

    ref = build.reference(cfg_of(f"loss.kl_coef=0.1 ref_model.path={other_dir}"), policy, CPU)
    assert ref.dtype == torch.float32 and not ref.training
    batch = scored_batch()
    from_path = annotated(policy, ref, batch)["ref_log_probs"]
    copied = annotated(policy, build.reference(cfg_of("loss.kl_coef=0.1"), policy, CPU), batch)["ref_log_probs"]
    mask = batch["response_mask"]
    assert not torch.allclose(from_path[mask], copied[mask])
    own = AutoModelForCausalLM.from_pretrained(other_dir).eval()
    assert torch.equal(from_path, batch_log_probs(own, batch, 1.0, micro_batch_size=4))
    with_kl = annotated(policy, ref, batch)
    assert kl_metric(policy, with_kl) > 0.0


def test_ref_model_path_is_loaded_in_model_dtype(policy, other_dir):
    ref = build.reference(cfg_of(f"loss.kl_coef=0.1 model.dtype=bfloat16 ref_model.path={other_dir}"), policy, CPU)
    assert ref.dtype == torch.bfloat16


def test_ref_model_path_with_another_vocabulary_is_one_line(policy, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    wider = AutoModelForCausalLM.from_pretrained(tiny_dir)
    wider.resize_token_embeddings(300)
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(ConfigError, match=rf"^ref_model.path={tmp_path / 'wider'} has vocab_size=300 but the policy "
                                          r"\(model.name=builtin:quickstart\) has vocab_size=259; the reference "
                                          r"must share the policy's vocabulary$"):
        build.reference(cfg_of(f"loss.kl_coef=0.1 ref_model.path={tmp_path / 'wider'}"), policy, CPU)


def test_in_memory_reference_and_ref_model_path_exclude_each_other(policy, other_dir, tmp_path):
    from grpo_utils.train.loop import GRPOLoop

    cfg = cfg_of(f"loss.kl_coef=0.1 ref_model.path={other_dir}")
    message = rf"^ref_model.path={other_dir} and an in-memory ref_model= are both given; pass one$"
    with pytest.raises(ConfigError, match=message):
        build.reference(cfg, policy, CPU, given=policy)
    loop = GRPOLoop(cfg, "sync", tmp_path, ref_model=policy)
    with pytest.raises(ConfigError, match=message):
        loop.setup()  # before the policy loads
    assert not hasattr(loop, "model")
    given = build.reference(cfg_of("loss.kl_coef=0.1 ref_model.device=cpu"), policy, CPU, given=policy)
    assert given is not policy and torch.equal(given.lm_head.weight, policy.lm_head.weight)


# -------------------------------------------------------------------------------- device plan
def test_reference_device_comes_after_the_trainer_and_the_inference_gpus():
    cfg = cfg_of("mode=async mode.cluster_cpus=8 loss.kl_coef=0.1 ref_model.num_devices=1 "
                 "inference_model.num_devices=2", "async")
    gpu0 = torch.device("cuda", 0)
    assert reference_device(cfg, gpu0, available_gpus=4) == torch.device("cuda", 3)
    check_devices(cfg, gpu0, available_gpus=4)
    plan = plan_resources(cfg, gpu0, available_gpus=4)
    assert plan.reference_gpu == 3
    assert collector_gpu_ids(plan.trainer_device_index, 4, plan.reference_gpu) == ["1", "2"]
    # the trainer on cuda:2: the others in order of index, the collectors' first
    assert reference_device(cfg, torch.device("cuda", 2), available_gpus=4) == torch.device("cuda", 3)
    assert collector_gpu_ids(2, 4, 3) == ["0", "1"]
    # a trainer on the CPU takes no GPU
    assert reference_device(cfg, CPU, available_gpus=3) == torch.device("cuda", 2)
    with pytest.raises(ValueError, match=r"^not enough GPUs: train_model.num_devices=1 \+ ref_model.num_devices=1 "
                                         r"\+ inference_model.num_devices=2 = 4 GPUs, but the machine has 3 "
                                         r"\(short by 1\)$"):
        check_devices(cfg, gpu0, available_gpus=3)
    with pytest.raises(ValueError, match=r"^not enough GPUs: trainer 1 \+ inference_model.num_devices=2 \+ "
                                         r"ref_model.num_devices=1 = 4 GPUs, but the machine has 3 \(short by 1\)$"):
        reference_device(cfg, gpu0, available_gpus=3)


def test_reference_device_defaults_and_explicit_devices():
    assert reference_device(cfg_of("loss.kl_coef=0.1"), CPU, available_gpus=0) == CPU
    gpu1 = torch.device("cuda", 1)
    assert reference_device(cfg_of("loss.kl_coef=0.1"), gpu1, available_gpus=2) == gpu1
    assert reference_device(cfg_of("loss.kl_coef=0.1 ref_model.num_devices=1"), CPU, available_gpus=1) == \
        torch.device("cuda", 0)
    explicit = cfg_of("loss.kl_coef=0.1 ref_model.device=cuda:1")
    assert reference_device(explicit, CPU, available_gpus=2) == gpu1
    with pytest.raises(ValueError, match=r"^ref_model.device=cuda:1 but the machine has 1 GPU\(s\) "
                                         r"\(cuda:0 .. cuda:0\)$"):
        reference_device(explicit, CPU, available_gpus=1)


def test_check_run_places_the_reference_before_any_model_loads():
    check("loss.kl_coef=0.1 ref_model.num_devices=1", gpus=1)  # TorchRL's layout runs
    check("loss.kl_coef=0.1 ref_model.device=cpu", gpus=0)
    with pytest.raises(ConfigError, match=r"^not enough GPUs: ref_model.num_devices=1 = 1 GPUs, but the machine "
                                          r"has 0 \(short by 1\)$"):
        check("loss.kl_coef=0.1 ref_model.num_devices=1", gpus=0)
    with pytest.raises(ConfigError, match=r"^ref_model.device=cuda:3 but the machine has 2 GPU\(s\) "
                                          r"\(cuda:0 .. cuda:1\)$"):
        check("loss.kl_coef=0.1 ref_model.device=cuda:3", gpus=2)
    with pytest.raises(ConfigError, match=r"^ref_model.device=cuda but the machine has 0 GPU\(s\) \(none\)$"):
        check("loss.kl_coef=0.1 ref_model.device=cuda", gpus=0)


# -------------------------------------------------------------------------------- config errors
REF_ERRORS = [
    ("ref_model.path=some/model", 0, r"^ref_model.path=some/model but no reference model is loaded \(loss.kl_coef=0\)$"),
    ("ref_model.device=cpu", 0, r"^ref_model.device=cpu but no reference model is loaded \(loss.kl_coef=0\)$"),
    ("ref_model.num_devices=1", 1, r"^ref_model.num_devices=1 but no reference model is loaded \(loss.kl_coef=0\)$"),
    ("loss.kl_coef=0.1 ref_model.num_devices=2", 8,
     r"^ref_model.num_devices=2: a reference over several devices is not supported \(it only runs forward passes\); "
     r"use ref_model.num_devices=1$"),
    ("loss.kl_coef=0.1 ref_model.num_devices=1 ref_model.device=cpu", 8,
     r"^ref_model.device=cpu and ref_model.num_devices=1 are both set; set one"),
    ("loss.kl_coef=0.1 ref_model.device=mps", 0,
     r"^ref_model.device='mps' is not supported; expected null, cpu, cuda or cuda:N$"),
    ("loss.kl_coef=0.1 ref_model.device=gpu0", 0,
     r"^ref_model.device='gpu0' is not supported; expected null, cpu, cuda or cuda:N$"),
    ("loss.kl_coef=0.1 ref_model.path=/nonexistent/model", 0,
     r"^ref_model.path=/nonexistent/model: no such directory; expected a local model directory or a hub name"),
    ("loss.kl_coef=0.1 ref_model.path=builtin:tiny", 0,
     r"^ref_model.path='builtin:tiny' is unknown; the only builtin is 'builtin:quickstart'$"),
]


@pytest.mark.parametrize(("line", "gpus", "message"), REF_ERRORS, ids=[line for line, _, _ in REF_ERRORS])
def test_ref_model_settings_are_one_line_errors(line, gpus, message):
    with pytest.raises(ConfigError, match=message) as info:
        check(line, gpus=gpus)
    assert "\n" not in info.value.one_line()


def test_ref_model_path_must_be_a_model_directory(tmp_path):
    with pytest.raises(ConfigError, match=rf"^ref_model.path={tmp_path} is a directory without config.json"):
        check(f"loss.kl_coef=0.1 ref_model.path={tmp_path}")


# -------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_recipe_with_ref_model_path_logs_kl_from_the_first_step(env, tiny_dir, other_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_recipe(env, f"model.name={tiny_dir}", f"hydra.run.dir={run_dir}", "env.num_prompts=2", "env.group_size=4",
               "train.optim_batch_size=8", "generation.max_new_tokens=6", "eval.heldout_size=4",
               "eval.every_n_steps=0", "train.max_steps=2", "loss.kl_coef=0.1", f"ref_model.path={other_dir}",
               "ref_model.device=cpu")
    lines = train_lines(run_dir)
    assert [r["step"] for r in lines] == [1, 2]
    assert lines[0]["kl_ref"] > 0.01  # with the initial policy as the reference it would be 0 here
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").ref_model.path == str(other_dir)


@pytest.mark.slow
def test_api_in_memory_reference_is_placed_and_scored(tiny_dir, other_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_utils import GRPOConfig, GRPOTrainer
    from grpo_utils.data.datasets import quickstart_rows

    def trainer(out, *overrides):
        config = GRPOConfig(output_dir=str(out), batch_size=2, num_generations_per_prompt=4, max_new_tokens=6,
                            max_steps=1, kl_coef=0.1, seed=3, overrides=["num_threads=1", *overrides])
        return GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir),
                           tokenizer=AutoTokenizer.from_pretrained(tiny_dir), config=config,
                           train_dataset=quickstart_rows(8, seed=1), reward="numeric_answer",
                           ref_model=AutoModelForCausalLM.from_pretrained(other_dir))

    run = trainer(tmp_path / "placed", "ref_model.device=cpu")
    run.train()
    (line,) = [r for r in run.history if "reward/mean" in r]
    assert line["kl_ref"] > 0.01  # the given model, not a copy of the policy, is the reference
    with pytest.raises(ConfigError, match=rf"^ref_model.path={other_dir} and an in-memory ref_model= are both "
                                          r"given; pass one$"):
        trainer(tmp_path / "both", f"ref_model.path={other_dir}").train()
