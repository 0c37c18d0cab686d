"""validate/batch.py: a batch of different images vs single runs, on a real ONNX Runtime engine.

The engine is the bundled RLFN exported here once (dynamic batch), loaded by the ort-fp32
backend; a deliberately broken engine (the same session, batch order reversed) must fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esr_deploy.backends.base import EngineSession
from esr_deploy.backends.onnxruntime import OnnxRuntimeCPU
from esr_deploy.data import load_validation_set
from esr_deploy.errors import ValidationError
from esr_deploy.export import export_onnx
from esr_deploy.loading.detect import ModelSource, load_model
from esr_deploy.paths import default_val_dir, example_checkpoint
from esr_deploy.validate.batch import CHECK_BATCH, check_batch, measure_throughput


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> tuple[EngineSession, object, object]:
    torch.set_num_threads(1)
    loaded = load_model(ModelSource(checkpoint=example_checkpoint()))
    folder = tmp_path_factory.mktemp("batch")
    recipe = loaded.recipe
    export = export_onnx(loaded.model, folder / "model.onnx", recipe.scale, recipe.data_range)
    backend = OnnxRuntimeCPU()
    built = backend.build(export.path, folder, "fp32")
    return backend.load(folder / built.engine_file, built.settings), recipe, export


class _Reversed(EngineSession):
    def __init__(self, inner: EngineSession) -> None:
        self.inner = inner

    def run(self, lr: np.ndarray) -> np.ndarray:
        return self.inner.run(lr)[::-1]


def test_batch_equals_single_runs_and_a_mixed_up_batch_fails(engine: tuple) -> None:
    session, recipe, export = engine
    sets = [load_validation_set(default_val_dir(), recipe.scale)]
    n = min(CHECK_BATCH, len(sets[0]))
    record = check_batch(session, sets, recipe, export.input_range.min_hw, 60.0)
    assert record["shape"].startswith(f"{n}x3x")
    assert record["min_psnr_vs_single"] >= 60.0
    with pytest.raises(ValidationError, match="differs from"):
        check_batch(_Reversed(session), sets, recipe, export.input_range.min_hw, 60.0)


def test_throughput_is_images_per_second_at_both_batches(engine: tuple) -> None:
    session, recipe, _ = engine
    batches: list[int] = []

    class Counted:
        def run(self, lr: np.ndarray) -> np.ndarray:
            batches.append(lr.shape[0])
            return session.run(lr)

    result = measure_throughput(Counted(), (32, 32), recipe.data_range, runs=2, warmup=1)
    # one warm-up round, then 2 timed rounds, alternating, none re-warmed
    assert batches == [1, CHECK_BATCH] * 3
    assert set(result) == {"1x3x32x32", f"{CHECK_BATCH}x3x32x32"}
    for key, r in result.items():
        batch = int(key.split("x")[0])
        assert r["images_per_s"] == pytest.approx(1000.0 * batch / r["median_ms"])
