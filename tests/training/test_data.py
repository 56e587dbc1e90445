"""Tests for mmft_hf.training.data: crop, RGB conversion, image loading, few-shot sampling, the split and dataset checks."""

import logging
import random

import datasets
import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb

from mmft_hf import images
from mmft_hf.training.data import (
    ROW_INDEX_COLUMN,
    align_label_names,
    empty_caption_rows,
    load_image,
    random_resized_crop,
    sample_few_shot,
    to_rgb,
    train_validation_split,
    validate_captioned_dataset,
    with_row_errors,
    with_template_captions,
)


def _labels_dataset(counts, names=None):
    """A dataset with only `row` and `label`: `counts[c]` rows of class c, classes interleaved."""
    labels = [label for label, count in enumerate(counts) for _ in range(count)]
    random.Random(0).shuffle(labels)
    feature = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    features = datasets.Features({"row": datasets.Value("int64"), "label": feature})
    return datasets.Dataset.from_dict({"row": list(range(len(labels))), "label": labels}, features=features)


def _gradient(width, height):
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    array = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(array.astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------- random_resized_crop
def test_random_resized_crop_boxes_respect_scale_and_ratio(monkeypatch):
    boxes = []
    original = Image.Image.resize

    def recording_resize(self, size, resample=None, box=None, reducing_gap=None):
        boxes.append((size, resample, box))
        return original(self, size, resample, box, reducing_gap)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    image, rng = _gradient(100, 80), random.Random(0)
    for _ in range(200):
        out = random_resized_crop(image, 32, scale=(0.5, 0.8), ratio=(0.75, 4 / 3), rng=rng)
        assert out.size == (32, 32) and out.mode == "RGB"
    assert len(boxes) == 200
    for size, resample, (left, top, right, bottom) in boxes:
        assert size == (32, 32) and resample == Image.BICUBIC
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 80
        width, height = right - left, bottom - top
        # Rounding the side lengths moves the area and ratio a little beyond the sampled ones.
        assert 0.5 * 8000 - (width + height) <= width * height <= 0.8 * 8000 + (width + height)
        assert 0.75 * (1 - 2 / height) <= width / height <= 4 / 3 * (1 + 2 / height)
    assert len({box for _, _, box in boxes}) > 150  # random positions and sizes


def test_random_resized_crop_seeded_tuple_size_and_full_scale():
    image = _gradient(60, 40)
    a = random_resized_crop(image, (20, 30), rng=random.Random(3))
    b = random_resized_crop(image, (20, 30), rng=random.Random(3))
    assert a.size == (30, 20)  # size is (height, width), PIL sizes are (width, height)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # scale 1 and the image's own ratio: the crop is the whole image, i.e. a plain bicubic resize.
    full = random_resized_crop(image, (20, 30), scale=(1.0, 1.0), ratio=(1.5, 1.5), rng=random.Random(0))
    assert np.array_equal(np.asarray(full), np.asarray(image.resize((30, 20), Image.BICUBIC)))


def test_random_resized_crop_falls_back_to_clamped_centre_crop(monkeypatch):
    boxes = []
    original = Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda self, size, resample=None, box=None: boxes.append(box) or original(self, size)
    )
    # 200x10: an area of >= 1800 px with a ratio <= 4/3 never fits, so the fallback runs.
    random_resized_crop(_gradient(200, 10), 16, rng=random.Random(0))
    width = round(10 * 4 / 3)
    assert boxes == [((200 - width) // 2, 0, (200 - width) // 2 + width, 10)]


def test_random_resized_crop_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop(_gradient(8, 8), 4, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="ratio"):
        random_resized_crop(_gradient(8, 8), 4, ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match="size"):
        random_resized_crop(_gradient(8, 8), 0)


# ------------------------------------------------------------------------------------------------------ to_rgb
def test_to_rgb_is_the_shared_conversion():
    assert to_rgb is images.to_rgb  # one implementation for captioning, training and the pipeline


def test_to_rgb_composites_transparency_on_white_like_transformers():
    array = np.zeros((2, 3, 4), np.uint8)
    array[..., 0] = 200  # red underneath
    array[0, 0, 3] = 255  # opaque
    array[0, 1, 3] = 0  # fully transparent
    array[0, 2, 3] = 128  # half
    image = Image.fromarray(array, "RGBA")
    rgb = np.asarray(to_rgb(image))
    assert to_rgb(image).mode == "RGB"
    assert rgb[0, 0].tolist() == [200, 0, 0]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert np.abs(rgb[0, 2].astype(int) - [round(200 * 128 / 255 + 255 * 127 / 255), 127, 127]).max() <= 1
    # The processor (eval path) must see the same pixels as the training path.
    assert np.array_equal(rgb, convert_to_rgb(image, return_numpy=True))
    for mode in ("LA", "PA"):
        other = image.convert(mode)
        assert np.array_equal(np.asarray(to_rgb(other)), convert_to_rgb(other, return_numpy=True))


def test_to_rgb_palette_grayscale_cmyk_and_bilevel():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 1), 1)
    out = np.asarray(to_rgb(palette))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [40, 50, 60]
    palette.info["transparency"] = 1  # index 1 transparent -> white
    assert np.asarray(to_rgb(palette))[1, 1].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb(Image.new("L", (3, 3), 77)))[2, 2].tolist() == [77, 77, 77]
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(to_rgb(Image.new("1", (2, 2), 1)))[0, 0].tolist() == [255, 255, 255]
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb


