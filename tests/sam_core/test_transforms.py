import numpy as np
import pytest
from segment_anything.utils.transforms import ResizeLongestSide as OfficialResize

from sam_core.transforms import ResizeLongestSide


@pytest.mark.oracle
@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (1, 1), (7, 1000), (1023, 1025), (333, 333)])
def test_preprocess_shape_matches_reference(shape):
    assert ResizeLongestSide.get_preprocess_shape(*shape, 1024) == OfficialResize.get_preprocess_shape(*shape, 1024)


def test_extremely_elongated_image_keeps_one_pixel_instead_of_zero():
    assert ResizeLongestSide.get_preprocess_shape(10000, 3, 1024) == (1024, 1)
    assert ResizeLongestSide.get_preprocess_shape(3, 10000, 1024) == (1, 1024)
    resized = ResizeLongestSide(1024).apply_image(np.zeros((10000, 3, 3), np.uint8))
    assert resized.shape == (1024, 1, 3)
