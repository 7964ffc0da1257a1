"""Weight sync strategies (object store and collective broadcast) with real Ray actors on CPU."""

from __future__ import annotations

import socket
import sys
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from grpo_utils.distributed.weight_sync import (  # noqa: E402
    CollectiveWeightSync,
    CollectorDiedError,
    ObjectStoreWeightSync,
    WeightSyncError,
    _choose_backend,
    _plan,
    _unpack,
    make_weight_sync,
)

KINDS = ("object_store", "collective")
# The actors cannot import this test module: ship its classes and functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def make_model(seed: int, out: int = 3) -> torch.nn.Module:
    """A small MLP with the dtypes a real policy carries: float32 and bf16 weights, an int64 buffer,
    a bool buffer and a 0-dim buffer."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, out))
    model.append(torch.nn.Linear(out, 2).to(torch.bfloat16))
    model.register_buffer("steps", torch.arange(5, dtype=torch.int64) + seed)
    model.register_buffer("mask", torch.rand(7) > 0.5)
    model.register_buffer("scale", torch.tensor(float(seed)))
    return model


@ray.remote(num_cpus=0, max_concurrency=2)
class StandInCollector:
    """The collector's side of the weight-sync protocol, with a model instead of a rollout loop."""

    def __init__(self, receiver, seed: int):
        import tensordict

        tensordict.set_list_to_stack(True).set()
        torch.set_num_threads(1)
        self.model = make_model(seed)
        self.receiver = receiver
        self.version = -1
        self.received: dict[int, dict[str, torch.Tensor]] = {}

    def set_receiver(self, receiver, seed: int | None = None) -> None:
        """Swap in another strategy's receiver (as a freshly built actor would get in its constructor)."""
        if self.receiver is not None:
            self.receiver.close()
        self.receiver = receiver
        if seed is not None:
            self.model = make_model(seed)
        self.version = -1

    def connect_weight_sync(self) -> None:
        if self.receiver is not None:  # None: an actor that never joins (timeout test)
            self.receiver.connect(self.model)

    def update_weights(self, payload, version: int) -> None:
        state = self.receiver.receive(payload)
        self.received[version] = state  # kept as handed over: a later receive must not overwrite it
        self.model.load_state_dict(state)
        self.version = version

    def get_weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        return self.version, {k: v.clone() for k, v in self.model.state_dict().items()}

    def get_received(self, version: int) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.received[version].items()}


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def actors(ray_cluster):
    # The constructor path the real collectors use: the receiver is pickled into the actor.
    sync = ObjectStoreWeightSync()
    handles = [StandInCollector.remote(sync.receiver(i), seed=100 + i) for i in range(2)]
    ray.get([a.get_weights.remote() for a in handles])
    return handles


def attach(kind: str, actors: list, seed: int = 100, **kwargs):
    """A new strategy of ``kind`` (made as the recipes make it), its receivers installed in the actors, connected."""
    sync = make_weight_sync(kind, num_receivers=len(actors), device=torch.device("cpu"), **kwargs)
    ray.get([a.set_receiver.remote(sync.receiver(i), seed + i) for i, a in enumerate(actors)])
    sync.connect(actors)
    return sync


def weights_of(actor, version: int, timeout: float = 20.0) -> dict[str, torch.Tensor]:
    """The actor's weights once it has loaded ``version`` (object-store pushes are fire and forget)."""
    deadline = time.monotonic() + timeout
    while True:
        got, state = ray.get(actor.get_weights.remote())
        if got == version:
            return state
        assert time.monotonic() < deadline, f"actor still at version {got}, expected {version}"
        time.sleep(0.02)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@torch.no_grad()
def edit(model: torch.nn.Module, delta: float) -> None:
    """Change every entry in place (as an optimiser step would), buffers included."""
    for v in model.state_dict().values():
        if v.dtype == torch.bool:
            v.logical_not_()
        else:
            v.add_(delta if v.is_floating_point() else 1)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("kind", KINDS)
def test_push_reaches_every_actor(actors, kind):
    # Small buckets: the collective path packs many buckets, mixed dtypes and unaligned sizes.
    sync = attach(kind, actors, **({"bucket_bytes": 96} if kind == "collective" else {}))
    try:
        if kind == "collective":
            assert sync.active_backend == "gloo"  # negotiated: CPU weights
        trainer = make_model(seed=7)
        assert not torch.equal(weights_of(actors[0], -1)["0.weight"], trainer.state_dict()["0.weight"])

        first = snapshot(trainer)
        sync.push(trainer, 1, actors)
        for a in actors:
            assert_same(weights_of(a, 1), first)

        edit(trainer, 0.5)
        second = snapshot(trainer)
        sync.push(trainer, 2, actors)
        edit(trainer, 100.0)  # right after the push: what was sent must not follow the trainer
        for a in actors:
            assert_same(weights_of(a, 2), second)
            # The first receive's dict was not overwritten by the second one.
            assert_same(ray.get(a.get_received.remote(1)), first)
        edit(trainer, 1.0)
        assert_same(weights_of(actors[1], 2), second)
    finally:
        sync.close()