def test_to_rgb_rescales_16_bit_and_float_images():
    array16 = np.array([[0, 1000, 32768, 65535]], np.uint16)
    expected = [round(v / 257) for v in array16[0].tolist()]  # [0, 4, 128, 255]
    for image in (Image.fromarray(array16), Image.fromarray(array16.astype(np.int32))):
        assert image.mode in ("I;16", "I")
        out = np.asarray(to_rgb(image))
        assert out.shape == (1, 4, 3) and out[0, :, 0].tolist() == expected and (out[..., 1] == out[..., 0]).all()
    small = Image.fromarray(np.array([[0, 17, 255]], np.int32))  # an "I" image already in 8-bit range
    assert np.asarray(to_rgb(small))[0, :, 2].tolist() == [0, 17, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 1].tolist() == [0, 128, 255]


# -------------------------------------------------------------------------------------------------- load_image
def test_load_image_sources_and_bad_files(tmp_path):
    path = tmp_path / "ok.png"
    _gradient(5, 4).save(path)
    assert load_image(str(path)).size == (5, 4)
    assert load_image({"bytes": path.read_bytes(), "path": None}).size == (5, 4)
    assert load_image({"bytes": None, "path": str(path)}).size == (5, 4)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png.*0 bytes"):
        load_image(str(tmp_path / "empty.png"))
    with pytest.raises(ValueError, match="0 bytes"):
        load_image({"bytes": b"", "path": None})
    (tmp_path / "junk.png").write_bytes(b"not an image at all" * 10)
    with pytest.raises(OSError):
        load_image(str(tmp_path / "junk.png"))
    with pytest.raises(ValueError, match="expected a PIL image"):
        load_image(3)


# ---------------------------------------------------------------------------------------------- sample_few_shot
def test_sample_few_shot_counts_order_and_determinism(image_files_dataset):
    dataset = image_files_dataset.add_column("row", list(range(len(image_files_dataset))))
    shot = sample_few_shot(dataset, k=2, seed=1)
    assert len(shot) == 6
    assert np.bincount(shot["label"]).tolist() == [2, 2, 2]
    rows = list(shot["row"])
    assert rows == sorted(rows) and len(set(rows)) == 6  # dataset order, without replacement
    assert [dataset[r]["label"] for r in rows] == list(shot["label"])  # rows kept intact
    assert list(sample_few_shot(dataset, k=2, seed=1)["row"]) == rows
    assert len({tuple(sample_few_shot(dataset, k=2, seed=s)["row"]) for s in range(8)}) > 1
    assert sorted(sample_few_shot(dataset, k=4, seed=5)["row"]) == list(range(12))  # k == class size: all rows


