"""TensorRT optimisation profiles: which shapes an engine accepts (pure Python, any machine)."""

from __future__ import annotations

import pytest

from esr_deploy.backends.tensorrt_profiles import (
    FALLBACK_MIN_HW,
    ProfileShapes,
    optimization_profiles,
    select_profile,
)
from esr_deploy.errors import EsrDeployError, RecipeError
from esr_deploy.shapes import ShapeProfile

#: HR sizes (H, W) of Set5 and Set14
SET5_SET14_HR = [
    (512, 512), (288, 288), (256, 256), (280, 280), (344, 228),  # Set5
    (480, 500), (576, 720), (512, 512), (288, 352), (361, 250), (276, 276), (362, 500),
    (288, 352), (512, 512), (512, 512), (512, 768), (512, 512), (656, 529), (391, 586),
]  # fmt: skip


def test_landscape_and_portrait_profiles_for_a_1080p_max() -> None:
    profiles = optimization_profiles(ShapeProfile(opt=(256, 256), max=(1080, 1920), min=(8, 8)))
    assert [p.max for p in profiles] == [(1, 3, 1080, 1920), (1, 3, 1920, 1080)]
    assert all(p.min == (1, 3, 8, 8) and p.opt == (1, 3, 256, 256) for p in profiles)


def test_one_profile_for_a_square_max() -> None:
    profiles = optimization_profiles(ShapeProfile(opt=(64, 64), max=(512, 512), min=(4, 4)))
    assert profiles == [ProfileShapes((1, 3, 4, 4), (1, 3, 64, 64), (1, 3, 512, 512))]


def test_opt_is_clipped_into_min_max_and_transposed_for_portrait() -> None:
    landscape, portrait = optimization_profiles(
        ShapeProfile(opt=(2000, 2), max=(1080, 1920), min=(16, 16))
    )
    assert landscape.opt == (1, 3, 1080, 16)
    assert portrait.opt == (1, 3, 16, 1080)  # the portrait form (2, 2000) clipped
    for p in (landscape, portrait):
        assert all(lo <= o <= hi for lo, o, hi in zip(p.min, p.opt, p.max, strict=True))


def test_min_batch_and_channels_are_respected() -> None:
    profiles = optimization_profiles(ShapeProfile(min=(24, 40)), batch=2, channels=1)
    assert all(p.min == (2, 1, 24, 40) for p in profiles)
    assert all(p.max[:2] == (2, 1) and p.opt[:2] == (2, 1) for p in profiles)
    no_min = optimization_profiles(ShapeProfile())
    assert no_min[0].min[2:] == FALLBACK_MIN_HW


def test_dynamic_batch_gets_a_batch_profile_within_one_frames_memory() -> None:
    shape = ShapeProfile(opt=(256, 256), max=(1080, 1920), min=(15, 15))
    *frames, batched = optimization_profiles(shape, max_batch=8)
    assert len(frames) == 2 and all(p.max[0] == p.min[0] == 1 for p in frames)
    assert batched.min == (1, 3, 15, 15)
    assert batched.opt == (4, 3, 256, 256) and batched.max == (8, 3, 256, 256)
    assert select_profile([*frames, batched], (4, 3, 256, 256)) == 2
    assert select_profile([*frames, batched], (1, 3, 256, 256)) == 0
    assert 8 * 256 * 256 <= 1080 * 1920  # a full batch needs no more than one max frame


def test_min_above_max_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="64x64"):
        optimization_profiles(ShapeProfile(opt=(32, 32), max=(32, 1920), min=(64, 64)))


def test_every_benchmark_image_and_720p_frame_fits_a_profile() -> None:
    profiles = optimization_profiles(ShapeProfile(min=(8, 8)))
    sizes = [(h // s, w // s) for h, w in SET5_SET14_HR for s in (1, 2, 3, 4)]
    sizes += [(720, 1280), (1280, 720), (1080, 1920), (1920, 1080), (8, 8)]
    for h, w in sizes:
        index = select_profile(profiles, (1, 3, h, w))
        assert profiles[index].contains((1, 3, h, w)), (h, w)
    assert select_profile(profiles, (1, 3, 1280, 720)) == 1  # portrait needs the second


def test_select_profile_refuses_a_too_large_shape_naming_shape_and_ranges() -> None:
    profiles = optimization_profiles(ShapeProfile(min=(8, 8)))
    with pytest.raises(EsrDeployError) as info:
        select_profile(profiles, (1, 3, 2000, 2000))
    message = str(info.value)
    assert "1x3x2000x2000" in message
    assert "1x3x1080x1920" in message and "1x3x1920x1080" in message
    with pytest.raises(EsrDeployError, match="1x3x4x4"):
        select_profile(profiles, (1, 3, 4, 4))  # below min


def test_profile_round_trips_through_the_manifest_form() -> None:
    for p in optimization_profiles(ShapeProfile(min=(8, 8))):
        assert ProfileShapes.from_dict(p.to_dict()) == p
