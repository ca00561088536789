"""Rank allocation: budgets are never exceeded, they bind, and importance decides who gets rank."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from atlasfl.devices import BUILTIN_PROFILES, assign_devices
from atlasfl.config import DevicesConfig
from atlasfl.errors import AtlasError
from atlasfl.phases.ranks import allocate_ranks


def _linear_memory(shapes, base, per_param):
    def memory(ranks):
        return base + sum(per_param * r * sum(shapes[m]) for m, r in ranks.items())
    return memory


@settings(max_examples=60, deadline=None)
@given(num=st.integers(1, 12), seed=st.integers(0, 10_000),
       budget_mib=st.floats(1.0, 64.0), parity=st.booleans(), utility=st.sampled_from(
           ["linear", "log"]), r_min=st.integers(1, 4), r_span=st.integers(0, 30))
def test_allocation_never_exceeds_the_budget(num, seed, budget_mib, parity, utility, r_min,
                                             r_span):
    import random
    rng = random.Random(seed)
    shapes = {f"m{i}": (rng.choice([64, 384, 576, 1536]), rng.choice([64, 384, 576, 1536]))
              for i in range(num)}
    importance = {m: rng.random() ** 3 for m in shapes}
    memory_of = _linear_memory(shapes, base=rng.randint(0, 2**20), per_param=16)
    budget = int(budget_mib * 2**20)
    param_budget = 8 * sum(sum(s) for s in shapes.values()) if parity else None
    plan = allocate_ranks(importance, shapes, memory_of=memory_of, budget_bytes=budget,
                          param_budget=param_budget, r_min=r_min, r_max=r_min + r_span,
                          utility=utility)
    assert set(plan.ranks) == set(shapes)
    assert all(r_min <= r <= r_min + r_span for r in plan.ranks.values())
    assert plan.memory_bytes == memory_of(plan.ranks)
    if plan.feasible:
        assert plan.memory_bytes <= budget
        assert param_budget is None or plan.params <= param_budget
    else:
        assert memory_of(dict.fromkeys(shapes, r_min)) > budget or plan.params > param_budget


def test_a_small_budget_binds_and_a_large_one_reaches_r_max():
    shapes = {f"m{i}": (576, 576) for i in range(10)}
    importance = {m: float(i + 1) for i, m in enumerate(shapes)}
    memory_of = _linear_memory(shapes, base=100 * 2**20, per_param=16)
    small = allocate_ranks(importance, shapes, memory_of=memory_of, budget_bytes=102 * 2**20,
                           r_min=1, r_max=32)
    large = allocate_ranks(importance, shapes, memory_of=memory_of, budget_bytes=2**40,
                           r_min=1, r_max=32)
    assert small.limited_by == "memory" and small.memory_bytes <= 102 * 2**20
    assert sum(small.ranks.values()) < sum(large.ranks.values())
    assert set(large.ranks.values()) == {32} and large.limited_by == "r_max"


@pytest.mark.parametrize("utility", ["linear", "log"])
def test_more_important_modules_get_at_least_as_much_rank(utility):
    shapes = {f"m{i}": (384, 384) for i in range(6)}
    importance = {"m0": 10.0, "m1": 5.0, "m2": 1.0, "m3": 0.5, "m4": 0.1, "m5": 0.0}
    plan = allocate_ranks(importance, shapes, memory_of=_linear_memory(shapes, 0, 16),
                          budget_bytes=2**40, param_budget=8 * 6 * 768, r_min=1, r_max=32,
                          utility=utility)
    ranks = [plan.ranks[f"m{i}"] for i in range(6)]
    assert ranks == sorted(ranks, reverse=True)
    assert len(set(ranks)) > 1, "ranks must really differ per module"
    assert plan.params <= 8 * 6 * 768


def test_infeasible_budget_is_reported_not_hidden():
    shapes = {"m": (8, 8)}
    plan = allocate_ranks({"m": 1.0}, shapes, memory_of=lambda r: 10**9, budget_bytes=10**6)
    assert not plan.feasible and plan.limited_by == "memory"


def test_allocation_refuses_missing_importance_and_bad_bounds():
    with pytest.raises(AtlasError, match="importance"):
        allocate_ranks({}, {"m": (4, 4)}, memory_of=lambda r: 0, budget_bytes=1)
    with pytest.raises(AtlasError, match="r_min"):
        allocate_ranks({"m": 1.0}, {"m": (4, 4)}, memory_of=lambda r: 0, budget_bytes=1,
                       r_min=4, r_max=2)


def test_devices_are_drawn_by_seed_not_by_client_index():
    ids = list(range(12))
    cfg = DevicesConfig()
    a = assign_devices(ids, cfg, seed=0)
    assert a == assign_devices(ids, cfg, seed=0)
    names = [a[i].name for i in ids]
    cyclic = [cfg.profiles[i % len(cfg.profiles)] for i in ids]
    assert names != cyclic
    assert [p.name for p in assign_devices(ids, cfg, seed=1).values()] != names
    assert set(names) <= set(BUILTIN_PROFILES)


def test_explicit_and_custom_profiles():
    from atlasfl.config import DeviceProfileConfig

    cfg = DevicesConfig(assignment=("watch", "gpu-16gb"),
                        custom=(DeviceProfileConfig("watch", 0.5),))
    out = assign_devices([0, 1], cfg, seed=0)
    assert out[0].name == "watch" and out[0].memory_bytes == 2**29
    with pytest.raises(AtlasError, match="one per client"):
        assign_devices([0, 1, 2], cfg, seed=0)
    with pytest.raises(AtlasError, match="unknown device profile"):
        assign_devices([0], DevicesConfig(assignment=("phone",)), seed=0)
