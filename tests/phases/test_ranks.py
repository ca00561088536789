"""Rank allocation: budgets are never exceeded, they bind, and importance decides who gets rank."""

from __future__ import annotations

import itertools
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from atlasfl.config import DevicesConfig
from atlasfl.devices import BUILTIN_PROFILES, assign_devices
from atlasfl.errors import AtlasError
from atlasfl.phases.ranks import ImportanceMeter, allocate_ranks, module_importance


def _linear_memory(shapes, base, per_param):
    def memory(ranks):
        return base + sum(per_param * r * sum(shapes[m]) for m, r in ranks.items())
    return memory


@settings(max_examples=60, deadline=None)
@given(num=st.integers(1, 12), seed=st.integers(0, 10_000),
       budget_mib=st.floats(1.0, 64.0), parity=st.booleans(), utility=st.sampled_from(
           ["linear", "log", "spectrum"]), r_min=st.integers(1, 4), r_span=st.integers(0, 30))
def test_allocation_never_exceeds_the_budget(num, seed, budget_mib, parity, utility, r_min,
                                             r_span):
    import random
    rng = random.Random(seed)
    shapes = {f"m{i}": (rng.choice([64, 384, 576, 1536]), rng.choice([64, 384, 576, 1536]))
              for i in range(num)}
    importance = {m: rng.random() ** 3 for m in shapes}
    if utility == "spectrum":  # descending squared singular values, shorter than r_max at times
        importance = {m: sorted((rng.random() ** 3 for _ in range(rng.randint(1, 40))),
                                reverse=True) for m in shapes}
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


def test_spectrum_utility_buys_the_largest_next_singular_value_per_parameter():
    shapes = {"a": (4, 4), "b": (4, 4)}  # the same cost per rank
    spectra = {"a": [10.0, 1.0, 0.5], "b": [3.0, 2.0, 1.5]}
    # from (1, 1): b's 2.0, then b's 1.5, then a's 1.0 (b has nothing left)
    plan = allocate_ranks(spectra, shapes, memory_of=lambda r: 0, budget_bytes=1,
                          param_budget=4 * 8, r_min=1, r_max=8, utility="spectrum")
    assert plan.ranks == {"a": 1, "b": 3}
    plan = allocate_ranks(spectra, shapes, memory_of=lambda r: 0, budget_bytes=1,
                          param_budget=5 * 8, r_min=1, r_max=8, utility="spectrum")
    assert plan.ranks == {"a": 2, "b": 3}
    # per parameter, a cheaper module's smaller singular value wins: 0.3 / 2 > 0.5 / 8, and
    # then b's rank no longer fits (either one would have fitted alone)
    plan = allocate_ranks({"a": [1.0, 0.3], "b": [1.0, 0.5]}, {"a": (1, 1), "b": (4, 4)},
                          memory_of=lambda r: 0, budget_bytes=1, param_budget=2 + 8 + 8,
                          r_min=1, r_max=2, utility="spectrum")
    assert plan.ranks == {"a": 2, "b": 1}


def test_the_utility_and_the_importance_kind_must_agree():
    kw = {"memory_of": lambda r: 0, "budget_bytes": 1}
    with pytest.raises(AtlasError, match="ranks.utility = 'spectrum' needs a list"):
        allocate_ranks({"m": 1.0}, {"m": (4, 4)}, utility="spectrum", **kw)
    with pytest.raises(AtlasError, match="ranks.utility = 'log' needs one number"):
        allocate_ranks({"m": [1.0]}, {"m": (4, 4)}, utility="log", **kw)
    with pytest.raises(AtlasError, match="allowed: linear, log, spectrum"):
        allocate_ranks({"m": 1.0}, {"m": (4, 4)}, utility="cubic", **kw)


