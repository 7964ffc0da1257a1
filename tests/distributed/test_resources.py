"""Resource planning and mode options for the Ray modes (grpo_utils.distributed.resources): no
Ray cluster is started here."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf


def _async_cfg(**mode):
    from omegaconf import OmegaConf

    return OmegaConf.create({"mode": {"name": "async", **mode}})


def test_resource_plan_fits_two_cores_and_names_what_is_short():
    import torch

    from grpo_utils.distributed.resources import check_mode_options, plan_resources

    plan = plan_resources(_async_cfg(cluster_cpus=2), torch.device("cpu"), available_gpus=0)
    assert (plan.ray_cpus, plan.ray_gpus, plan.trainer_threads) == (1, 0, 1)
    with pytest.raises(ValueError, match=r"not enough CPUs: .* = 3 CPUs, but the machine has 2 \(short by 1\)"):
        plan_resources(_async_cfg(cluster_cpus=2, num_collectors=2), torch.device("cpu"), available_gpus=0)
    with pytest.raises(ValueError, match=r"not enough GPUs: .*short by 2"):
        gpu_cfg = _async_cfg(cluster_cpus=8)
        gpu_cfg.inference_model = {"num_devices": 1}
        plan_resources(gpu_cfg, torch.device("cuda"), available_gpus=0)
    with pytest.raises(ValueError, match=r"mode.max_staleness=-1 must be >= 0"):
        check_mode_options(_async_cfg(max_staleness=-1))
    check_mode_options(_async_cfg())  # the defaults are valid


def test_mode_schemas_list_exactly_their_keys():
    """Every key a mode accepts is in its schema (with a doc), and nothing else."""
    import dataclasses

    from grpo_utils.config.schema import AsyncModeConfig, SyncModeConfig
    from grpo_utils.distributed.resources import ASYNC_DEFAULTS, SYNC_DEFAULTS

    for schema, defaults in ((SyncModeConfig, SYNC_DEFAULTS), (AsyncModeConfig, ASYNC_DEFAULTS)):
        fields = dataclasses.fields(schema)
        assert {f.name for f in fields} == {"name", *defaults}
        assert all(f.metadata.get("doc") for f in fields)


def test_mode_options_name_the_misplaced_key():
    from omegaconf import OmegaConf

    from grpo_utils.distributed.resources import check_mode_options

    def cfg(name, **mode):
        return OmegaConf.create({"mode": {"name": name, **mode}, "rollout": {"_target_": "grpo_utils.rollout.group.GroupRollout"}})

    with pytest.raises(ValueError, match=r"^mode.max_staleness is not a mode=sync setting; it is a mode=async"):
        check_mode_options(cfg("sync", max_staleness=0))
    with pytest.raises(ValueError, match=r"^mode.sync_iter is not a mode=async setting; it is a mode=sync"):
        check_mode_options(cfg("async", sync_iter=True))
    with pytest.raises(ValueError, match=r"^mode.ray='yes' must be true or false"):
        check_mode_options(cfg("sync", ray="yes"))
    with pytest.raises(ValueError, match=r"^mode.weight_sync='nccl' is unknown; expected one of object_store, "):
        check_mode_options(cfg("async", weight_sync="nccl"))
    check_mode_options(cfg("sync"))  # the defaults are valid


def test_collectors_never_get_the_trainer_gpu(monkeypatch):
    from grpo_utils.distributed.resources import collector_gpu_ids

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert collector_gpu_ids(0, 4) == ["1", "2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert collector_gpu_ids(1, 3) == ["4", "6"]


def test_weight_sync_may_be_a_class_of_the_users():
    from grpo_utils.distributed.resources import check_mode_options
    from grpo_utils.distributed.weight_sync import ObjectStoreWeightSync, make_weight_sync

    def cfg(kind):
        return OmegaConf.create({"mode": {"name": "async", "weight_sync": kind}})

    check_mode_options(cfg("tests.distributed.test_resources.MyWeightSync"))
    sync = make_weight_sync("tests.distributed.test_resources.MyWeightSync", num_receivers=2, timeout_s=5.0)
    assert isinstance(sync, MyWeightSync) and isinstance(sync, ObjectStoreWeightSync)
    assert sync.kwargs == {"num_receivers": 2, "device": None, "timeout_s": 5.0}
    with pytest.raises(ValueError, match=r"^mode.weight_sync=builtins.dict is not a WeightSync subclass$"):
        check_mode_options(cfg("builtins.dict"))
    with pytest.raises(ValueError, match=r"^mode.weight_sync=my_pkg.Sync cannot be imported \("):
        check_mode_options(cfg("my_pkg.Sync"))


from grpo_utils.distributed.weight_sync import ObjectStoreWeightSync  # noqa: E402


class MyWeightSync(ObjectStoreWeightSync):
    """A user's strategy (here the object store again), built with the collective's keyword arguments."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
