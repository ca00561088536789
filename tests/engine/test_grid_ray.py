"""``--ray``: a grid's points as tasks on a Ray cluster of a head and two worker nodes on
loopback, one node lost mid-run; the run folders are those of a sequential grid."""

from __future__ import annotations

import json
import threading
import time

import pytest
import yaml

from atlasfl.cli import main
from atlasfl.engine.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")


def _rows(run):
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
            for line in (run / "rounds.jsonl").read_text().splitlines()]


def _weights(run):
    tensors = load_checkpoint(latest_checkpoint(run)).tensors
    return {k: v for k, v in tensors.items() if k.startswith("client/")}


@pytest.fixture
def cluster():
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def _grid(tiny_cfg, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg(**{"federation.rounds": 4, "train.threads": 1,
                                                 "method": "mira"}).to_dict()))
    return ["--config", str(config), "--set", "seed=0,1"]


def _run_losing_a_node(argv, out, c, node):
    """Run ``argv`` while a thread removes ``node`` once a checkpoint is in ``out``; returns
    the points that had not finished then."""
    lost_mid_run = []

    def lose_a_node():
        deadline = time.time() + 600
        while time.time() < deadline:
            if any(latest_checkpoint(p) is not None for p in out.glob("seed=*")):
                lost_mid_run.extend(p.name for p in out.glob("seed=*")
                                    if not (p / "summary.json").exists())
                c.remove_node(node)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=lose_a_node)
    killer.start()
    assert main(argv) == 0
    killer.join()
    return lost_mid_run


def _assert_a_sequential_grids_folders(grid, out, tmp_path):
    seq = tmp_path / "seq"
    assert main(["sweep", *grid, "--out", str(seq)]) == 0
    for name in ("seed=0", "seed=1"):
        assert _rows(out / name) == _rows(seq / name), name
        a, b = _weights(out / name), _weights(seq / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name


def test_a_grid_on_a_cluster_survives_a_lost_node(tiny_cfg, tmp_path, capsys, cluster):
    c, nodes = cluster
    grid, out = _grid(tiny_cfg, tmp_path), tmp_path / "ray"
    lost = _run_losing_a_node(["sweep", *grid, "--out", str(out), "--ray", c.address], out, c,
                              nodes[0])
    assert len(c.list_all_nodes()) == 2  # the head and one worker node were left
    assert lost  # a node went away while points were running
    err = capsys.readouterr().err
    assert "[2/2] seed=1: submitted (running) (done 0, submitted 2, left 0)" in err
    _assert_a_sequential_grids_folders(grid, out, tmp_path)


@pytest.fixture
def cluster_without_shared_files(tmp_path):
    """Two worker nodes, each with its own scratch folder (as if on its own disk)."""
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    scratch = [tmp_path / f"node-{i}" for i in range(2)]
    for folder in scratch:
        folder.mkdir()
    nodes = [c.add_node(num_cpus=1, env_vars={"ATLASFL_SCRATCH": str(folder)})
             for folder in scratch]
    c.wait_for_nodes()
    yield c, nodes, scratch
    ray.shutdown()
    c.shutdown()


def test_gather_copies_run_folders_to_the_driver_and_resumes_a_lost_point(
        tiny_cfg, tmp_path, cluster_without_shared_files):
    c, nodes, scratch = cluster_without_shared_files
    grid, out = _grid(tiny_cfg, tmp_path), tmp_path / "ray"
    # node 0 goes once a checkpoint has been copied to the driver's --out
    lost = _run_losing_a_node(["sweep", *grid, "--out", str(out), "--ray", c.address,
                               "--gather"], out, c, nodes[0])
    assert lost
    # the lost node's process never cleaned up: its point ran in that node's scratch folder
    assert list(scratch[0].glob("atlasfl-*/seed=*/config.yaml"))
    assert not list(scratch[1].glob("atlasfl-*"))  # the node that finished cleaned up
    _assert_a_sequential_grids_folders(grid, out, tmp_path)
    for name in ("seed=0", "seed=1"):
        saved = yaml.safe_load((out / name / "config.yaml").read_text())
        assert saved["out"] == str(out)  # the driver's --out, not the node's scratch folder
        assert (out / name / "summary.json").is_file()
    assert not list(out.glob(".*"))  # no half-copied folder left beside the runs


def test_gather_needs_ray(tmp_path, capsys):
    assert main(["sweep", "--config", "configs/quick.yaml", "--set", "seed=0,1",
                 "--out", str(tmp_path / "x"), "--gather"]) == 2
    assert "--gather copies run folders from the nodes of a Ray cluster; it needs --ray" \
        in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_gather_names_a_missing_scratch_folder(tiny_cfg, tmp_path, capsys):
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    missing = tmp_path / "no-such-folder"
    c.add_node(num_cpus=1, env_vars={"ATLASFL_SCRATCH": str(missing)})
    c.wait_for_nodes()
    try:
        grid, out = _grid(tiny_cfg, tmp_path), tmp_path / "ray"
        assert main(["sweep", *grid, "--out", str(out), "--ray", c.address, "--gather"]) == 2
    finally:
        ray.shutdown()
        c.shutdown()
    err = capsys.readouterr().err
    assert f"$ATLASFL_SCRATCH = '{missing}' on node" in err and "is not a folder" in err
    assert not missing.exists() and not list(out.glob("seed=*"))
