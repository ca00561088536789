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


def test_a_grid_on_a_cluster_survives_a_lost_node(tiny_cfg, tmp_path, capsys, cluster):
    c, nodes = cluster
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg(**{"federation.rounds": 4, "train.threads": 1,
                                                 "method": "mira"}).to_dict()))
    grid = ["--config", str(config), "--set", "seed=0,1"]
    out = tmp_path / "ray"

    lost_mid_run = []

    def lose_a_node():  # once a point has saved a round, a node goes away
        deadline = time.time() + 600
        while time.time() < deadline:
            saved = [p for p in out.glob("seed=*") if latest_checkpoint(p) is not None]
            if saved:
                lost_mid_run.extend(p.name for p in out.glob("seed=*")
                                    if not (p / "summary.json").exists())
                c.remove_node(nodes[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=lose_a_node)
    killer.start()
    assert main(["sweep", *grid, "--out", str(out), "--ray", c.address]) == 0
    killer.join()
    assert len(c.list_all_nodes()) == 2  # the head and one worker node were left
    assert lost_mid_run  # a node went away while points were running
    err = capsys.readouterr().err
    assert "[2/2] seed=1: submitted (running) (done 0, submitted 2, left 0)" in err
    seq = tmp_path / "seq"
    assert main(["sweep", *grid, "--out", str(seq)]) == 0
    for name in ("seed=0", "seed=1"):
        assert _rows(out / name) == _rows(seq / name), name
        a, b = _weights(out / name), _weights(seq / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
