import pytest

from atlasfl.config import apply_overrides, from_dict
from atlasfl.errors import AtlasError


def test_defaults_validate_and_round_trip():
    cfg = from_dict({})
    assert from_dict(cfg.to_dict()) == cfg


def test_unknown_key_names_it_and_close_matches():
    with pytest.raises(AtlasError, match=r"key 'data.sampels'; did you mean data.samples"):
        from_dict({"data": {"sampels": 3}})
    with pytest.raises(AtlasError, match=r"unknown config key 'trian.lr'; did you mean train.lr"):
        apply_overrides({}, ["trian.lr=0.1"])


def test_split_cut_is_auto_or_an_integer():
    assert from_dict({}).split.fixed_cut is None
    assert from_dict({"split": {"cut": 3}}).split.fixed_cut == 3


def test_laplacian_eta_is_auto_or_a_number():
    assert from_dict({}).laplacian.fixed_eta is None
    assert from_dict({"laplacian": {"eta": 0.25}}).laplacian.fixed_eta == 0.25


def test_overrides_parse_yaml_values():
    raw = apply_overrides({}, ["train.lr=0.01", "data.tasks=[sst2, rte]", "train.head_lr=null"])
    cfg = from_dict(raw)
    assert cfg.train.lr == 0.01 and cfg.data.tasks == ("sst2", "rte") and cfg.train.head_lr is None


@pytest.mark.parametrize("raw, message", [
    ({"data": {"clients_per_task": 0}},
     "data.clients_per_task' = 0 is invalid; allowed: an integer >= 1"),
    ({"data": {"samples": 0}}, "data.samples' = 0 is invalid"),
    ({"data": {"partition": "pathological"}}, "allowed: iid, dirichlet"),
    ({"train": {"lr": "fast"}}, "train.lr' must be a number"),
    ({"federation": {"fraction": 0}}, "federation.fraction"),
    ({"ranks": {"update": "sum"}}, "ranks.update' = 'sum' is invalid; allowed: average, delta"),
    ({"split": {"cut": "half"}}, "split.cut' = 'half' is invalid; allowed: auto or an integer"),
    ({"split": {"cut": 0}}, r"split.cut' = '0' is invalid; allowed: auto or an integer >= "
                            r"split.min_cut = 1"),
    ({"split": {"mode": "y-shape"}}, "split.mode' = 'y-shape' is invalid; allowed: vanilla, "
                                     "u-shape"),
    ({"split": {"activation_dtype": "int8"}}, "allowed: fp32, fp16, bf16"),
    ({"split": {"tail": 0}}, "split.tail' = 0 is invalid; allowed: an integer >= 1"),
    ({"laplacian": {"eta": "fast"}}, "laplacian.eta' = 'fast' is invalid; allowed: auto"),
    ({"laplacian": {"eta": 0}}, "laplacian.eta' = '0' is invalid"),
    ({"laplacian": {"lam": -1}}, "laplacian.lam' = -1.0 is invalid; allowed: a number >= 0"),
    ({"laplacian": {"space": "tangent"}}, "allowed: auto, factors, product"),
    ({"laplacian": {"graph": "full"}}, "allowed: rbf, knn"),
    ({"data": {"task_samples": {"cola": 0}}}, "data.task_samples.cola' = 0 is invalid"),
    ({"data": {"task_samples": {"cola": "many"}}}, "data.task_samples.cola' must be an integer"),
    ({"data": {"task_samples": [100]}}, "data.task_samples' must be a mapping"),
])
def test_bad_values_name_field_value_and_allowed(raw, message):
    with pytest.raises(AtlasError, match=message):
        from_dict(raw)


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    from atlasfl.config import from_yaml
    from atlasfl.errors import AtlasError

    bad = tmp_path / "bad.yaml"
    bad.write_text("method: atlas\ntrain:\n  lr: [0.1\n  batch_size: 8\n")
    with pytest.raises(AtlasError) as info:
        from_yaml(bad)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"config file {bad}, line 4, column")
    assert "not valid YAML" in message


def test_an_override_sets_one_entry_of_a_mapping_and_nothing_below_a_plain_key():
    raw = apply_overrides({"data": {"task_samples": {"mrpc": 5}}},
                          ["data.task_samples.cola=2000", "data.samples=300"])
    assert from_dict(raw).data.task_samples == {"mrpc": 5, "cola": 2000}
    for key in ("data.samples.cola=3", "data.task_samples.cola.rows=3"):
        with pytest.raises(AtlasError, match="unknown config key"):
            apply_overrides({}, [key])
