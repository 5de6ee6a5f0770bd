"""``build --executor ray``: tasks run as Ray tasks (a local Ray instance of 2 CPUs here)
and give the bytes of a local build; bad executor options are named."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import write_build_project

pytest.importorskip("onnx")
ray = pytest.importorskip("ray")

from ifp_compile import executors  # noqa: E402
from ifp_compile.build import BuildError, build, verify  # noqa: E402
from tests.test_shared_graphs import _pick, files_of  # noqa: E402


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray")
    g = np.random.default_rng(11)
    masks = {f"t{i}": [_pick(g, 24), _pick(g, 40, soft=True)] for i in range(5)}
    masks["t5"] = [np.ones(64, np.float32), _pick(g, 10)]
    write_build_project(d, masks, {name: name for name in masks})
    return d, masks


def test_a_ray_build_equals_a_local_build(project, tmp_path, monkeypatch):
    d, masks = project
    made, make = [], executors.make_executor

    def recording(*args):
        made.append(make(*args))
        return made[-1]

    monkeypatch.setattr(executors, "make_executor", recording)
    report = build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "ray", formats=("onnx", "pt2"),
                   executor="ray", jobs=2)
    assert sorted(report.built) == sorted(masks) and not report.failed
    assert not ray.is_initialized()  # the build's own Ray instance is shut down
    # one Ray task per task: for t0 and t5 (the first of their signatures) the ONNX part,
    # their pt2 part being the graph pass in this process; the other four whole, by the plan
    assert made[0].submitted == len(masks)
    monkeypatch.undo()
    build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "local", formats=("onnx", "pt2"))
    assert files_of(tmp_path / "ray") == files_of(tmp_path / "local")
    assert verify(tmp_path / "ray") == sorted(masks)


def test_bad_executor_options_are_named(project, tmp_path):
    d, _ = project
    with pytest.raises(BuildError, match="unknown executor 'slurm'"):
        build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "x", executor="slurm")
    with pytest.raises(BuildError, match="--ray-address applies to --executor ray"):
        build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "x", ray_address="auto")
