"""Source readers on files the tests write: LAION Parquet (real column names), COCO captions JSON,
.txt and .jsonl prompt lists; and the up-front checks that name a bad argument."""

import json
import tarfile
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.curate.sources import detect_format, file_tag, plan_inputs, read_split


def write_laion(path, with_optional=True, row_group_size=None):
    cols = {
        "SAMPLE_ID": pa.array([101, 102, 103, 104], pa.int64()),
        "URL": ["http://x/1.jpg", "http://x/2.jpg", "http://x/3.jpg", None],
        "TEXT": pa.array([b"a cat", b"\xff\xfe broken", None, "caf\u00e9 au lait".encode()], pa.binary()),
        "HEIGHT": pa.array([480, 300, None, 1000], pa.int32()),
        "WIDTH": pa.array([640, 300, None, 200], pa.int32()),
        "LICENSE": ["?", "?", "?", "?"],
        "NSFW": ["UNLIKELY", "NSFW", "UNSURE", None],
        "similarity": [0.31, 0.29, 0.2, 0.35],
    }
    if with_optional:
        cols.update(punsafe=[0.01, 0.9, float("nan"), 0.2], pwatermark=[0.1, 0.2, 0.3, 0.95],
                    AESTHETIC_SCORE=[6.5, 5.1, 4.0, 7.2], hash=pa.array([1, 2, 3, 4], pa.int64()))
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return str(path)


def read_all(paths, fmt=None):
    return [r for split in plan_inputs(paths, fmt) for r in read_split(split)]


def test_laion_parquet_real_columns(tmp_path):
    path = write_laion(tmp_path / "part-00000.parquet", row_group_size=2)
    splits = plan_inputs([path])
    assert [(s.format, s.part) for s in splits] == [("laion", 0), ("laion", 1)]  # one split per row group
    records = read_all([path])
    assert [r["key"] for r in records] == [f"laion-{file_tag(path)}-{i}" for i in range(4)]
    first = records[0]
    assert first["caption"] == b"a cat" and first["url"] == "http://x/1.jpg"
    assert (first["width"], first["height"]) == (640, 480)
    assert first["source_id"] == "101" and first["nsfw"] == "UNLIKELY"
    assert first["laion_similarity"] == pytest.approx(0.31) and first["laion_aesthetic"] == pytest.approx(6.5)
    assert first["punsafe"] == pytest.approx(0.01) and first["pwatermark"] == pytest.approx(0.1)
    assert records[1]["caption"] == b"\xff\xfe broken"  # judged (rejected) later, not a read crash
    assert records[2]["caption"] is None and records[2]["punsafe"] is None  # NaN -> unknown
    assert records[2]["width"] is None
    assert records[3]["url"] is None and records[3]["source_id"] == "104"


