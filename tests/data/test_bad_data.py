"""Bad data is a clear DataError naming split, row (or file) and what to do, found before training; or it works."""

import io
import logging

import datasets
import PIL.Image
import pytest
import torch

import esam_hf.data.cifar as cifar
from esam_hf.data import (
    ROW_COLUMN,
    DataError,
    build_datasets,
    check_images,
    cifar_tensors,
    decode_image,
    image_transform,
    load_splits,
    resolve_dataset,
    timm_data_config,
    with_image_transform,
)

BROKEN = {"bytes": b"not an image", "path": "broken.png"}
EMBEDDED_BROKEN = {"bytes": b"\x89PNG truncated", "path": None}  # bytes in parquet, no file name
SMALL = {"input_size": (3, 8, 8)}  # timm path at a tiny size: fast


def png(value, size=(8, 8)):
    """An image whose red channel is `value`, so a decoded row can be traced back to the row that was written."""
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, (value, 0, 0)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"img{value}.png"}


def split_with(n, bad=None, size=(8, 8)):
    """n images labelled 0, 1, 0, 1...; `bad` maps rows to the cell written there instead."""
    bad = bad or {}
    return {"image": [bad.get(i, png(i, size)) for i in range(n)], "label": [i % 2 for i in range(n)]}


def drain(dataset, batch_size=4):
    """Read a dataset the way the Trainer does: a DataLoader fetching whole batches."""
    for _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=list):
        pass


# 1. Decode errors name split, row and file; on every path, for both splits.

@pytest.mark.parametrize("bad_split", ["train", "test"])
@pytest.mark.parametrize("cell, path_text", [(BROKEN, r" \(path='broken.png'\)"), (EMBEDDED_BROKEN, "")])
def test_timm_path_decode_error_names_split_row_and_path(make_dataset, bad_split, cell, path_text):
    splits = {"train": split_with(12), "test": split_with(10)}
    splits[bad_split] = split_with(len(splits[bad_split]["label"]), bad={7: cell})
    data = build_datasets(resolve_dataset(str(make_dataset(splits))), SMALL)
    bad_dataset = data.train_dataset if bad_split == "train" else data.eval_dataset
    other = data.eval_dataset if bad_split == "train" else data.train_dataset
    drain(other)
    with pytest.raises(DataError, match=rf"cannot decode the image at row 7 of split '{bad_split}'{path_text}: "
                                        r"UnidentifiedImageError.*Fix or remove that row.*check_images"):
        drain(bad_dataset)


def test_row_numbers_are_the_split_rows_after_subsampling(make_dataset):
    # Row 13 of 20 is broken; after subsampling it sits at another position, but the error must name row 13.
    root = make_dataset({"train": split_with(20, bad={13: BROKEN})})
    spec = resolve_dataset(str(root))
    train, _, _ = load_splits(spec, max_train_samples=19, seed=0)
    rows = list(train[ROW_COLUMN])
    assert 13 in rows and rows.index(13) != 13
    # Each kept image still carries its own row: its red value is the row it was written at.
    good = [i for i, row in enumerate(rows) if row != 13]
    assert [train[i]["image"].getpixel((0, 0))[0] for i in good] == [rows[i] for i in good]
    data = build_datasets(spec, SMALL, max_train_samples=19, seed=0)
    with pytest.raises(DataError, match=r"at row 13 of split 'train' \(path='broken.png'\)"):
        drain(data.train_dataset)


def test_cifar_cache_build_lists_every_bad_row_with_its_split(make_dataset, cache_dir):
    bad = {3: BROKEN, 9: None, 10: EMBEDDED_BROKEN}
    root = make_dataset({"train": split_with(12, size=(32, 32)), "test": split_with(12, bad, size=(32, 32))})
    spec = resolve_dataset(str(root))
    assert spec.kind == "cifar"
    with pytest.raises(DataError) as error:
        build_datasets(spec)
    message = str(error.value)
    assert message.startswith("3 of the 12 images of split 'test' cannot be decoded")
    assert "row 3 (path='broken.png'): UnidentifiedImageError" in message
    assert "row 9: the cell is null (no image)" in message
    assert "row 10: UnidentifiedImageError" in message
    assert message.index("row 3") < message.index("row 9") < message.index("row 10")
    assert len(list(cache_dir.glob("*.pt"))) == 1  # the good training split only


