"""SamPredictor against segment-anything's SamPredictor on real, non-square photos.

Our model is loaded through ``load_sam`` from the reference's saved .pth via a ``file://`` URL.
"""
import numpy as np
import pytest
import torch

from sam_core import ImageEmbedding, SamPredictor, load_sam
from tests.sam_factory import make_official_sam, real_photos, save_official_checkpoint

pytestmark = pytest.mark.oracle
ATOL = 1e-3
PHOTOS = real_photos()


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    from segment_anything import SamPredictor as ReferencePredictor

    reference = make_official_sam(seed=1)
    path = save_official_checkpoint(reference, tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    ours = load_sam(path.resolve().as_uri())
    return SamPredictor(ours), ReferencePredictor(reference)


def _assert_outputs_match(got, expected, return_logits):
    masks, iou, low_res = got
    ref_masks, ref_iou, ref_low_res = expected
    assert masks.shape == ref_masks.shape and low_res.shape == ref_low_res.shape
    assert np.abs(low_res - ref_low_res).max() <= ATOL
    assert np.abs(iou - ref_iou).max() <= ATOL
    if return_logits:
        assert np.abs(masks - ref_masks).max() <= ATOL
    else:
        # Logits within 1e-3 may still fall on either side of 0 at a handful of pixels.
        assert masks.dtype == bool and np.mean(masks != ref_masks) < 1e-3


# Prompts in original-image pixels; each photo is at least 90 x 135.
PROMPTS = {
    "point": dict(point_coords=np.array([[60, 40]]), point_labels=np.array([1])),
    "negative_points": dict(point_coords=np.array([[60, 40], [20, 70], [100, 10]]), point_labels=np.array([1, 0, 0])),
    "box": dict(box=np.array([10, 15, 120, 80])),
    "box_and_points": dict(box=np.array([10, 15, 120, 80]), point_coords=np.array([[50, 50], [30, 20]]),
                           point_labels=np.array([1, 0])),
}


@pytest.mark.parametrize("photo_index", range(len(PHOTOS)))
def test_set_image_embeddings_and_sizes(predictors, photo_index):
    ours, reference = predictors
    ours.set_image(PHOTOS[photo_index])
    reference.set_image(PHOTOS[photo_index])
    assert ours.original_size == reference.original_size and ours.input_size == reference.input_size
    assert (ours.get_image_embedding() - reference.get_image_embedding()).abs().max().item() <= ATOL


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("multimask_output", [True, False])
@pytest.mark.parametrize("return_logits", [False, True])
def test_predict(predictors, prompt, multimask_output, return_logits):
    ours, reference = predictors
    photo = PHOTOS[0]
    ours.set_image(photo)
    reference.set_image(photo)
    kwargs = dict(PROMPTS[prompt], multimask_output=multimask_output, return_logits=return_logits)
    got = ours.predict(**kwargs)
    assert got[0].shape == ((3 if multimask_output else 1),) + photo.shape[:2]
    _assert_outputs_match(got, reference.predict(**kwargs), return_logits)


def test_mask_input_chaining(predictors):
    """Feed the best low-res logits of one call back as ``mask_input`` of the next."""
    ours, reference = predictors
    photo = PHOTOS[1]
    ours.set_image(photo)
    reference.set_image(photo)
    first = dict(point_coords=np.array([[50, 100]]), point_labels=np.array([1]))
    _, iou, low_res = ours.predict(**first)
    _, ref_iou, ref_low_res = reference.predict(**first)
    best = int(np.argmax(ref_iou))
    second = dict(point_coords=np.array([[50, 100], [70, 180]]), point_labels=np.array([1, 0]),
                  multimask_output=False)
    got = ours.predict(mask_input=low_res[best][None], **second)
    expected = reference.predict(mask_input=ref_low_res[best][None], **second)
    _assert_outputs_match(got, expected, return_logits=False)
    # The mask input must change the answer, or this test would prove nothing.
    assert np.abs(got[2] - ours.predict(**second)[2]).max() > 1e-3


@pytest.mark.parametrize("multimask_output", [True, False])
def test_predict_torch_many_prompts(predictors, multimask_output):
    ours, reference = predictors
    photo = PHOTOS[2]
    ours.set_image(photo)
    reference.set_image(photo)
    generator = torch.Generator().manual_seed(5)
    h, w = photo.shape[:2]
    coords = torch.rand(12, 2, 2, generator=generator) * torch.tensor([w, h])
    labels = torch.randint(0, 2, (12, 2), generator=generator)
    corners = torch.rand(12, 2, 2, generator=generator).sort(dim=1).values * torch.tensor([w, h])
    boxes = corners.reshape(12, 4)
    args = (
        ours.transform.apply_coords_torch(coords, (h, w)),
        labels,
        ours.transform.apply_boxes_torch(boxes, (h, w)),
    )
    ref_args = (
        reference.transform.apply_coords_torch(coords, (h, w)),
        labels,
        reference.transform.apply_boxes_torch(boxes, (h, w)),
    )
    masks, iou, low_res = ours.predict_torch(*args, multimask_output=multimask_output, return_logits=True)
    ref_masks, ref_iou, ref_low_res = reference.predict_torch(*ref_args, multimask_output=multimask_output,
                                                              return_logits=True)
    assert masks.shape == (12, 3 if multimask_output else 1, h, w)
    for a, b in ((masks, ref_masks), (iou, ref_iou), (low_res, ref_low_res)):
        assert (a - b).abs().max().item() <= ATOL


def test_set_images_is_one_batch_equal_to_set_image(predictors):
    ours, reference = predictors
    embeddings = ours.set_images(PHOTOS)
    assert len(embeddings) == len(PHOTOS) and all(isinstance(e, ImageEmbedding) for e in embeddings)
    prompt = dict(point_coords=np.array([[40, 30]]), point_labels=np.array([1]))
    for photo, embedding in zip(PHOTOS, embeddings):
        reference.set_image(photo)
        ours.use_embedding(embedding)
        assert embedding.features.shape == (1, 32, 16, 16)
        assert embedding.original_size == photo.shape[:2] and embedding.input_size == reference.input_size
        assert (embedding.features - reference.features).abs().max().item() <= ATOL
        _assert_outputs_match(ours.predict(**prompt), reference.predict(**prompt), return_logits=False)


def test_bgr_input(predictors):
    ours, reference = predictors
    photo = PHOTOS[0]
    ours.set_image(np.ascontiguousarray(photo[..., ::-1]), image_format="BGR")
    reference.set_image(photo)
    assert (ours.features - reference.features).abs().max().item() <= ATOL


def test_errors_before_an_image_and_on_bad_input(predictors):
    ours, _ = predictors
    ours.reset_image()
    with pytest.raises(RuntimeError, match="set_image"):
        ours.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    with pytest.raises(RuntimeError):
        ours.get_image_embedding()
    with pytest.raises(ValueError, match="uint8"):
        ours.set_image(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="image_format"):
        ours.set_image(PHOTOS[0], image_format="RGBA")
    ours.set_image(PHOTOS[0])
    with pytest.raises(ValueError, match="point_labels"):
        ours.predict(point_coords=np.array([[1, 1]]))
    with pytest.raises(ValueError, match="one box"):
        ours.predict(box=np.array([[1, 1, 5, 5], [2, 2, 6, 6]]))
    assert ours.is_image_set and ours.device == torch.device("cpu")


def test_transform_matches_reference():
    from segment_anything.utils.transforms import ResizeLongestSide as Reference

    from sam_core import ResizeLongestSide

    ours, reference = ResizeLongestSide(256), Reference(256)
    for photo in PHOTOS:
        assert np.array_equal(ours.apply_image(photo), reference.apply_image(photo))
        coords = np.array([[0.0, 0.0], [photo.shape[1], photo.shape[0]], [17.5, 3.25]])
        np.testing.assert_allclose(ours.apply_coords(coords, photo.shape[:2]),
                                   reference.apply_coords(coords, photo.shape[:2]))
        boxes = np.array([[1, 2, 30, 40], [0, 0, photo.shape[1], photo.shape[0]]])
        np.testing.assert_allclose(ours.apply_boxes(boxes, photo.shape[:2]),
                                   reference.apply_boxes(boxes, photo.shape[:2]))
        # The reference's apply_image_torch reads (B, C) as (H, W), a known bug; ours resizes to
        # the same shape as the PIL path and stays within antialiasing noise of it.
        image = torch.as_tensor(np.array(photo)).permute(2, 0, 1)[None].float()
        resized = ours.apply_image_torch(image)[0].permute(1, 2, 0)
        pil = torch.as_tensor(ours.apply_image(photo)).float()
        assert resized.shape == pil.shape and (resized - pil).abs().mean().item() < 1.0
        torch.testing.assert_close(ours.apply_boxes_torch(torch.tensor(boxes, dtype=torch.float), photo.shape[:2]),
                                   reference.apply_boxes_torch(torch.tensor(boxes, dtype=torch.float), photo.shape[:2]))
