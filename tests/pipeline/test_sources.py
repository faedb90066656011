"""Input listing: prefixes, globs, manifests, case-insensitive extensions, resume subtraction."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sources


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "corpus"
    for name in ("a.jpg", "B.JPG", "c.Png", "sub/d.jpeg", "sub/deeper/e.webp", "sub/notes.txt", "f.json", "g.tiff"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root


def names(uris):
    return [u.rsplit("/", 1)[1] for u in uris]


def test_prefix_is_walked_recursively_for_images_by_extension_any_case(tree):
    uris = sources.list_inputs(str(tree))
    assert names(uris) == ["B.JPG", "a.jpg", "c.Png", "g.tiff", "d.jpeg", "e.webp"]
    assert all(u.startswith(str(tree)) for u in uris)


def test_scheme_of_the_input_is_kept(tree):
    uris = sources.list_inputs(f"file://{tree}")
    assert uris and all(u.startswith(f"file://{tree}/") for u in uris)


def test_glob_matches_are_filtered_and_directories_walked(tree):
    assert names(sources.list_inputs(str(tree / "**" / "*.jp*g"))) == ["a.jpg", "d.jpeg"]
    assert names(sources.list_inputs(str(tree / "su*"))) == ["d.jpeg", "e.webp"]


def test_bare_key_prefix_selects_matching_names(tree):
    assert names(sources.list_inputs(str(tree / "c"))) == ["c.Png"]


def test_text_manifest_keeps_uris_as_written_and_skips_blanks_and_comments(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text("# corpus\ns3://bucket/x.jpg\n\n  s3://bucket/a.png  \ns3://bucket/x.jpg\nhttps://h/o.bin\n")
    assert sources.list_inputs(str(manifest)) == ["https://h/o.bin", "s3://bucket/a.png", "s3://bucket/x.jpg"]


def test_parquet_manifest_reads_the_uri_column(tmp_path):
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": ["s3://b/2.jpg", "s3://b/1.jpg", None], "other": [1, 2, 3]}), manifest)
    assert sources.list_inputs(str(manifest)) == ["s3://b/1.jpg", "s3://b/2.jpg"]


def test_parquet_manifest_without_uri_column_is_a_clear_error(tmp_path):
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"]}), manifest)
    with pytest.raises(ValueError, match="no 'uri' column"):
        sources.list_inputs(str(manifest))


def test_limit_takes_the_first_n_of_the_sorted_list(tree):
    assert sources.list_inputs(str(tree), limit=2) == sources.list_inputs(str(tree))[:2]


def test_missing_input_lists_nothing(tmp_path):
    assert sources.list_inputs(str(tmp_path / "nope")) == []


def test_pending_subtracts_written_uris_in_order():
    assert sources.pending(["c", "a", "b"], {"a"}) == ["c", "b"]


@pytest.mark.s3
def test_s3_prefix_listing_keeps_the_s3_scheme(s3):
    fs = s3.filesystem()
    for key in ("list-test/x/1.JPG", "list-test/x/y/2.png", "list-test/x/readme.md"):
        fs.pipe(f"images/{key}", b"x")
    assert sources.list_inputs("s3://images/list-test/x/") == [
        "s3://images/list-test/x/1.JPG",
        "s3://images/list-test/x/y/2.png",
    ]