def test_wrong_size_on_the_cifar_path_names_split_and_row(make_dataset, cache_dir):
    cells = split_with(6, size=(32, 32))
    cells["image"][4] = png(4, size=(40, 32))
    spec = resolve_dataset(str(make_dataset({"train": cells})), kind="cifar")
    with pytest.raises(DataError, match=r"image at row 4 of split 'train' is 40x32; the CIFAR path needs 32x32"):
        build_datasets(spec)


# 2. check_images: every bad row at once, before training.

@pytest.mark.parametrize("num_workers", [0, 2])
def test_check_images_reports_all_bad_rows(make_dataset, num_workers):
    bad = {2: BROKEN, 300: None, 517: EMBEDDED_BROKEN}  # more rows than one chunk of work
    root = make_dataset({"train": split_with(600, bad)})
    train, _, _ = load_splits(resolve_dataset(str(root)))
    with pytest.raises(DataError) as error:
        check_images(train, "image", "train", num_workers=num_workers, progress=False)
    message = str(error.value)
    assert message.startswith("3 of the 600 images of split 'train' cannot be decoded:")
    lines = [line.strip() for line in message.splitlines()[1:4]]
    assert [line.split(" ")[1].rstrip(":") for line in lines] == ["2", "300", "517"]
    assert "path='broken.png'" in lines[0] and "null" in lines[1]
    check_images(train.select([0, 1, 3]), "image", "train", progress=False)  # good rows: no error


def test_check_images_lists_at_most_20_rows_and_names_the_datasets_split(make_dataset):
    root = make_dataset({"train": split_with(4), "test": split_with(30, {i: BROKEN for i in range(25)})})
    _, test, _ = load_splits(resolve_dataset(str(root), eval_split="test"))
    with pytest.raises(DataError) as error:
        check_images(test, "image", progress=False)  # split name from the dataset itself
    message = str(error.value)
    assert message.startswith("25 of the 30 images of split 'test'") and "... (5 more)" in message
    assert sum(line.startswith("  row ") for line in message.splitlines()) == 20


@pytest.mark.parametrize("bad_split, flag", [("train", "check_train_images"), ("test", "check_eval_images")])
def test_build_datasets_checks_images_before_returning(make_dataset, bad_split, flag):
    splits = {"train": split_with(8), "test": split_with(8)}
    splits[bad_split] = split_with(8, bad={5: BROKEN})
    spec = resolve_dataset(str(make_dataset(splits)))
    data = build_datasets(spec, SMALL)  # unchecked: builds, and would fail only when the row is read
    assert data.eval_dataset is not None
    with pytest.raises(DataError, match=rf"1 of the 8 images of split '{bad_split}'.*\n  row 5 \(path='broken.png'\)"):
        build_datasets(spec, SMALL, **{flag: True})


# 3. A null image cell.

def test_null_image_cell_names_split_and_row(make_dataset):
    root = make_dataset({"train": split_with(6, bad={4: None})})
    data = build_datasets(resolve_dataset(str(root)), SMALL)
    with pytest.raises(DataError, match=r"cannot decode the image at row 4 of split 'train': the cell is null"):
        drain(data.train_dataset)
    with pytest.raises(DataError, match=r"the image at row 2 of split 'x': the cell is null"):
        decode_image(None, where="at row 2 of split 'x'")


def test_a_dataset_made_elsewhere_still_reports_rows(hf_cache):
    images = [png(0), png(1), None]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0]}).cast_column("image", datasets.Image())
    out = with_image_transform(ds, "image", "label", image_transform(timm_data_config(SMALL), False), split="mine")
    assert out[1]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(DataError, match="at row 2 of split 'mine'"):
        out[2]


def test_corrupt_first_image_fails_kind_detection_clearly(make_dataset):
    root = make_dataset({"train": split_with(4, bad={0: BROKEN})})
    with pytest.raises(DataError, match=r"at row 0 of split 'train' \(path='broken.png'\)"):
        resolve_dataset(str(root))


# 4. Labels without a ClassLabel feature.

def _plain_features(label_type):
    return datasets.Features({"image": datasets.Image(), "label": datasets.Value(label_type)})


