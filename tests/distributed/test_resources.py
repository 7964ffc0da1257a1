"""Resource planning and mode options for the Ray modes (grpo_utils.distributed.resources): no
Ray cluster is started here."""

from __future__ import annotations

import pytest

from tests.helpers import CONFIG


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
        plan_resources(_async_cfg(cluster_cpus=8, collector_gpus=1), torch.device("cuda"), available_gpus=0)
    with pytest.raises(ValueError, match=r"mode.max_staleness=-1 must be >= 0"):
        check_mode_options(_async_cfg(max_staleness=-1))
    check_mode_options(_async_cfg())  # the defaults are valid


def test_mode_files_list_exactly_their_keys():
    """Every key a mode accepts is in its shipped file (documented), and nothing else."""
    from omegaconf import OmegaConf

    from grpo_utils.distributed.resources import ASYNC_DEFAULTS, SYNC_DEFAULTS

    assert set(OmegaConf.load(CONFIG / "mode" / "sync.yaml")) == {"name", *SYNC_DEFAULTS}
    assert set(OmegaConf.load(CONFIG / "mode" / "async.yaml")) == {"name", *ASYNC_DEFAULTS}


def test_mode_options_name_the_misplaced_key():
    from omegaconf import OmegaConf

    from grpo_utils.distributed.resources import check_mode_options

    def cfg(name, **mode):
        return OmegaConf.create({"mode": {"name": name, **mode}, "rollout": {"engine": "direct"}})

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