def test_sample_few_shot_subsets_are_nested_per_seed():
    dataset = _labels_dataset([9, 7, 12], names=["a", "b", "c"])
    for seed in (0, 1, 2):
        previous = set()
        for k in (1, 2, 4, 7):
            rows = set(sample_few_shot(dataset, k=k, seed=seed)["row"])
            assert len(rows) == 3 * k and previous <= rows
            previous = rows


def test_sample_few_shot_single_image_class():
    dataset = _labels_dataset([3, 1, 2], names=["cat", "lonely dog", "fish"])
    one = sample_few_shot(dataset, k=1, seed=0)
    assert sorted(one["label"]) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"'lonely dog' \(label 1\) has 1 row") as error:
        sample_few_shot(dataset, k=2, seed=0)
    assert "'cat'" not in str(error.value) and "'fish'" not in str(error.value)  # only classes short of k
    with pytest.raises(ValueError, match=r"'cat' \(label 0\) has 3.*'lonely dog'.*has 1.*'fish'.*has 2"):
        sample_few_shot(dataset, k=4, seed=0)


def test_sample_few_shot_argument_and_label_errors():
    dataset = _labels_dataset([2, 2], names=["a", "b"])
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k .*>= 1"):
            sample_few_shot(dataset, k=k, seed=0)
    # A ClassLabel class with no rows at all is short too.
    absent = _labels_dataset([2, 2], names=["a", "b", "ghost"])
    with pytest.raises(ValueError, match="'ghost' \\(label 2\\) has 0"):
        sample_few_shot(absent, k=1, seed=0)
    plain = _labels_dataset([2, 1])  # integer labels without names
    with pytest.raises(ValueError, match="label 1 has 1"):
        sample_few_shot(plain, k=2, seed=0)
    strings = datasets.Dataset.from_dict({"label": ["x", "y"]})
    with pytest.raises(ValueError, match="class_encode_column"):
        sample_few_shot(strings, k=1, seed=0)
    with pytest.raises(ValueError, match=r"'target' not found.*\['row', 'label'\].*label_column="):
        sample_few_shot(dataset, k=1, seed=0, label_column="target")


# ----------------------------------------------------------------------------------------- train_validation_split
def test_train_validation_split_is_stratified_with_largest_remainders():
    counts = [50, 30, 15, 4, 1]
    dataset = _labels_dataset(counts, names=list("abcde"))
    split = train_validation_split(dataset, validation_fraction=0.1, seed=0)
    assert set(split) == {"train", "validation"}
    # target 10 rows; shares 5, 3, 1.5, 0.4, 0.1 -> floors 5, 3, 1, 0, 0, the remaining row to class 2 (0.5).
    assert np.bincount(split["validation"]["label"], minlength=5).tolist() == [5, 3, 2, 0, 0]
    assert np.bincount(split["train"]["label"], minlength=5).tolist() == [45, 27, 13, 4, 1]
    train, validation = list(split["train"]["row"]), list(split["validation"]["row"])
    assert train == sorted(train) and validation == sorted(validation)
    assert sorted(train + validation) == list(range(100))