def test_integer_labels_get_derived_class_names(make_dataset, caplog):
    train = {"image": [png(i) for i in range(6)], "label": [0, 1, 2, 0, 1, 2]}
    test = {"image": [png(i) for i in range(3)], "label": [0, 3, 1]}
    root = make_dataset({"train": train, "test": test}, features=_plain_features("int64"))
    spec = resolve_dataset(str(root), label_column="label")
    with caplog.at_level(logging.INFO, logger="esam_hf.data"):
        tr, te, names = load_splits(spec)
    assert names == ["0", "1", "2", "3"]  # 0..max over both splits
    assert tr["label"][:] == [0, 1, 2, 0, 1, 2] and te["label"][:] == [0, 3, 1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "not a ClassLabel: 4 classes named '0'..'3'" in warnings[0]
    assert "'test' has 1 class(es) absent from training split 'train': '3'" in warnings[1]
    # An explicit override still wins.
    assert load_splits(resolve_dataset(str(root), label_column="label", class_names=list("abcd")))[2] == list("abcd")


def test_string_labels_become_the_same_ids_in_both_splits(make_dataset, caplog):
    train_labels = ["dog", "cat", "bird", "cat", "dog", "dog"]
    test_labels = ["cat", "dog", "emu"]  # "emu" is never trained on
    root = make_dataset({"train": {"image": [png(i) for i in range(6)], "label": train_labels},
                         "test": {"image": [png(i) for i in range(3)], "label": test_labels}},
                        features=_plain_features("string"))
    spec = resolve_dataset(str(root), label_column="label")
    with caplog.at_level(logging.INFO, logger="esam_hf.data"):
        train, test, names = load_splits(spec)
    assert names == ["bird", "cat", "dog", "emu"]
    assert train["label"][:] == [2, 1, 0, 1, 2, 2] and test["label"][:] == [1, 2, 3]
    assert train.features["label"].names == names
    assert any("'test' has 1 class(es) absent from training split 'train': 'emu'" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    # Through the pipeline, subsampled, labels stay attached to their images.
    data = build_datasets(spec, SMALL, max_train_samples=4, seed=0)
    sub, _, _ = load_splits(spec, max_train_samples=4, seed=0)
    expected = [names.index(train_labels[row]) for row in sub[ROW_COLUMN]]
    assert [data.train_dataset[i]["labels"] for i in range(4)] == expected
    with pytest.raises(DataError, match=r"split 'train' .* labels that are not class names: 'bird', 'dog'"):
        load_splits(resolve_dataset(str(root), label_column="label", class_names=["cat", "emu"]))


@pytest.mark.parametrize("labels, match", [
    ([0, 0, 0, 0], r"split 'train' .* has 1 class\(es\) .* out of 1 \('0'\); a classifier needs at least 2"),
    ([0, 1, -1, 1], r"1 label\(s\) outside \[0, 2\) \(row 2: -1\)"),
    ([0, 1, None, 1], r"1 row\(s\) without a label in 'label' \(rows 2\)"),
])
def test_bad_integer_labels(make_dataset, labels, match):
    root = make_dataset({"train": {"image": [png(i) for i in range(4)], "label": labels}}, features=_plain_features("int64"))
    with pytest.raises(DataError, match=match):
        load_splits(resolve_dataset(str(root), label_column="label"))


def test_null_string_label_and_mixed_label_types(make_dataset, tmp_path):
    root = make_dataset({"train": {"image": [png(i) for i in range(3)], "label": ["a", None, "b"]}},
                        features=_plain_features("string"))
    with pytest.raises(DataError, match=r"split 'train' .* 1 row\(s\) without a label .*\(rows 1\)"):
        load_splits(resolve_dataset(str(root), label_column="label"))
    # Parquet files of one directory are cast to one schema; saved splits keep their own.
    strings = datasets.Dataset.from_dict({"image": [png(0), png(1)], "label": ["a", "b"]}, features=_plain_features("string"))
    ints = datasets.Dataset.from_dict({"image": [png(0)], "label": [1]}, features=_plain_features("int64"))
    datasets.DatasetDict(train=strings, test=ints).save_to_disk(tmp_path / "mixed")
    with pytest.raises(DataError, match=r"holds strings in one split and numbers in the other.*'test': int64"):
        load_splits(resolve_dataset(str(tmp_path / "mixed"), label_column="label"))


# 5. Only a validation split, single files, no evaluation.

def test_missing_train_split_says_which_flag_to_pass(imagenet_dir):
    with pytest.raises(DataError, match=r"split 'train' not found.*available splits: \['validation'\]\. "
                                        r"Pass --train_split NAME"):
        resolve_dataset(str(imagenet_dir))
    spec = resolve_dataset(str(imagenet_dir), train_split="validation", eval_split="none")
    assert (spec.train_split, spec.eval_split) == ("validation", None)
    with pytest.raises(DataError, match=r"split 'test' not found.*Pass --eval_split NAME \(or none to skip evaluation\)"):
        load_splits(resolve_dataset(str(imagenet_dir), train_split="validation", eval_split="test"))


def test_eval_split_none_turns_evaluation_off(make_dataset, cache_dir):
    root = make_dataset({"train": split_with(6), "test": split_with(4)})
    assert resolve_dataset(str(root)).eval_split == "test"
    for value in ("none", "None"):
        spec = resolve_dataset(str(root), eval_split=value)
        assert spec.eval_split is None and load_splits(spec)[1] is None
    assert resolve_dataset("cifar10-subset", eval_split="none").eval_split is None
    assert build_datasets(resolve_dataset("cifar10-subset", eval_split="none"), max_train_samples=8).eval_dataset is None


def _single_file(tmp_path, layout):
    ds = datasets.Dataset.from_dict(split_with(6), features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}))
    if layout == ".parquet":
        path = tmp_path / "one.parquet"
        ds.to_parquet(path)
    elif layout == ".arrow":
        ds.save_to_disk(tmp_path / "saved")
        path = next((tmp_path / "saved").glob("*.arrow"))
    elif layout == "save_to_disk":
        path = tmp_path / "saved"
        ds.save_to_disk(path)
    else:  # a directory of parquet files whose names say nothing about splits
        path = tmp_path / "flat"
        path.mkdir()
        ds.select(range(3)).to_parquet(path / "part-a.parquet")
        ds.select(range(3, 6)).to_parquet(path / "part-b.parquet")
    return path