def test_laion_missing_optional_and_required_columns(tmp_path):
    path = write_laion(tmp_path / "base.parquet", with_optional=False)
    records = read_all([path])
    assert len(records) == 4 and records[0]["punsafe"] is None and records[0]["laion_aesthetic"] is None
    pq.write_table(pa.table({"URL": ["u"], "caption_text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet.*'TEXT' or 'caption' or 'text'"):
        plan_inputs([str(tmp_path / "bad.parquet")])
    # lower-case names as img2dataset writes them are accepted too
    pq.write_table(pa.table({"url": ["u"], "caption": ["a dog"]}), tmp_path / "lower.parquet")
    assert read_all([str(tmp_path / "lower.parquet")])[0]["caption"] == b"a dog"


def test_laion_folder_and_glob(tmp_path):
    write_laion(tmp_path / "a.parquet")
    write_laion(tmp_path / "b.parquet")
    assert len(read_all([str(tmp_path)])) == 8
    assert len(read_all([str(tmp_path / "a*.parquet")])) == 4


def test_coco_captions_join(tmp_path):
    coco = {
        "info": {}, "licenses": [],
        "images": [{"id": 9, "file_name": "000000000009.jpg", "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg",
                    "width": 640, "height": 480},
                   {"id": 25, "file_name": "000000000025.jpg", "coco_url": "http://c/25.jpg", "width": 500, "height": 375}],
        "annotations": [{"id": 600 + i, "image_id": 9, "caption": f"caption {i} of nine"} for i in range(5)]
        + [{"id": 700, "image_id": 25, "caption": "a giraffe"}, {"id": 701, "image_id": 25, "caption": None},
           {"id": 702, "image_id": 999, "caption": "orphan annotation"}],
    }
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps(coco))
    records = read_all([str(path)])
    assert len(records) == 8
    nine = [r for r in records if r["url"] and r["url"].endswith("000000000009.jpg")]
    assert [r["caption"] for r in nine] == [f"caption {i} of nine" for i in range(5)]
    assert all((r["width"], r["height"]) == (640, 480) for r in nine)
    assert records[5]["key"] == f"coco-{file_tag(str(path))}-700" and records[5]["width"] == 500
    assert records[6]["caption"] is None
    assert records[7]["url"] is None and records[7]["error"] == "image_not_found: image_id 999 is not in 'images'"
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="other.json.*COCO"):
        plan_inputs([str(bad)])


def test_txt_and_jsonl(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_bytes(b"\xef\xbb\xbffirst prompt\n\n  \nsecond prompt\r\n\xff bad\n")
    records = read_all([str(txt)])
    assert [r["caption"] for r in records] == [b"first prompt", b"second prompt", b"\xff bad"]
    assert [r["source_id"] for r in records] == ["1", "4", "5"]  # line numbers
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"caption": "a", "url": "http://u"}\n{"prompt": "b"}\n{"text": null}\nnot json\n[1]\n\n{"TEXT": "c"}\n')
    records = read_all([str(jsonl)])
    assert [r["caption"] for r in records] == ["a", "b", None, None, None, "c"]
    assert records[0]["url"] == "http://u"
    assert records[3]["error"].startswith("bad_json") and records[4]["error"].startswith("bad_json")
    assert records[2]["error"] is None  # a null caption is judged later, not a JSON error


def test_webdataset_tar_written_by_hand(tmp_path):
    """The wds reader on a hand-made tar (the img2dataset-made one is in test_curate_download)."""
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k1.jpg", b"JPEGDATA"), ("k1.txt", b"caption one"),
                           ("k1.json", json.dumps({"url": "http://u/1", "original_width": 800, "original_height": 600,
                                                   "width": 256, "height": 192}).encode()),
                           ("k2.txt", b"caption two"), ("k2.json", b"{broken")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records = read_all([str(path)])
    assert [r["caption"] for r in records] == [b"caption one", b"caption two"]
    assert (records[0]["width"], records[0]["height"]) == (800, 600) and records[0]["url"] == "http://u/1"
    ref = records[0]["image_ref"]
    with open(path, "rb") as f:
        f.seek(ref["offset"])
        assert f.read(ref["size"]) == b"JPEGDATA"
    assert records[1]["image_ref"] is None and records[1]["error"].startswith("bad_json")
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(path.read_bytes()[:700] + b"\x00garbage" * 100)
    out = read_all([str(corrupt)])
    assert out[-1]["error"].startswith("corrupt_tar")


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="nothing-here.parquet.*matches no file"):
        plan_inputs([str(tmp_path / "nothing-here.parquet")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="data.csv.*--input_format"):
        plan_inputs([str(tmp_path / "data.csv")])
    with pytest.raises(ValueError, match="unknown --input_format 'csv'"):
        plan_inputs([str(tmp_path / "data.csv")], "csv")
    assert plan_inputs([str(tmp_path / "data.csv")], "txt")[0].format == "txt"
    assert detect_format("x/captions_val2017.json") == "coco"