def test_train_validation_split_seeded_and_keeps_a_training_row_per_class():
    dataset = _labels_dataset([2, 2, 2, 2, 1, 1])
    # 0.4 of 10 rows = 4; shares 0.8 x4 and 0.4 x2 -> the four largest remainders get one row each.
    split = train_validation_split(dataset, validation_fraction=0.4, seed=4)
    assert np.bincount(split["validation"]["label"], minlength=6).tolist() == [1, 1, 1, 1, 0, 0]
    # Shares 0.5 x4 and 3.0: the single-row classes cannot give their row, so class 4 gives all 5.
    capped = train_validation_split(_labels_dataset([1, 1, 1, 1, 6]), validation_fraction=0.5, seed=0)
    assert np.bincount(capped["validation"]["label"], minlength=5).tolist() == [0, 0, 0, 0, 5]
    assert np.bincount(capped["train"]["label"], minlength=5).tolist() == [1, 1, 1, 1, 1]
    first = train_validation_split(dataset, validation_fraction=0.4, seed=7)
    again = train_validation_split(dataset, validation_fraction=0.4, seed=7)
    assert list(first["validation"]["row"]) == list(again["validation"]["row"])
    seen = {tuple(train_validation_split(dataset, 0.4, seed=s)["validation"]["row"]) for s in range(10)}
    assert len(seen) > 1
    for rows in seen:
        assert len(rows) == 4
        train_labels = set(dataset.select([i for i in range(10) if i not in rows])["label"])
        assert train_labels == set(range(6))


def test_train_validation_split_errors():
    dataset = _labels_dataset([5, 5])
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\)"):
            train_validation_split(dataset, fraction)
    with pytest.raises(ValueError, match="rounds to 0"):
        train_validation_split(dataset, 0.01)
    with pytest.raises(ValueError, match="keeping a training row in each of the 2 classes"):
        train_validation_split(dataset, 0.95)


# ------------------------------------------------------------------------------------- validate_captioned_dataset
def _captioned(labels, captions, label_feature=None, caption_feature=None, images=None):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": label_feature or datasets.ClassLabel(names=["a", "b"]),
            "captions": caption_feature or datasets.List(datasets.Value("string")),
        }
    )
    images = images or [Image.new("RGB", (4, 4))] * len(labels)
    return datasets.Dataset.from_dict({"image": images, "label": labels, "captions": captions}, features=features)


def test_validate_returns_class_names(image_files_dataset):
    assert validate_captioned_dataset(image_files_dataset) == ["banded", "dotted", "striped"]
    assert validate_captioned_dataset(image_files_dataset, check_images=True) == ["banded", "dotted", "striped"]
    renamed = validate_captioned_dataset(image_files_dataset, class_names=["x y", "z", "w"])
    assert renamed == ["x y", "z", "w"]
    with pytest.raises(ValueError, match="class_names has 2 names but .* has 3 classes"):
        validate_captioned_dataset(image_files_dataset, class_names=["x", "y"])


def test_validate_names_missing_columns_and_the_argument(image_files_dataset):
    renamed = image_files_dataset.rename_column("captions", "caption_list")
    with pytest.raises(ValueError) as error:
        validate_captioned_dataset(renamed)
    message = str(error.value)
    assert "'captions' not found" in message and "['image', 'label', 'caption_list']" in message
    assert "caption_column=" in message
    assert validate_captioned_dataset(renamed, caption_column="caption_list") == ["banded", "dotted", "striped"]
    assert validate_captioned_dataset(renamed, require_captions=False) == ["banded", "dotted", "striped"]
    with pytest.raises(ValueError, match="'img' not found.*image_column="):
        validate_captioned_dataset(image_files_dataset, image_column="img")
    with pytest.raises(ValueError, match="'labels' not found.*label_column="):
        validate_captioned_dataset(image_files_dataset, label_column="labels")


def test_validate_label_types_and_ranges():
    plain = datasets.Value("int64")
    with pytest.raises(ValueError, match="plain integers.*class_names="):
        validate_captioned_dataset(_captioned([0, 1], [["x"], ["y"]], plain))
    assert validate_captioned_dataset(_captioned([0, 1], [["x"], ["y"]], plain), class_names=["p", "q"]) == ["p", "q"]
    with pytest.raises(ValueError, match=r"Row 2: 'label' is 5, outside the 2 classes \[0, 1\]"):
        validate_captioned_dataset(_captioned([0, 1, 5, 0], [["x"]] * 4, plain), class_names=["p", "q"])
    with pytest.raises(ValueError, match=r"Row 1: 'label' is -1 \(-1 means no label\)"):
        validate_captioned_dataset(_captioned([0, -1], [["x"]] * 2))
    strings = _captioned(["a", "b"], [["x"], ["y"]], datasets.Value("string"))
    with pytest.raises(ValueError, match="class_encode_column"):
        validate_captioned_dataset(strings)


