"""fastkd.adapters.adapter_for: the module it builds for each layout maps the student shape to the teacher's."""

import pytest
import torch
from torch import nn

from fastkd.adapters import FeatureAdapter, adapter_for


@pytest.mark.parametrize(
    "student, teacher, projection",
    [
        ((4, 16), (4, 32), nn.Linear),  # vectors
        ((4, 10, 16), (4, 10, 24), nn.Linear),  # tokens, channels last
        ((4, 12, 16), (4, 10, 16), nn.Identity),  # tokens: only the length differs
        ((4, 16, 8, 8), (4, 32, 8, 8), nn.Sequential),  # maps: 1×1 conv + BN
        ((4, 16, 8, 8), (4, 32, 4, 4), nn.Sequential),  # larger student map: pooled
        ((4, 16, 4, 4), (4, 16, 7, 7), nn.Identity),  # smaller student map: interpolated
    ],
)
def test_adapter_maps_the_student_shape_to_the_teacher_shape(student, teacher, projection):
    adapter = adapter_for(student, teacher)
    assert isinstance(adapter, FeatureAdapter) and isinstance(adapter.project, projection)
    x = torch.randn(student, requires_grad=True)
    out = adapter(x)
    assert out.shape == teacher
    out.sum().backward()
    assert x.grad.shape == student


def test_map_adapter_is_conv1x1_and_batchnorm_and_pools_a_larger_map():
    adapter = adapter_for((2, 3, 4, 4), (2, 5, 2, 2)).eval()
    conv, bn = adapter.project
    assert conv.kernel_size == (1, 1) and conv.bias is None and bn.num_features == 5
    x = torch.randn(2, 3, 4, 4)
    expected = torch.nn.functional.avg_pool2d(bn(conv(x)), 2)
    assert torch.allclose(adapter(x), expected, atol=1e-6)


@pytest.mark.parametrize(
    "student, teacher",
    [
        ((2, 3, 4, 4), (2, 3, 7, 7)),  # smaller in both dims
        ((2, 3, 8, 4), (2, 3, 6, 6)),  # larger in one dim, smaller in the other: interpolated, not pooled
        ((2, 3, 5, 5), (2, 4, 5, 9)),  # with a channel projection
    ],
)
def test_map_adapter_interpolates_bilinearly_unless_the_student_map_is_larger_in_both_dims(student, teacher):
    adapter = adapter_for(student, teacher).eval()
    x = torch.randn(student)
    expected = torch.nn.functional.interpolate(
        adapter.project(x), size=teacher[2:], mode="bilinear", align_corners=False
    )
    assert torch.allclose(adapter(x), expected, atol=1e-6)


@pytest.mark.parametrize("student, teacher", [((2, 5, 3), (2, 8, 3)), ((2, 9, 3), (2, 4, 6))])
def test_token_adapter_projects_the_channels_then_interpolates_linearly_along_the_tokens(student, teacher):
    adapter = adapter_for(student, teacher)
    x = torch.randn(student)
    projected = adapter.project(x)
    assert projected.shape == (*student[:2], teacher[2])
    expected = torch.nn.functional.interpolate(
        projected.transpose(1, 2), size=teacher[1], mode="linear", align_corners=False
    ).transpose(1, 2)
    assert torch.allclose(adapter(x), expected, atol=1e-6)


def test_equal_shapes_need_no_adapter():
    assert isinstance(adapter_for((2, 8, 3, 3), (2, 8, 3, 3)), nn.Identity)


@pytest.mark.parametrize(
    "student, teacher, message",
    [
        ((4, 16), (4, 8, 16), "same layout"),
        ((4, 2, 3, 4, 5), (4, 2, 3, 4, 6), "same layout"),
        ((4, 16), (8, 16), "same batch size"),
    ],
)
def test_unmappable_shapes_are_errors(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        adapter_for(student, teacher)
