"""``upscale --ray``: a real Ray Data actor pool against the local path, on real images.

One local Ray (2 CPUs) for the module. The bundle is the small hand-made x2 network of the
runtime tests (ONNX Runtime), so that each image takes milliseconds and the test measures Ray's
behaviour: outputs equal byte for byte to the local path's, a broken file reported and
skipped, a re-run resuming, and an actor killed mid-job without losing an image.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image
from runtime.test_upscaler import _write_bundle
from typer.testing import CliRunner

from esr_deploy.cli import app
from esr_deploy.errors import BundleError, TargetUnavailable
from esr_deploy.runtime.upscaler import load, upscale_jobs
from esr_deploy.serving.ray_batch import (
    RayUpscaleRequest,
    UpscaleActor,
    upscale_on_ray,
)
from esr_deploy.serving.ray_support import import_ray


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> object:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    # this module's actor subclass must travel by value (tests/ is not on the workers' path)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, sr_data_dir: Path) -> Path:
    """Set5 crops (RGB, grey, RGBA) in a folder with a sub-folder, and one broken file."""
    folder = tmp_path_factory.mktemp("images") / "in"
    (folder / "sub").mkdir(parents=True)
    hr = sorted((sr_data_dir / "Set5" / "HR").glob("*.png"))
    for i, path in enumerate(hr):
        rgb = np.asarray(Image.open(path).convert("RGB"))[:60, :70]
        image = Image.fromarray(rgb)
        if i == 1:
            image = image.convert("L")
        if i == 2:
            image = image.convert("RGBA")
        image.save(folder / ("sub" if i % 2 else ".") / f"{path.stem}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder


def _local_outputs(bundle: Path, images: Path, out: Path) -> dict[str, bytes]:
    jobs = upscale_jobs([images], out)
    records, skipped = load(bundle).upscale_files(jobs)
    assert skipped == 1 and len(records) == 5
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.png")}


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.png")}


def test_ray_outputs_equal_the_local_path_and_a_rerun_resumes(
    bundle: Path, images: Path, tmp_path: Path
) -> None:
    local = _local_outputs(bundle, images, tmp_path / "local")
    request = RayUpscaleRequest(bundle, (images,), tmp_path / "ray", actors=2)
    result = upscale_on_ray(request)
    assert len(result.written) == 5 and result.resumed == 0
    [failed] = result.failed
    assert failed["input"].endswith("broken.png") and "broken.png" in failed["error"]
    assert _outputs(tmp_path / "ray") == local  # byte for byte, each file

    # a re-run skips what is written; only the broken file is tried (and fails) again
    os.utime(tmp_path / "ray" / "in" / "baby.png", (0, 0))
    again = upscale_on_ray(request)
    assert again.resumed == 5 and len(again.records) == 1 and again.failed
    assert (tmp_path / "ray" / "in" / "baby.png").stat().st_mtime == 0  # not rewritten


class DyingActor(UpscaleActor):
    """Kills its own process (an actor crash, not an exception) at the first job on bird.png;
    the marker file makes it happen once across the pool."""

    marker = ""  # set by the test; travels with the class (pickled by value)

    def upscale_one(self, job):  # type: ignore[no-untyped-def]
        marker = self.marker
        if job.input.name == "bird.png":
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(1)
        return super().upscale_one(job)


def test_an_actor_dying_mid_job_loses_no_image(bundle: Path, images: Path, tmp_path: Path) -> None:
    local = _local_outputs(bundle, images, tmp_path / "local")
    out = tmp_path / "ray" / "out"
    request = RayUpscaleRequest(bundle, (images,), out, actors=2)
    DyingActor.marker = str(tmp_path / "died-once")
    result = upscale_on_ray(request, actor_cls=DyingActor)
    assert (tmp_path / "died-once").exists()  # an actor did die
    assert len(result.written) == 5 and len(result.failed) == 1
    assert _outputs(out) == local


def test_an_edited_bundle_is_refused_before_any_work(
    bundle: Path, images: Path, tmp_path: Path
) -> None:
    request = RayUpscaleRequest(
        bundle, (images,), tmp_path / "out", digest="sha256:" + "0" * 64, actors=1
    )
    with pytest.raises(BundleError, match="expected sha256:0000"):
        upscale_on_ray(request)
    assert not (tmp_path / "out").exists()


def test_cli_upscale_ray(bundle: Path, images: Path, tmp_path: Path) -> None:
    local = _local_outputs(bundle, images, tmp_path / "local")
    out = tmp_path / "ray"
    args = ["upscale", str(bundle), str(images), "-o", str(out), "--ray", "local"]
    result = CliRunner().invoke(app, [*args, "--actors", "1", "--json"])
    assert result.exit_code == 2, result.output  # the broken file
    assert "broken.png" in result.stderr and "1 of 6 images were skipped" in result.stderr
    assert _outputs(out) == local
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 5


def test_missing_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees without the extra
    with pytest.raises(TargetUnavailable, match=r"pip install 'esr-deploy\[ray\]'"):
        import_ray()


def test_a_filesystem_uri_is_read_through_pyarrow(
    bundle: Path, images: Path, tmp_path: Path
) -> None:
    """``file://`` URIs go through pyarrow's filesystem layer (as ``s3://`` would), and the
    outputs are still the local path's, byte for byte."""
    local = _local_outputs(bundle, images, tmp_path / "local")
    request = RayUpscaleRequest(bundle, (f"file://{images}",), tmp_path / "ray", actors=1)
    result = upscale_on_ray(request)
    assert len(result.written) == 5
    assert all(r["input"].startswith("file:///") for r in result.records)
    [failed] = result.failed
    assert failed["input"] == f"file://{images}/broken.png"
    assert f"file://{images}/broken.png" in failed["error"]
    assert _outputs(tmp_path / "ray") == local
