"""The three-node test cluster is what later tests rely on: separate nodes, pinnable by label,
a killed raylet is a dead node, and a replacement joins."""

import json
import subprocess
import sys
import time

import pytest

from tests.fixtures.cluster import HEAD, WORKERS

pytestmark = pytest.mark.integration

# Runs one task pinned to each label given on the command line; prints label -> node id, and the
# alive nodes as `ray.nodes()` reports them (node id -> its custom labels).
WHERE = """
import json, sys, ray
ray.init()
@ray.remote(num_cpus=0)
def node_id():
    return ray.get_runtime_context().get_node_id()
labels = sys.argv[1:]
placed = ray.get([node_id.options(resources={label: 0.01}).remote() for label in labels], timeout=240)
alive = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("node_")) for n in ray.nodes() if n["Alive"]}
print(json.dumps({"placed": dict(zip(labels, placed)), "alive": alive}))
"""

# Waits (bounded) until `ray.nodes()` reports the node with the given id dead; prints its record.
WAIT_DEAD = """
import json, sys, time, ray
ray.init()
deadline = time.monotonic() + 240
while time.monotonic() < deadline:
    entry = {n["NodeID"]: n for n in ray.nodes()}.get(sys.argv[1])
    if entry is not None and not entry["Alive"]:
        print(json.dumps({"alive": entry["Alive"]}))
        break
    time.sleep(0.5)
"""


def driver(cluster, script: str, *args: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=cluster.driver_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines, f"the driver printed nothing; stderr:\n{run.stderr[-3000:]}"
    return json.loads(lines[-1])


def test_three_nodes_pinned_by_label_then_a_killed_node_is_dead_and_a_replacement_joins(multinode_cluster):
    cluster = multinode_cluster
    labels = [HEAD, *WORKERS]
    first = driver(cluster, WHERE, *labels)
    placed = first["placed"]
    assert len(set(placed.values())) == 3, placed
    for label, node_id in placed.items():
        assert first["alive"][node_id] == [label], first

    lost = "node_a"
    started = time.monotonic()
    raylet = cluster.kill_node(lost)
    assert driver(cluster, WAIT_DEAD, placed[lost]) == {"alive": False}
    print(
        f"raylet {raylet} of {lost} killed; ray.nodes() reported the node dead after {time.monotonic() - started:.1f} s"
    )

    cluster.add_node(lost)
    second = driver(cluster, WHERE, *labels)
    assert second["placed"][HEAD] == placed[HEAD] and second["placed"]["node_b"] == placed["node_b"]
    assert second["placed"][lost] not in placed.values()
    assert sorted(second["alive"].values()) == [[label] for label in sorted(labels)], second
