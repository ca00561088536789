"""``--gather``'s file moves, by hand: what a node sends and what the driver's store keeps."""

from __future__ import annotations

import yaml

from atlasfl.engine.raygrid import _config_for_driver, _files, _Store, _write


def test_files_skip_what_is_still_being_written(tmp_path):
    _write(tmp_path, {"config.yaml": b"a", "rounds.jsonl.tmp": b"b",
                      "checkpoints/round-000001/state.json": b"c",
                      "checkpoints/.tmp-round-000002-7/state.json": b"d"})
    assert _files(tmp_path) == {"config.yaml": b"a", "checkpoints/round-000001/state.json": b"c"}
    assert _files(tmp_path / "none") == {}


def test_the_store_keeps_the_latest_checkpoints_and_the_config(tmp_path):
    run, store = tmp_path / "out" / "seed=0", _Store()
    for r in (1, 2, 3):
        store.put_checkpoint(str(run), f"round-00000{r}", {"state.json": str(r).encode()}, 2,
                             b"method: atlas\n")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-000002",
                                                                      "round-000003"]
    assert (run / "checkpoints" / "round-000003" / "state.json").read_bytes() == b"3"
    assert (run / "config.yaml").read_bytes() == b"method: atlas\n"
    assert store.pull(str(run)) == {"config.yaml": b"method: atlas\n",
                                    "checkpoints/round-000002/state.json": b"2",
                                    "checkpoints/round-000003/state.json": b"3"}


def test_the_finished_folder_replaces_the_stores_copy_whole(tmp_path):
    run, store = tmp_path / "seed=0", _Store()
    store.put_checkpoint(str(run), "round-000001", {"state.json": b"1"}, 2, b"x: 1\n")
    store.put_folder(str(run), {"config.yaml": b"x: 2\n", "summary.json": b"{}"})
    assert _files(run) == {"config.yaml": b"x: 2\n", "summary.json": b"{}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed=0"]  # nothing left beside it


def test_a_gathered_config_names_the_drivers_out():
    node = yaml.safe_dump({"method": "atlas", "out": "/scratch/atlasfl-1", "seed": 3},
                          sort_keys=False).encode()
    assert yaml.safe_load(_config_for_driver(node, "/home/me/runs")) == {
        "method": "atlas", "out": "/home/me/runs", "seed": 3}
    assert _config_for_driver(node, "/o").decode().splitlines()[1] == "out: /o"  # order kept