@pytest.mark.parametrize("layout", [".parquet", ".arrow", "save_to_disk", "flat directory"])
def test_single_files_and_flat_directories_load_as_train(tmp_path, hf_cache, layout):
    path = _single_file(tmp_path, layout)
    spec = resolve_dataset(str(path))
    assert (spec.train_split, spec.eval_split, spec.image_column, spec.label_column) == ("train", None, "image", "label")
    train, eval_, names = load_splits(spec)
    assert eval_ is None and names == ["a", "b"]
    assert sorted(image.getpixel((0, 0))[0] for image in train["image"]) == list(range(6))


def test_unsupported_single_file_says_what_to_do(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("image,label\na.png,0\n")
    with pytest.raises(DataError, match=r"labels.csv' is a file, but only .parquet / .arrow files .*Dataset.to_parquet"):
        resolve_dataset(str(path))


# 6. Fewer than two classes.

def test_single_class_is_refused(make_dataset):
    one_name = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["only"])})
    root = make_dataset({"train": {"image": [png(i) for i in range(4)], "label": [0] * 4}}, features=one_name)
    with pytest.raises(DataError, match=r"out of 1 \('only'\); a classifier needs at least 2"):
        build_datasets(resolve_dataset(str(root)), SMALL)
    # Ten names, but the training split shows the model a single one.
    ten_names = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcdefghij"))})
    root = make_dataset({"train": {"image": [png(i) for i in range(4)], "label": [3] * 4}}, features=ten_names, name="b")
    with pytest.raises(DataError, match=r"split 'train' .* has 1 class\(es\) in 'label' out of 10"):
        load_splits(resolve_dataset(str(root)))


# 7. A damaged CIFAR cache is rebuilt.

