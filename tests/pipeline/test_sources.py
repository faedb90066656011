"""Listing a prefix or glob: recursive, images by extension in any case, one streamed order."""
import types

import pytest

from pipeline.inputs import sources


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "corpus"
    for name in ("a.jpg", "B.JPG", "c.Png", "sub/d.jpeg", "sub/deeper/e.webp", "sub/notes.txt", "f.json", "g.tiff",
                 "sub-x.png"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root


def names(uris):
    return [u.split("/corpus/", 1)[1] for u in uris]


def test_prefix_is_walked_recursively_for_images_by_extension_any_case(tree):
    uris = list(sources.iter_image_uris(str(tree)))
    # Path components compared one by one: the folder "sub" comes before the file "sub-x.png",
    # although plain string order would put "sub-x.png" first ("-" < "/").
    assert names(uris) == ["B.JPG", "a.jpg", "c.Png", "g.tiff", "sub/d.jpeg", "sub/deeper/e.webp", "sub-x.png"]
    assert uris == sorted(uris, key=sources.listing_key) != sorted(uris)
    assert all(u.startswith(str(tree)) for u in uris)


def test_the_listing_is_streamed_not_collected(tree):
    listing = sources.iter_image_uris(str(tree))
    assert isinstance(listing, types.GeneratorType)
    assert names([next(listing), next(listing)]) == ["B.JPG", "a.jpg"]


def test_scheme_of_the_input_is_kept(tree):
    uris = list(sources.iter_image_uris(f"file://{tree}"))
    assert len(uris) == 7 and all(u.startswith(f"file://{tree}/") for u in uris)


def test_glob_matches_are_filtered_and_directories_walked(tree):
    assert names(sources.iter_image_uris(str(tree / "**" / "*.jp*g"))) == ["a.jpg", "sub/d.jpeg"]
    assert names(sources.iter_image_uris(str(tree / "su*"))) == ["sub/d.jpeg", "sub/deeper/e.webp", "sub-x.png"]


def test_bare_key_prefix_selects_matching_names(tree):
    assert names(sources.iter_image_uris(str(tree / "c"))) == ["c.Png"]
    assert names(sources.iter_image_uris(str(tree / "sub-"))) == ["sub-x.png"]


def test_input_exists_tells_a_typo_from_an_empty_listing(tree, tmp_path):
    assert sources.input_exists(str(tree)) and sources.input_exists(str(tree / "c"))
    assert sources.input_exists(str(tree / "*.json"))
    assert not sources.input_exists(str(tmp_path / "nope")) and not sources.input_exists(str(tree / "*.gif"))
    assert list(sources.iter_image_uris(str(tmp_path / "nope"))) == []


@pytest.mark.s3
def test_s3_prefix_listing_keeps_the_s3_scheme(s3):
    fs = s3.filesystem()
    for key in ("list-test/x/1.JPG", "list-test/x/y/2.png", "list-test/x/readme.md"):
        fs.pipe(f"images/{key}", b"x")
    assert list(sources.iter_image_uris("s3://images/list-test/x/")) == [
        "s3://images/list-test/x/1.JPG",
        "s3://images/list-test/x/y/2.png",
    ]