def test_unknown_kind_is_one_line_error():
    with pytest.raises(ValueError, match=r"^mode\.weight_sync='nccl_p2p' is unknown; expected one of object_store, collective, or the dotted path of a WeightSync subclass$") as info:
        make_weight_sync("nccl_p2p")
    assert "\n" not in str(info.value)


def test_backend_negotiation():
    gpu = ["cuda:GPU-a", "cuda:GPU-b", "cuda:GPU-c"]
    assert _choose_backend(None, gpu) == "nccl"
    assert _choose_backend(None, ["cuda:GPU-a", "cuda:GPU-a", "cuda:GPU-b"]) == "gloo"  # shared GPU: NCCL refuses
    assert _choose_backend(None, ["cuda:GPU-a", "cpu"]) == "gloo"
    assert _choose_backend(None, ["cuda:?", "cuda:GPU-b"]) == "gloo"
    assert _choose_backend("nccl", ["cpu", "cpu"]) == "nccl"  # forced: the receivers then fail with a clear error
    with pytest.raises(ValueError, match="backend 'nccl' needs the trainer's weights on CUDA"):
        CollectiveWeightSync(backend="nccl", device="cpu")
    with pytest.raises(ValueError, match="backend='mpi' is not one of"):
        CollectiveWeightSync(backend="mpi")


@pytest.mark.slow
@pytest.mark.ray
def test_collective_receiver_count_is_checked(ray_cluster, actors):
    sync = CollectiveWeightSync(num_receivers=2)
    try:
        with pytest.raises(ValueError, match="worker_index 2 is outside 0..1"):
            sync.receiver(2)
        sync.receiver(0)
        with pytest.raises(ValueError, match=r"receivers were made for worker indices \[0\] but 2 actors"):
            sync.connect(actors)
    finally:
        sync.close()


def test_bucket_plan_round_trip():
    model = make_model(seed=3)
    state = model.state_dict()
    layout = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    layout.append(("empty", (0, 4), torch.float32))
    state = {**state, "empty": torch.empty(0, 4)}
    slots, sizes = _plan(layout, bucket_bytes=64)
    assert len(sizes) > 3 and all(s.offset % 16 == 0 for s in slots)
    buffers = [torch.zeros(size, dtype=torch.uint8) for size in sizes]
    for s in slots:
        if s.nbytes:
            buffers[s.bucket][s.offset:s.offset + s.nbytes] = state[s.name].reshape(-1).view(torch.uint8)
    assert_same(_unpack(buffers, slots), state)


@pytest.mark.slow
@pytest.mark.ray
def test_collective_close_then_new_group(actors):
    first = attach("collective", actors)
    trainer = make_model(seed=11)
    first.push(trainer, 1, actors)
    port = first.master_port
    first.close()
    with pytest.raises(RuntimeError, match="after close"):
        first.push(trainer, 2, actors)
    # The rendezvous store is gone: its port can be bound again.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((first.master_addr, port))

    second = attach("collective", actors)  # the actors close their old receivers first
    try:
        edit(trainer, 2.0)
        want = snapshot(trainer)
        second.push(trainer, 5, actors)
        for a in actors:
            assert_same(weights_of(a, 5, timeout=0.0), want)  # collective push returns after delivery
    finally:
        second.close()


@pytest.mark.slow
@pytest.mark.ray
def test_collective_layout_mismatch_aborts_push_and_group_survives(actors):
    sync = attach("collective", actors, timeout_s=20)
    try:
        with pytest.raises(WeightSyncError, match="collector 0 failed to receive weights version 1.*differs"):
            sync.push(make_model(seed=1, out=5), 1, actors)
        good = make_model(seed=2)
        sync.push(good, 2, actors)
        for a in actors:
            assert_same(weights_of(a, 2, timeout=0.0), snapshot(good))
    finally:
        sync.close()


@pytest.mark.slow
@pytest.mark.ray
def test_collective_connect_times_out_naming_the_side(actors):
    sync = CollectiveWeightSync(timeout_s=2.0)
    receivers = [sync.receiver(0), sync.receiver(1)]
    ray.get([actors[0].set_receiver.remote(receivers[0]), actors[1].set_receiver.remote(None)])
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"collector\(s\) \[1\] never reached the weight-sync group.*timeout_s=2s"):
        sync.connect(actors)  # actor 1's connect_weight_sync() returns without joining
    assert time.monotonic() - start < 10
    with pytest.raises(RuntimeError, match="before connect"):
        sync.push(make_model(seed=1), 1, actors)
    sync.close()


@pytest.mark.slow
@pytest.mark.ray
def test_collective_push_names_a_dead_collector(ray_cluster):
    """A collector that dies between pushes is named (not its peers, whose receive merely broke)."""
    doomed = [StandInCollector.remote(None, seed=i) for i in range(2)]
    sync = attach("collective", doomed, timeout_s=30)
    try:
        trainer = make_model(seed=4)
        sync.push(trainer, 1, doomed)
        ray.kill(doomed[1])
        deadline = time.monotonic() + 10
        while True:  # ray.kill is asynchronous: wait until the death is visible
            try:
                ray.get(doomed[1].get_weights.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "killed actor still answers"
            time.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(CollectorDiedError, match="collector 1 died while trying to receive weights version 2"):
            sync.push(trainer, 2, doomed)
        assert time.monotonic() - start < 10
    finally:
        sync.close()
        ray.kill(doomed[0])