def test_importance_meter_against_the_gradient_by_hand():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=gen, requires_grad=True)
    batches = [{"x": torch.randn(4, 5, generator=gen), "y": torch.randn(4, 3, generator=gen)}
               for _ in range(3)]

    def loss_fn(batch):  # mean over examples of 1/2 ||W x - y||^2
        return 0.5 * (batch["x"] @ w.T - batch["y"]).pow(2).sum(1).mean()

    # dL/dW of one batch: mean over its examples of (W x - y) x^T
    by_hand = [((b["x"] @ w.T - b["y"]).T @ b["x"] / 4).detach().double() for b in batches]
    norm = module_importance(loss_fn, batches, ImportanceMeter({"w": w}, "norm"))
    assert norm["w"] == pytest.approx(float(sum(g.pow(2).sum() for g in by_hand) / 3), rel=1e-6)
    spectrum = module_importance(loss_fn, batches, ImportanceMeter({"w": w}, "spectrum", 4))
    expected = torch.linalg.svdvals(sum(by_hand) / 3).pow(2).tolist()  # 3 values (W is 3 x 5)
    assert spectrum["w"] == pytest.approx(expected + [0.0], rel=1e-5)  # padded to top = 4
    # Eckart-Young: the top r values sum to the energy of the best rank-r approximation
    u, sv, vh = torch.linalg.svd(sum(by_hand) / 3)
    best2 = (u[:, :2] * sv[:2]) @ vh[:2]
    assert sum(spectrum["w"][:2]) == pytest.approx(float(best2.pow(2).sum()), rel=1e-5)
    with pytest.raises(AtlasError, match="allowed: norm, spectrum"):
        ImportanceMeter({"w": w}, "fisher")
    with pytest.raises(AtlasError, match="at least one example"):
        module_importance(loss_fn, [], ImportanceMeter({"w": w}))


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


# -- allocations small enough to work out by hand (or by brute force over every rank vector) -----


def _plan(importance, shapes, **kw):
    kw.setdefault("memory_of", lambda ranks: 0)
    kw.setdefault("budget_bytes", 1)
    return allocate_ranks(importance, shapes, **kw)


def test_ranks_default_to_one_through_sixteen():
    shapes = {"a": (2, 2)}
    plan = _plan({"a": 1.0}, shapes, budget_bytes=10**9)
    assert plan.ranks == {"a": 16} and plan.limited_by == "r_max"
    # a budget equal to the memory at r_min is feasible and leaves no room to grow
    plan = _plan({"a": 1.0}, shapes, memory_of=lambda r: 10 * r["a"], budget_bytes=10)
    assert (plan.ranks, plan.feasible, plan.limited_by) == ({"a": 1}, True, "memory")
    assert (plan.memory_bytes, plan.budget_bytes, plan.params) == (10, 10, 4)


def test_memory_budget_is_filled_exactly():
    # base 1020 bytes at rank 1 + 1, 10 bytes per extra rank: 1050 bytes buy exactly three ranks,
    # all for the module of more importance per parameter (a: 1/2 per 4 params, b: 1/2 per 6)
    shapes = {"a": (2, 2), "b": (3, 3)}
    plan = _plan({"a": 1.0, "b": 1.0}, shapes, memory_of=lambda r: 1000 + 10 * sum(r.values()),
                 budget_bytes=1050)
    assert plan.ranks == {"a": 4, "b": 1}
    assert (plan.memory_bytes, plan.budget_bytes, plan.params) == (1050, 1050, 4 * 4 + 6)
    assert plan.feasible is True and plan.limited_by == "memory"


