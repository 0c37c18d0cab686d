"""``compile --matrix``: cells placed on the nodes that have their resources.

A simulated cluster (``ray.cluster_utils.Cluster``): a head with 1 CPU, a node advertising the
CPU flag ``cpu_isa:avx2``, and a node with one (declared) H100. The cells whose checkpoint is
missing fail in milliseconds, wherever they run, so the placement test is about placement;
one slow test compiles the real example checkpoint in the local pool.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from typer.testing import CliRunner

import esr_deploy
from esr_deploy.cli import app
from esr_deploy.errors import RecipeError
from esr_deploy.paths import example_checkpoint
from esr_deploy.serving.matrix import load_matrix, node_resources, run_local, run_on_ray

PLACEMENT = """
out = "out"
[[checkpoint]]
name = "gone"
path = "missing.pth"
[[target]]
name = "ort-fp32"
label = "isa"
cpu_isa = ["avx2"]
[[target]]
name = "ort-fp32"
label = "h100"
gpu = "H100"
[[target]]
name = "ort-fp32"
label = "a100"
gpu = "A100"
[[target]]
name = "ort-fp32"
label = "amx"
cpu_isa = ["amx_int8"]
"""


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {
        "isa": c.add_node(num_cpus=1, resources={"cpu_isa:avx2": 1}),
        "h100": c.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1}),
    }
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="warning")
    yield {label: node.node_id for label, node in nodes.items()}
    ray.shutdown()
    c.shutdown()


def test_cells_run_only_where_their_resources_are(cluster: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(PLACEMENT)
    cells = load_matrix(tmp_path / "m.toml")
    assert [c.label for c in cells] == ["isa", "h100", "a100", "amx"]
    assert cells[1].resources() == {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    records = run_on_ray(cells, None, timeout_s=120)
    by_label = {r["label"]: r for r in records}
    for label in ("isa", "h100"):  # ran (and failed: no checkpoint) on the one node that fits
        assert by_label[label]["status"] == "failed", by_label[label]
        assert "missing.pth" in by_label[label]["error"]
        assert by_label[label]["node"] == cluster[label]
    for label, needs in (("a100", "accelerator_type:A100"), ("amx", "cpu_isa:amx_int8")):
        assert by_label[label]["status"] == "unschedulable" and needs in by_label[label]["error"]
        assert "node" not in by_label[label]


def test_cli_matrix_on_ray_writes_one_table_and_one_json(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "m.toml").write_text(PLACEMENT)
    args = ["compile", "--matrix", str(tmp_path / "m.toml"), "--ray", "local"]
    result = CliRunner().invoke(app, args)  # "local": this process is already on the cluster
    assert result.exit_code == 2, result.output  # nothing built
    assert "4 of 4 cells did not build" in result.output and "unschedulable" in result.output
    report = json.loads((tmp_path / "out" / "matrix.json").read_text())
    assert [c["status"] for c in report["cells"]] == ["failed", "failed"] + ["unschedulable"] * 2


def test_a_cell_past_the_timeout_is_cancelled_and_reported(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    """A real compile (minutes here) given 3 s: reported as timed out, its task cancelled."""
    (tmp_path / "m.toml").write_text(
        f"[[checkpoint]]\npath = '{example_checkpoint()}'\n[[target]]\nname = 'ort-fp32'\n"
    )
    start = time.monotonic()
    [record] = run_on_ray(load_matrix(tmp_path / "m.toml"), None, timeout_s=3)
    assert record["status"] == "timed out" and "cancelled" in record["error"]
    assert time.monotonic() - start < 30


def test_bad_matrix_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    for text, message in (
        ("[[checkpoint]]\npath = 'a.pth'\n", "needs"),
        ("[[checkpoint]]\npath='a'\n[[target]]\nname='x'\n[[target]]\nname='x'\n", "label"),
        ("[compile]\nrm = true\n[[checkpoint]]\npath='a'\n[[target]]\nname='x'\n", "compile"),
        ("not toml [", "TOML"),
    ):
        path.write_text(text)
        with pytest.raises(RecipeError, match=message):
            load_matrix(path)


@pytest.mark.slow  # a real compile (≈1 min on 2 cores)
def test_local_pool_compiles_what_this_machine_can(tmp_path: Path) -> None:
    isa = sorted(node_resources())[0].split(":")[1] if node_resources() else None
    (tmp_path / "m.toml").write_text(
        f"""
[compile]
no_latency = true
[[checkpoint]]
name = "rlfn"
path = "{example_checkpoint()}"
[[target]]
name = "ort-fp32"
{f'cpu_isa = ["{isa}"]' if isa else ""}
[[target]]
name = "trt-fp16"
gpu = "H100"
"""
    )
    [ok, gpu] = run_local(load_matrix(tmp_path / "m.toml"))
    assert ok["status"] == "ok", ok
    assert esr_deploy.load(ok["bundle"], digest=ok["digest"]).scale == 4
    assert gpu["status"] == "unschedulable" and "accelerator_type:H100" in gpu["error"]