def test_validate_caption_types_and_empty_lists(caplog):
    with pytest.raises(ValueError, match=r"Row 2: 'captions'\[1\] is NoneType None, not a string"):
        validate_captioned_dataset(_captioned([0, 1, 0], [["x"], ["y"], ["ok", None]]))
    with pytest.raises(ValueError, match=r"Row 1: 'captions' is NoneType"):
        validate_captioned_dataset(_captioned([0, 1], [["x"], None]))
    single = _captioned([0, 1], ["x", "y"], caption_feature=datasets.Value("string"))
    with pytest.raises(ValueError, match=r"Row 0: 'captions' is str .*\[text\] for a single caption"):
        validate_captioned_dataset(single)
    with_empty = _captioned([0, 1, 0, 1], [["x"], [], ["y", "z"], []])
    with caplog.at_level(logging.WARNING):
        assert validate_captioned_dataset(with_empty) == ["a", "b"]  # allowed, nothing dropped
    assert len(with_empty) == 4
    assert "2 of 4 rows have an empty 'captions' list (rows 1, 3)" in caplog.text
    assert empty_caption_rows(with_empty) == [1, 3]


def _files_dataset(tmp_path):
    """Paths: rows 0 and 3 fine, 1 zero bytes, 2 not an image, 4 a truncated JPEG."""
    good = tmp_path / "good.png"
    _gradient(6, 6).save(good)
    empty, junk, truncated = tmp_path / "empty.jpg", tmp_path / "junk.png", tmp_path / "cut.jpg"
    empty.write_bytes(b"")
    junk.write_bytes(b"\x89PNG but not really" * 4)
    _gradient(64, 64).save(tmp_path / "full.jpg")
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    paths = [str(p) for p in (good, empty, junk, good, truncated)]
    return _captioned([0, 1, 0, 1, 0], [["c"]] * 5, images=paths)


def test_validate_check_images_names_bad_rows(tmp_path):
    dataset = _files_dataset(tmp_path)
    assert validate_captioned_dataset(dataset) == ["a", "b"]  # images are not decoded by default
    with pytest.raises(ValueError) as error:
        validate_captioned_dataset(dataset, check_images=True)
    message = str(error.value)
    assert message.startswith("3 of 5 image(s) in column 'image' cannot be decoded")
    assert "row 1: ValueError: the image file" in message and "empty.jpg" in message and "0 bytes" in message
    assert "row 2: UnidentifiedImageError" in message and "junk.png" in message
    assert "row 4: OSError" in message and "cut.jpg" in message
    assert "row 0" not in message and "row 3" not in message
    # Without the check, the corrupt file fails where datasets decodes it, with no row number.
    with pytest.raises(Exception) as raw:
        dataset[2]
    assert "row" not in str(raw.value).lower()


def test_a_dataset_dict_is_refused_with_the_fix(image_files_dataset):
    splits = datasets.DatasetDict({"train": image_files_dataset})
    for call in (validate_captioned_dataset, lambda d: sample_few_shot(d, 1, 0), train_validation_split):
        with pytest.raises(ValueError, match=r"one split, got a DatasetDict of \['train'\].*dataset\['train'\]"):
            call(splits)


# ------------------------------------------------------------------------------------------------ label alignment
def _labelled(names: list[str], row_names: list[str]) -> datasets.Dataset:
    features = datasets.Features({"label": datasets.ClassLabel(names=names), "image": datasets.Value("string")})
    return datasets.Dataset.from_dict({"label": row_names, "image": ["x"] * len(row_names)}, features=features)