def test_parameter_budget_reports_what_binds():
    shapes = {"a": (2, 2), "b": (3, 3)}  # 4 and 6 parameters per rank
    # r_min = 2 everywhere needs 20 parameters: 19 is infeasible, 20 is exactly enough
    plan = _plan({"a": 1.0, "b": 1.0}, shapes, budget_bytes=10**9, param_budget=19, r_min=2)
    assert (plan.ranks, plan.feasible, plan.limited_by) == ({"a": 2, "b": 2}, False, "parameters")
    assert (plan.memory_bytes, plan.budget_bytes, plan.params) == (0, 10**9, 20)
    plan = _plan({"a": 1.0, "b": 1.0}, shapes, budget_bytes=10**9, param_budget=20, r_min=2)
    assert (plan.ranks, plan.feasible, plan.limited_by) == ({"a": 2, "b": 2}, True, "parameters")
    # memory exactly at the budget is no shortage: the parameters are what binds
    plan = _plan({"a": 1.0}, {"a": (2, 2)}, memory_of=lambda r: 4, budget_bytes=4,
                 param_budget=3)
    assert (plan.feasible, plan.limited_by) == (False, "parameters")
    # memory short at r_min: reported as memory even with a parameter budget to spare
    plan = _plan({"a": 1.0}, {"a": (2, 2)}, memory_of=lambda r: 5, budget_bytes=4,
                 param_budget=100)
    assert (plan.feasible, plan.limited_by, plan.budget_bytes) == (False, "memory", 4)


def test_a_module_that_cannot_grow_does_not_stop_the_others():
    shapes = {"a": (8, 8), "b": (1, 1)}  # a: 16 parameters per rank, more important; b: 2
    # parameters: 18 at rank 1, a budget of 24 leaves room for three ranks of b but none of a
    plan = _plan({"a": 10.0, "b": 1.0}, shapes, budget_bytes=10**9, param_budget=24)
    assert plan.ranks == {"a": 1, "b": 4} and plan.limited_by == "parameters"
    # memory: a's rank costs 100 bytes, b's 1; 3 bytes to spare buy three ranks of b
    plan = _plan({"a": 10.0, "b": 1.0}, shapes, budget_bytes=3,
                 memory_of=lambda r: 100 * (r["a"] - 1) + (r["b"] - 1))
    assert plan.ranks == {"a": 1, "b": 4} and plan.limited_by == "memory"


def test_the_first_budget_that_binds_is_the_one_reported():
    shapes = {"a": (8, 8), "b": (1, 1)}
    # a (tried first) exceeds the parameters, then b exceeds the memory: "parameters"
    plan = _plan({"a": 10.0, "b": 1.0}, shapes, param_budget=20, budget_bytes=0,
                 memory_of=lambda r: 5 * (r["b"] - 1))
    assert plan.ranks == {"a": 1, "b": 1} and plan.limited_by == "parameters"
    # a exceeds the memory, then b exceeds the parameters: "memory"
    plan = _plan({"a": 10.0, "b": 1.0}, shapes, param_budget=18, budget_bytes=0,
                 memory_of=lambda r: 5 * (r["a"] - 1))
    assert plan.ranks == {"a": 1, "b": 1} and plan.limited_by == "memory"


def _brute_force(importance, shapes, param_budget, r_max, utility):
    best, best_value = None, -1.0
    names = sorted(shapes)
    for ranks in itertools.product(range(1, r_max + 1), repeat=len(names)):
        if sum(r * sum(shapes[m]) for r, m in zip(ranks, names, strict=True)) > param_budget:
            continue
        value = sum(importance[m] * (math.log(r) if utility == "log" else r)
                    for r, m in zip(ranks, names, strict=True))
        if value > best_value + 1e-12:
            best, best_value = dict(zip(names, ranks, strict=True)), value
    return best


@pytest.mark.parametrize("utility", ["linear", "log"])
def test_allocation_maximises_the_utility_found_by_brute_force(utility):
    # the same cost per rank, importance 3 : 1; four extra ranks to give. log: 3 log 4 + log 2 is
    # the best split of six ranks (4, 2); linear: every extra rank to a (5, 1)
    shapes, importance = {"a": (4, 4), "b": (4, 4)}, {"a": 3.0, "b": 1.0}
    plan = _plan(importance, shapes, budget_bytes=10**9, param_budget=6 * 8, r_max=8,
                 utility=utility)
    assert plan.ranks == _brute_force(importance, shapes, 6 * 8, 8, utility)
    assert plan.ranks == ({"a": 4, "b": 2} if utility == "log" else {"a": 5, "b": 1})