def _damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a readable file that does not hold this split
        torch.save({"images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "labels": torch.zeros(2)}, path)


@pytest.mark.parametrize("how", ["truncated", "empty", "wrong content"])
def test_damaged_cifar_cache_is_deleted_and_rebuilt(cifar_train_small, tmp_path, caplog, monkeypatch, how):
    ds = cifar_train_small.select(range(20))
    images, labels = cifar_tensors(ds, "img", "label", cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    _damage(path, how)
    with caplog.at_level(logging.WARNING, logger="esam_hf.data"):
        again, again_labels = cifar_tensors(ds, "img", "label", cache_dir=tmp_path)
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "deleting it" in warnings[0]
    # The rebuilt file is whole: the next call reads it without decoding.
    monkeypatch.setattr(cifar, "_decode_images", lambda *args: pytest.fail("decoded again despite the cache"))
    assert torch.equal(cifar_tensors(ds, "img", "label", cache_dir=tmp_path)[0], images)


# 8. Sample limits.

@pytest.mark.parametrize("option, value", [("max_train_samples", 0), ("max_eval_samples", -1), ("max_train_samples", -5)])
def test_non_positive_sample_limits_name_the_option(option, value):
    with pytest.raises(DataError, match=rf"{option} must be a positive number of images .* got {value}"):
        load_splits(resolve_dataset("cifar10-subset"), **{option: value})


def test_integer_labels_with_an_outlier_or_a_gap_are_refused_or_announced(make_dataset, capsys):
    images = [png(i) for i in range(6)]
    root = make_dataset({"train": {"image": images, "label": [0, 1, 2, 0, 1, 50000]}}, features=_plain_features("int64"))
    with pytest.raises(DataError, match=r"largest label 50000 would make a 50001-class model for 4 distinct labels"):
        load_splits(resolve_dataset(str(root), label_column="label", eval_split="none"))
    root = make_dataset({"train": {"image": images, "label": [1, 2, 3, 1, 2, 3]}}, features=_plain_features("int64"),
                        name="gap")
    names = load_splits(resolve_dataset(str(root), label_column="label", eval_split="none"))[2]
    assert names == ["0", "1", "2", "3"]
    assert "4 classes named '0'..'3' after its largest label, 1 of them with no example (0)" in capsys.readouterr().err


def test_a_huge_outlier_label_is_refused_at_once_without_allocating_for_it(make_dataset):
    """A single label of 2**40 once built a list of 2**40 class names before the check. The memory this process
    may add is capped while it loads (so the old behaviour fails fast, not the machine)."""
    import resource
    import time

    images = [png(i) for i in range(6)]
    root = make_dataset({"train": {"image": images, "label": [0, 1, 0, 1, 0, 2**40]}}, features=_plain_features("int64"))
    spec = resolve_dataset(str(root), label_column="label", eval_split="none")
    used = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData"))
    limits = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (used + 2**29, limits[1]))  # 512 MiB more, at most
    start = time.perf_counter()
    try:
        with pytest.raises(DataError, match=rf"largest label {2**40} would make a {2**40 + 1}-class model for 3 "
                                            "distinct labels"):
            load_splits(spec)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, limits)
    assert time.perf_counter() - start < 2


# 9. Files `datasets` cannot build into splits, and an image folder with one class.

def _write_split(root, split, labels, label_type):
    root.mkdir(exist_ok=True)
    ds = datasets.Dataset.from_dict({"image": [png(i) for i in range(len(labels))], "label": labels},
                                    features=_plain_features(label_type))
    ds.to_parquet(root / f"{split}-00000-of-00001.parquet")


def test_int_labels_in_train_and_strings_in_test_say_the_types_disagree(tmp_path, hf_cache):
    root = tmp_path / "mixed"
    _write_split(root, "train", [0, 1, 0, 1], "int64")
    _write_split(root, "test", ["a", "b"], "string")
    with pytest.raises(DataError, match=r"the files of '.*mixed' cannot be read as one dataset \(ArrowInvalid: .*int64\)"
                                        r".*labels that are integers in one split and strings in another"):
        resolve_dataset(str(root), label_column="label")


def test_an_empty_split_is_named(tmp_path, hf_cache):
    root = tmp_path / "empty"
    _write_split(root, "train", [0, 1, 0, 1], "int64")
    _write_split(root, "test", [], "int64")  # a valid parquet file without rows
    with pytest.raises(DataError, match=r"split 'test' of '.*empty' has no rows"):
        resolve_dataset(str(root), label_column="label")
    (root / "test-00000-of-00001.parquet").write_bytes(b"")  # a file cut to nothing
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet is empty \(0 bytes\)"):
        resolve_dataset(str(root), label_column="label")


def test_an_image_folder_with_one_class_says_so(tmp_path, hf_cache):
    root = tmp_path / "pets"
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        for i in range(3):
            PIL.Image.new("RGB", (8, 8), (i, 0, 0)).save(root / split / "cat" / f"{i}.png")
    with pytest.raises(DataError, match=r"'.*pets' is an image folder with one class: all its images sit in folders "
                                        r"named 'cat'.*needs at least 2 classes") as error:
        resolve_dataset(str(root))
    assert "could not find the label column" not in str(error.value)
    # A second class folder makes it a dataset whose classes are the folder names.
    for split in ("train", "test"):
        (root / split / "dog").mkdir()
        PIL.Image.new("RGB", (8, 8), (9, 0, 0)).save(root / split / "dog" / "0.png")
    assert load_splits(resolve_dataset(str(root)))[2] == ["cat", "dog"]
