"""A checkpoint saved before a key's default changed resumes at the value it ran with."""

from __future__ import annotations

import hashlib
import json

from atlasfl.config import EARLIER_DEFAULTS, complete_saved
from atlasfl.engine import RunDir, build_experiment, load_checkpoint, run_experiment
from atlasfl.engine.checkpoint import MANIFEST, META


def test_complete_saved_fills_only_missing_keys_with_their_earlier_values():
    assert EARLIER_DEFAULTS == {"train.length_bucket": 0, "train.pad_multiple": 1,
                                "data.test_fraction": 0.0}
    saved = {"method": "local", "train": {"pad_multiple": 4}, "data": {"test_fraction": 0.3}}
    assert complete_saved(saved) == {"method": "local",
                                     "train": {"pad_multiple": 4, "length_bucket": 0},
                                     "data": {"test_fraction": 0.3}}
    assert saved == {"method": "local", "train": {"pad_multiple": 4},
                     "data": {"test_fraction": 0.3}}  # the input is kept
    # a config from before local test splits existed ran without one
    assert complete_saved({}) == {"train": {"length_bucket": 0, "pad_multiple": 1},
                                  "data": {"test_fraction": 0.0}}


def test_an_old_checkpoint_resumes_without_buckets(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"federation.rounds": 2, "out": str(tmp_path),
                      "train.length_bucket": 0, "train.pad_multiple": 1})
    run_dir = RunDir.create(cfg)
    outcome = run_experiment(build_experiment(cfg.replace(**{"session.max_rounds": 1})), run_dir)
    state = outcome.checkpoint / META
    meta = json.loads(state.read_text())
    for key in ("length_bucket", "pad_multiple"):  # as written before the keys existed
        del meta["config"]["train"][key]
    state.write_text(json.dumps(meta))
    manifest = json.loads((outcome.checkpoint / MANIFEST).read_text())  # re-sealed by hand
    manifest["files"][META] = hashlib.sha256(state.read_bytes()).hexdigest()
    (outcome.checkpoint / MANIFEST).write_text(json.dumps(manifest))
    train = load_checkpoint(outcome.checkpoint).config["train"]
    assert (train["length_bucket"], train["pad_multiple"]) == (0, 1)  # not today's 8 and 16