def test_linear_utility_buys_importance_per_parameter():
    # a: importance 1 for 2 parameters per rank; b: importance 2 for 8: a's rank is the better buy
    plan = _plan({"a": 1.0, "b": 2.0}, {"a": (1, 1), "b": (4, 4)}, budget_bytes=10**9,
                 param_budget=18, r_max=2)
    assert plan.ranks == {"a": 2, "b": 1} and plan.limited_by == "parameters"


def test_importance_below_one_is_compared_as_it_is():
    plan = _plan({"a": 0.2, "b": 0.6}, {"a": (2, 2), "b": (2, 2)}, budget_bytes=10**9,
                 param_budget=12)
    assert plan.ranks == {"a": 1, "b": 2}


def test_zero_importance_everywhere_still_spends_the_budget():
    plan = _plan({"a": 0.0, "b": 0.0}, {"a": (2, 2), "b": (2, 2)}, budget_bytes=10**9,
                 param_budget=16, r_max=4)
    assert sum(plan.ranks.values()) == 4 and plan.params == 16


def test_spectrum_is_sorted_and_ends_where_the_gradient_has_no_more_directions():
    # a has one direction only: its second rank adds nothing; b's 0.5 is worth more
    plan = _plan({"a": [1.0], "b": [1.0, 0.5, 0.25]}, {"a": (2, 2), "b": (2, 2)},
                 budget_bytes=10**9, param_budget=12, utility="spectrum")
    assert plan.ranks == {"a": 1, "b": 2}
    # the values may come in any order: b's second largest (0.3) beats a's (0.2)
    plan = _plan({"a": [0.2, 0.9], "b": [0.1, 0.3, 0.8]}, {"a": (2, 2), "b": (2, 2)},
                 budget_bytes=10**9, param_budget=12, utility="spectrum")
    assert plan.ranks == {"a": 1, "b": 2}


def test_allocation_errors_name_the_setting_and_what_is_wrong():
    kw = {"memory_of": lambda r: 0, "budget_bytes": 1}
    with pytest.raises(AtlasError, match=r"^ranks\.utility = 'cubic' is invalid"):
        allocate_ranks({"m": 1.0}, {"m": (4, 4)}, utility="cubic", **kw)
    with pytest.raises(AtlasError, match=r"^no importance for modules \['a', 'b', 'c'\]$"):
        allocate_ranks({}, dict.fromkeys("abcd", (4, 4)), **kw)
    with pytest.raises(AtlasError, match=r"module 'm' has float$"):
        allocate_ranks({"m": 1.0}, {"m": (4, 4)}, utility="spectrum", **kw)


def test_importance_meter_by_hand():
    # two batches of gradients for two tensors: norm = mean squared norm, spectrum = squared
    # singular values of the mean gradient, padded to ``top`` (16 by default)
    grads = [{"u": torch.tensor([[1.0, 2.0]]), "v": torch.tensor([[3.0]])},
             {"u": torch.tensor([[3.0, 0.0]]), "v": torch.tensor([[1.0]])}]
    params = {"u": torch.zeros(1, 2), "v": torch.zeros(1, 1)}
    norm, spectrum = ImportanceMeter(params, "norm"), ImportanceMeter(params, "spectrum")
    for g in grads:
        norm.add(g)
        spectrum.add(g)
    assert norm.result() == pytest.approx({"u": 7.0, "v": 5.0})  # (5 + 9) / 2, (9 + 1) / 2
    out = spectrum.result()  # mean gradients (2, 1) and (2): 5 and 4
    assert out["u"] == pytest.approx([5.0] + [0.0] * 15)
    assert out["v"] == pytest.approx([4.0] + [0.0] * 15)
    with pytest.raises(AtlasError, match=r"^importance kind = 'fisher' is invalid"):
        ImportanceMeter(params, "fisher")
    with pytest.raises(AtlasError, match=r"^a client needs at least one example to compute "
                                         r"module importance$"):
        ImportanceMeter(params).result()