def test_align_label_names_maps_by_name():
    training = ["cat", "dog", "bird"]
    split = _labelled(["bird", "Cat", "dog"], ["dog", "bird", "Cat", "bird"])
    aligned = align_label_names(split, training, split_name="test")
    assert aligned["label"] == [1, 2, 0, 2] and aligned.features["label"].names == training
    same = _labelled(training, ["dog", "cat"])
    assert align_label_names(same, training) is same  # already in order: untouched
    prefix = _labelled(["cat", "dog"], ["dog"])
    assert align_label_names(prefix, training) is prefix
    unused_extra = _labelled(["bird", "fish", "cat"], ["cat", "bird"])  # "fish" has no row: harmless
    assert align_label_names(unused_extra, training)["label"] == [0, 2]
    with pytest.raises(ValueError, match=r"test split has rows of 2 class\(es\).*\['fish', 'whale'\]"):
        align_label_names(_labelled(["whale", "cat", "fish"], ["fish", "cat", "whale"]), training, split_name="test")


def test_align_label_names_takes_unnamed_integers_only_when_the_counts_agree():
    training = ["cat", "dog", "bird"]
    plain = datasets.Dataset.from_dict({"label": [2, 0, 1, 1]})
    assert align_label_names(plain, training) is plain
    with pytest.raises(ValueError, match=r"plain integers without class names \(2 distinct values: \[0, 1\]\)"):
        align_label_names(datasets.Dataset.from_dict({"label": [0, 1, 1]}), training)
    with pytest.raises(ValueError, match="3 distinct values"):
        align_label_names(datasets.Dataset.from_dict({"label": [0, 1, 5]}), training)
    with pytest.raises(ValueError, match="not class labels"):
        align_label_names(datasets.Dataset.from_dict({"label": ["cat"]}), training)


def test_benchmark_splits_follow_the_training_label_order(synthetic_dataset):
    from mmft_hf.evaluation import load_benchmark_splits

    names = synthetic_dataset["train"].features["label"].names
    test = synthetic_dataset["test"]
    reordered_names = names[::-1]
    reordered = (
        test.cast_column("label", datasets.Value("int64"))
        .map(lambda row: {"label": reordered_names.index(names[row["label"]])})
        .cast_column("label", datasets.ClassLabel(names=reordered_names))
    )
    raw = datasets.DatasetDict({**synthetic_dataset, "test": reordered})
    splits, _ = load_benchmark_splits(raw, shots=None, seed=0)
    assert splits["test"].features["label"].names == names and splits["test"]["label"] == test["label"]


def test_num_shots_below_one_is_an_error():
    from mmft_hf.commands import finetune

    with pytest.raises(ValueError, match="--num_shots 0: give at least 1 image per class"):
        finetune.parse_arguments(["--output_dir", "x", "--num_shots", "0"])


# ------------------------------------------------------------------------------------ training rows and texts
def test_with_template_captions_gives_each_row_its_class_templates(synthetic_dataset):
    train = synthetic_dataset["train"].select(range(6))
    names = ["red square", "green circle", "blue triangle", "yellow cross"]
    replaced = with_template_captions(train, names, ("a photo of a {}.", "itap of a {}"), "label", "captions")
    assert replaced.features["captions"] == datasets.List(datasets.Value("string"))
    for row in replaced:
        name = names[row["label"]]
        assert row["captions"] == [f"a photo of a {name}.", f"itap of a {name}"]
    fresh = with_template_captions(train.remove_columns("captions"), names, ("{}",), "label", "captions")
    assert fresh["captions"] == [[names[label]] for label in train["label"]]


def test_with_row_errors_defers_decoding_and_numbers_rows(synthetic_dataset):
    train = synthetic_dataset["train"].select(range(5))
    prepared = with_row_errors(train, "image")
    assert prepared.features["image"] == datasets.Image(decode=False)
    assert prepared[ROW_INDEX_COLUMN] == [0, 1, 2, 3, 4] and isinstance(prepared[0]["image"], dict)
    assert with_row_errors(prepared, "image")[ROW_INDEX_COLUMN] == [0, 1, 2, 3, 4]  # idempotent
    rows = [{"image": None}]
    assert with_row_errors(rows, "image") is rows  # not a datasets.Dataset: left as it is
