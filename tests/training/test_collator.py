"""Tests for mmft_hf.training.collator.MMFTDataCollator with the tiny CLIP and real image files."""

import logging
import random
import warnings
from collections import Counter
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import mmft_hf.training.collator as collator_module
from mmft_hf.synthetic import build_clip, build_word_tokenizer
from mmft_hf.training.collator import EpochKeyedDataset, EpochSampler, MMFTDataCollator
from mmft_hf.training.data import to_rgb

NAMES = ["banded", "dotted", "striped"]


def _noise(width=24, height=20, seed=0, mode="RGB"):
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array, "RGB").convert(mode)


def _row(captions, label=0, image=None, **extra):
    return {"image": image if image is not None else _noise(), "label": label, "captions": captions, **extra}


class RecordingCollator(MMFTDataCollator):
    """Records the caption drawn for each row through the `build_text` hook."""

    def build_text(self, class_name, caption):
        self.__dict__.setdefault("drawn", []).append(caption)
        return super().build_text(class_name, caption)


def _ids(processor, texts):
    return processor.tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]


# ------------------------------------------------------------------------------------------------- batch layout
def test_batch_from_real_files_runs_through_clip(tiny_clip, image_files_dataset):
    model, processor = tiny_clip
    collator = MMFTDataCollator(processor=processor, class_names=NAMES)
    rows = [image_files_dataset[i] for i in range(6)]  # RGB png, grayscale jpg, RGBA png
    batch = collator(rows)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert torch.isfinite(batch["pixel_values"]).all()
    assert batch["labels"].tolist() == [row["label"] for row in rows] and batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 6
    labels = batch.pop("labels")
    output = model(**batch)
    assert output.logits_per_image.shape == (6, 6) and labels.shape == (6,)


def test_batch_with_one_label_only(tiny_clip, image_files_dataset):
    model, processor = tiny_clip
    rows = [image_files_dataset[i] for i in (0, 3, 6, 9)]  # all "banded"
    batch = MMFTDataCollator(processor=processor, class_names=NAMES)(rows)
    assert batch["labels"].tolist() == [0, 0, 0, 0]
    output = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
    )
    assert torch.isfinite(output.logits_per_text).all() and output.logits_per_text.shape == (4, 4)


def test_all_image_modes(tiny_clip):
    _, processor = tiny_clip
    palette = _noise().convert("P")
    rows = [
        _row(["c"], image=image) for image in (_noise(mode="L"), _noise(mode="RGBA"), _noise(mode="CMYK"), palette)
    ]
    rows.append(_row(["c"], image=Image.fromarray(np.full((9, 7), 40000, np.uint16))))
    for train in (True, False):
        batch = MMFTDataCollator(processor=processor, class_names=NAMES, train=train)(rows)
        assert batch["pixel_values"].shape == (5, 3, 32, 32) and torch.isfinite(batch["pixel_values"]).all()


def test_eval_images_match_the_processor_and_transparency_is_white(tiny_clip):
    _, processor = tiny_clip
    images = [_noise(seed=1), _noise(30, 18, seed=2, mode="L")]
    collator = MMFTDataCollator(processor=processor, class_names=NAMES, train=False)
    batch = collator([_row(["c"], image=image) for image in images])
    reference = processor.image_processor(images=[to_rgb(image) for image in images], return_tensors="pt")
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    transparent = Image.new("RGBA", (16, 16), (200, 0, 0, 0))
    white = Image.new("RGB", (16, 16), (255, 255, 255))
    pixels = collator([_row(["c"], image=transparent), _row(["c"], image=white)])["pixel_values"]
    assert torch.equal(pixels[0], pixels[1])


# ----------------------------------------------------------------------------------------------------- crops
def test_train_crops_to_crop_size_and_differs_across_calls(tiny_clip, monkeypatch):
    _, processor = tiny_clip
    calls = []
    original = collator_module.random_resized_crop

    def spy(image, size, **kwargs):
        out = original(image, size, **kwargs)
        calls.append((image.size, size, kwargs["scale"], out.size))
        return out

    monkeypatch.setattr(collator_module, "random_resized_crop", spy)
    row = _row(["c"], image=_noise(50, 40))
    collator = MMFTDataCollator(processor=processor, class_names=NAMES, crop_scale=(0.5, 0.9))
    first, second = collator([row])["pixel_values"], collator([row])["pixel_values"]
    assert calls == [((50, 40), (32, 32), (0.5, 0.9), (32, 32))] * 2
    assert not torch.equal(first, second)
    # Same seed, fresh collator: the same crops again.
    again = MMFTDataCollator(processor=processor, class_names=NAMES, crop_scale=(0.5, 0.9))
    assert torch.equal(again([row])["pixel_values"], first)
    calls.clear()
    evaluation = MMFTDataCollator(processor=processor, class_names=NAMES, train=False)
    outputs = [evaluation([row]) for _ in range(3)]
    assert calls == []  # no crop in eval mode
    for output in outputs[1:]:
        assert all(torch.equal(output[key], outputs[0][key]) for key in output)


# ------------------------------------------------------------------------------------------------------ text
def test_template_formatting_and_eval_uses_first_caption(tiny_clip):
    _, processor = tiny_clip
    rows = [_row(["the first caption", "the second"], label=2), _row([], label=1)]
    batch = MMFTDataCollator(processor=processor, class_names=NAMES, train=False)(rows)
    expected = ["a photo of a striped. the first caption", "a photo of a dotted."]
    assert torch.equal(batch["input_ids"], _ids(processor, expected))
    custom = MMFTDataCollator(processor=processor, class_names=NAMES, class_template="itap of a {}!", train=False)
    assert torch.equal(custom(rows[:1])["input_ids"], _ids(processor, ["itap of a striped! the first caption"]))
    caption_only = MMFTDataCollator(processor=processor, class_names=NAMES, class_template=None, train=False)
    assert torch.equal(caption_only(rows[:1])["input_ids"], _ids(processor, ["the first caption"]))
    template_only = MMFTDataCollator(processor=processor, class_names=NAMES, caption_column=None, train=False)
    assert torch.equal(
        template_only([{"image": _noise(), "label": 2}])["input_ids"], _ids(processor, ["a photo of a striped."])
    )


def test_empty_captions_without_template_is_an_error(tiny_clip):
    _, processor = tiny_clip
    collator = MMFTDataCollator(processor=processor, class_names=NAMES, class_template=None)
    with pytest.raises(ValueError, match="batch position 1 has an empty 'captions' list and class_template is None"):
        collator([_row(["fine"]), _row([])])


def test_seeded_draws_are_deterministic_and_cover_every_caption(tiny_clip):
    _, processor = tiny_clip
    captions = ["alpha one", "beta two", "gamma three"]
    rows = [_row(captions, image=_noise(8, 8))] * 100

    def draws(seed, calls=6):
        collator = RecordingCollator(processor=processor, class_names=NAMES, seed=seed)
        for _ in range(calls):
            collator(rows)
        return collator.drawn

    first = draws(seed=7)
    assert first == draws(seed=7)
    assert first != draws(seed=8)
    counts = Counter(first)
    assert set(counts) == set(captions) and sum(counts.values()) == 600
    # Uniform: 200 expected each, binomial sd ~11.5; the bounds are about 5 sd wide.
    assert all(140 <= count <= 260 for count in counts.values()), counts
    # Each drawn caption is what was encoded.
    collator = RecordingCollator(processor=processor, class_names=NAMES, seed=3)
    batch = collator(rows[:5])
    expected = _ids(processor, [f"a photo of a banded. {caption}" for caption in collator.drawn])
    assert torch.equal(batch["input_ids"], expected)


def test_worker_processes_get_different_streams(tiny_clip, monkeypatch):
    _, processor = tiny_clip
    rows = [_row(["a a", "b b", "c c", "d d"], image=_noise(8, 8))] * 40

    def draws(worker):
        monkeypatch.setattr(collator_module, "get_worker_info", lambda: worker)
        collator = RecordingCollator(processor=processor, class_names=NAMES, seed=0)
        collator(rows)
        return collator.drawn

    main = draws(None)
    worker0 = draws(SimpleNamespace(id=0, seed=1000))
    worker1 = draws(SimpleNamespace(id=1, seed=1001))
    next_epoch = draws(SimpleNamespace(id=0, seed=5000))
    assert len({tuple(main), tuple(worker0), tuple(worker1), tuple(next_epoch)}) == 4
    assert draws(SimpleNamespace(id=0, seed=1000)) == worker0  # reproducible


def test_real_dataloader_workers_draw_differently(tiny_clip):
    _, processor = tiny_clip
    captions = ["a a", "b b", "c c"]
    rows = [_row(captions, image=_noise(8, 8))] * 32
    collator = MMFTDataCollator(processor=processor, class_names=NAMES, seed=0)
    torch.manual_seed(0)
    loader = DataLoader(rows, batch_size=16, num_workers=2, collate_fn=collator)
    batches = [batch["input_ids"] for batch in loader]  # batch 0 from worker 0, batch 1 from worker 1
    assert len(batches) == 2
    assert not torch.equal(batches[0], batches[1])


def test_keyed_draws_are_stateless_across_batches_workers_and_epochs(tiny_clip):
    """With sample keys, a row's caption and crop depend on (seed, epoch, row) only: the same whatever batch it is
    in, whatever worker reads it, and different in another epoch; real worker processes give the main process's
    batches."""
    _, processor = tiny_clip
    rows = datasets.Dataset.from_dict(
        {"image": [_noise(30, 26, seed=i) for i in range(12)], "label": [i % 3 for i in range(12)],
         "captions": [[f"w{i} one", f"w{i} two", f"w{i} three", f"w{i} four"] for i in range(12)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES),
                                    "captions": datasets.List(datasets.Value("string"))}),
    )  # fmt: skip
    keyed = EpochKeyedDataset(rows)
    collator = MMFTDataCollator(processor=processor, class_names=NAMES, seed=5, crop_scale=(0.3, 1.0))

    def batch(keys):
        return collator(keyed.__getitems__(keys))

    together = batch([(1, 4), (1, 9), (1, 2)])
    alone = [batch([key]) for key in [(1, 9), (1, 2)]]
    for position, single in enumerate(alone, start=1):
        assert torch.equal(together["pixel_values"][position], single["pixel_values"][0])
        length = int(single["attention_mask"].sum())
        assert torch.equal(together["input_ids"][position, :length], single["input_ids"][0, :length])
    epochs = [batch([(epoch, 4)]) for epoch in range(6)]
    assert len({tuple(b["input_ids"][0].tolist()) for b in epochs}) > 1  # captions change with the epoch
    assert not torch.equal(epochs[0]["pixel_values"], epochs[1]["pixel_values"])  # and so do the crops

    def loader_batches(workers):
        sampler = EpochSampler(len(rows), seed=5)
        sampler.set_epoch(3)
        loader = DataLoader(keyed, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=collator)
        return list(loader)

    main, workers = loader_batches(0), loader_batches(2)
    assert len(main) == 3
    for one, other in zip(main, workers):
        assert all(torch.equal(one[name], other[name]) for name in one)


def test_padding_to_the_longest_text_gives_no_tokenizer_warning(tiny_clip):
    """Every batch of every worker would otherwise print "`max_length` is ignored when `padding`=`True`"."""
    _, processor = tiny_clip
    collator = MMFTDataCollator(processor=processor, class_names=NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = collator([_row(["short"]), _row(["a much longer caption than the other"])])
    assert batch["input_ids"].shape[1] < collator.max_length  # padded to the longest text, not to max_length


# ------------------------------------------------------------------------------------------------ truncation
def test_truncation_keeps_eos_counts_and_warns_once(tiny_clip, caplog):
    model, processor = tiny_clip
    long_caption = " ".join(["striped"] * 120)
    rows = [_row([long_caption]), _row(["short"]), _row([long_caption + " banded"])]
    collator = MMFTDataCollator(processor=processor, class_names=NAMES, train=False)
    assert collator.max_length == 77
    with caplog.at_level(logging.WARNING, logger="mmft_hf.training.collator"):
        batch = collator(rows)
        collator(rows[:2])
    assert (collator.num_texts, collator.num_truncated) == (5, 3)
    warnings = [record for record in caplog.records if "truncated" in record.getMessage()]
    assert len(warnings) == 1 and "2 of 3 texts in this batch (66.7%)" in warnings[0].getMessage()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    eos = processor.tokenizer.eos_token_id
    assert ids.shape[1] == 77
    last = mask.sum(dim=1) - 1
    assert last.tolist()[0] == 76 and last.tolist()[2] == 76
    assert all(ids[i, last[i]].item() == eos for i in range(3))
    # The truncated text is the untruncated one cut to 76 tokens plus EOS.
    full = processor.tokenizer([f"a photo of a banded. {long_caption}"])["input_ids"][0]
    assert len(full) > 77 and ids[0].tolist() == full[:76] + [eos]
    # Same ids and mask as the tokenizer's own truncation and padding.
    texts = [collator.build_text(NAMES[row["label"]], row["captions"][0]) for row in rows]
    reference = processor.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    assert torch.equal(ids, reference["input_ids"]) and torch.equal(mask, reference["attention_mask"])
    # CLIP pools the text at that EOS position.
    with torch.no_grad():
        text = model.text_model(input_ids=ids, attention_mask=mask)
    for i in range(3):
        assert torch.allclose(text.pooler_output[i], text.last_hidden_state[i, last[i]])
        assert not torch.allclose(text.pooler_output[i], text.last_hidden_state[i, last[i] - 1])


def test_truncation_probe_does_not_trigger_the_tokenizer_warning(tiny_clip):
    _, processor = tiny_clip
    tokenizer = build_word_tokenizer(["striped"], model_max_length=16)  # fresh: its warn-once state is clean
    processor = SimpleNamespace(tokenizer=tokenizer, image_processor=processor.image_processor)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")  # does not propagate to the root logger
    library_logger.addHandler(handler)
    try:
        collator = MMFTDataCollator(processor=processor, class_names=NAMES, train=False)
        assert collator.max_length == 16
        batch = collator([_row([" ".join(["striped"] * 30)])])
        assert batch["input_ids"].shape == (1, 16) and collator.num_truncated == 1
        assert not [r for r in records if "longer than the specified maximum" in r.getMessage()]
        tokenizer([" ".join(["striped"] * 30)])  # positive control: a plain call does warn
        assert [r for r in records if "longer than the specified maximum" in r.getMessage()]
    finally:
        library_logger.removeHandler(handler)


def test_max_length_defaults():
    big = build_word_tokenizer(["x"], model_max_length=int(1e30))
    model, processor = build_clip(big)
    assert MMFTDataCollator(processor=processor, class_names=NAMES).max_length == 77
    assert MMFTDataCollator(processor=processor, class_names=NAMES, max_length=20).max_length == 20


# ----------------------------------------------------------------------------------------------------- errors
def test_missing_columns_and_bad_labels(tiny_clip):
    _, processor = tiny_clip
    collator = MMFTDataCollator(processor=processor, class_names=NAMES)
    with pytest.raises(ValueError) as error:
        collator([_row(["c"]), {"image": _noise(), "label": 1, "caption": ["c"]}])
    message = str(error.value)
    assert "batch position 1 has no column 'captions'" in message and "['caption', 'image', 'label']" in message
    assert "caption_column=" in message and "remove_unused_columns=False" in message
    with pytest.raises(ValueError, match="no column 'label'.*label_column="):
        collator([{"image": _noise(), "captions": ["c"]}])
    with pytest.raises(ValueError, match="no column 'image'.*image_column="):
        collator([{"label": 0, "captions": ["c"]}])
    with pytest.raises(ValueError, match=r"position 0: 'label' is 3, not a label id in \[0, 2\]"):
        collator([_row(["c"], label=3)])
    with pytest.raises(ValueError, match="'label' is 'dotted'"):
        collator([_row(["c"], label="dotted")])
    assert collator([_row(["c"], label=np.int64(2)), _row(["c"], label=torch.tensor(1))])["labels"].tolist() == [2, 1]
    with pytest.raises(ValueError, match=r"'captions' is str, not a list of strings"):
        collator([_row("just one caption")])
    with pytest.raises(ValueError, match=r"'captions'\[0\] is int 5, not a string"):
        collator([_row([5])])
    with pytest.raises(ValueError, match="empty batch"):
        collator([])


def test_constructor_errors(tiny_clip):
    _, processor = tiny_clip
    with pytest.raises(ValueError, match="exactly one '{}'"):
        MMFTDataCollator(processor=processor, class_names=NAMES, class_template="a photo")
    with pytest.raises(ValueError, match="cannot be formatted"):
        MMFTDataCollator(processor=processor, class_names=NAMES, class_template="a {kind} photo of a {}.")
    with pytest.raises(ValueError, match="both None"):
        MMFTDataCollator(processor=processor, class_names=NAMES, class_template=None, caption_column=None)
    with pytest.raises(ValueError, match="non-empty list"):
        MMFTDataCollator(processor=processor, class_names=[])


def _bad_files(tmp_path):
    good, empty, junk = tmp_path / "good.png", tmp_path / "empty.png", tmp_path / "junk.jpg"
    _noise(10, 10).save(good)
    empty.write_bytes(b"")
    junk.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(500)))
    return str(good), str(empty), str(junk)


def test_corrupt_and_empty_files_name_the_row(tiny_clip, tmp_path):
    _, processor = tiny_clip
    good, empty, junk = _bad_files(tmp_path)
    features = datasets.Features(
        {
            "image": datasets.Image(decode=False),  # decode in the collator, which names the row
            "label": datasets.ClassLabel(names=NAMES),
            "captions": datasets.List(datasets.Value("string")),
            "row_index": datasets.Value("int64"),
        }
    )
    dataset = datasets.Dataset.from_dict(
        {
            "image": [good, junk, good, empty],
            "label": [0, 1, 2, 0],
            "captions": [["c"]] * 4,
            "row_index": [0, 1, 2, 3],
        },
        features=features,
    )
    collator = MMFTDataCollator(processor=processor, class_names=NAMES, index_column="row_index")
    assert collator([dataset[0], dataset[2]])["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError) as error:
        collator([dataset[0], dataset[1]])
    message = str(error.value)
    assert message.startswith("Row 1 ('row_index'): the image in column 'image'")
    assert "junk.jpg" in message and "UnidentifiedImageError" in message and "check_images=True" in message
    with pytest.raises(ValueError, match=r"Row 3 \('row_index'\).*empty.png.*0 bytes"):
        collator([dataset[3]])
    plain = MMFTDataCollator(processor=processor, class_names=NAMES, train=False)
    with pytest.raises(ValueError, match="Row at batch position 2: the image .*junk.jpg"):
        plain([dataset[0], dataset[2], dataset[1]])


# ------------------------------------------------------------------------------------ caption recipes
class TextRecorder(MMFTDataCollator):
    """Records every training text the collator builds."""

    def build_text(self, class_name, caption):
        text = super().build_text(class_name, caption)
        self.__dict__.setdefault("texts", []).append(text)
        return text


# per row, per caption, its sentences as written by hand; the captions join them with single spaces
ROW_SENTENCES = [
    [[f"Row {row} caption {c} says one.", "It is approx. 3.5 cm wide, e.g. small.", f"Row {row} caption {c} ends!"]
     for c in range(2)] + [[f"Row {row} caption 2 is one sentence"]]
    for row in range(4)
]  # fmt: skip
LONG_CAPTIONS = [[" ".join(sentences) for sentences in row] for row in ROW_SENTENCES]


def _keyed_rows(epochs, captions=LONG_CAPTIONS):
    return [
        _row(row_captions, label=index % 3, image=_noise(8, 8), **{collator_module.SAMPLE_KEY_COLUMN: (epoch, index)})
        for epoch in epochs
        for index, row_captions in enumerate(captions)
    ]


def _sentences(index):
    return [sentence for caption in ROW_SENTENCES[index] for sentence in caption]


def test_sentence_sampling_draws_one_sentence_of_the_row_and_reaches_every_sentence(tiny_clip):
    _, processor = tiny_clip
    collator = TextRecorder(processor=processor, class_names=NAMES, caption_sampling="sentence", seed=2)
    rows = _keyed_rows(range(150))
    for start in range(0, len(rows), 100):
        collator(rows[start : start + 100])
    assert len(collator.texts) == len(rows)
    drawn = {index: Counter() for index in range(len(LONG_CAPTIONS))}
    for row, text in zip(rows, collator.texts, strict=True):
        index = row[collator_module.SAMPLE_KEY_COLUMN][1]
        prefix = f"a photo of a {NAMES[row['label']]}. "
        assert text.startswith(prefix)
        sentence = text[len(prefix) :]
        assert sentence in _sentences(index)  # exactly one sentence, of this row
        drawn[index][sentence] += 1
    for index, counts in drawn.items():
        assert set(counts) == set(_sentences(index))  # every sentence gets drawn
        # a caption, then one of its sentences: the one-sentence caption is drawn 1/3 of the time (50 of 150)
        assert 25 <= counts[LONG_CAPTIONS[index][2]] <= 75, counts


def test_sentence_and_template_draws_replay_after_a_resume(tiny_clip):
    """The draws depend on (seed, epoch, row) alone: a fresh collator (a resumed process) that skips the batches
    already trained replays the rest of the epoch's texts exactly, and another epoch draws other texts."""
    _, processor = tiny_clip
    rows = datasets.Dataset.from_dict(
        {"image": [_noise(8, 8, seed=i) for i in range(8)], "label": [i % 3 for i in range(8)],
         "captions": [LONG_CAPTIONS[i % 4] for i in range(8)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES),
                                    "captions": datasets.List(datasets.Value("string"))}),
    )  # fmt: skip
    options = dict(processor=processor, class_names=NAMES, caption_sampling="sentence", template_probability=0.3)

    def epoch_texts(epoch, skip_batches=0):
        collator = TextRecorder(seed=4, **options)
        sampler = EpochSampler(len(rows), seed=4)
        sampler.set_epoch(epoch)
        loader = DataLoader(EpochKeyedDataset(rows), batch_size=2, sampler=sampler, collate_fn=lambda b: b)
        for position, batch in enumerate(loader):
            if position >= skip_batches:
                collator(batch)
        return collator.texts

    full = epoch_texts(3)
    assert epoch_texts(3, skip_batches=2) == full[4:]
    assert epoch_texts(3) == full
    assert epoch_texts(4) != full
    assert any(text.endswith(".") and text.count(".") == 1 for text in full + epoch_texts(4))  # some template


def test_template_probability_mix_rate_and_edges(tiny_clip):
    _, processor = tiny_clip
    rows = _keyed_rows(range(500), captions=[["alpha one", "beta two"], ["gamma. Delta."]] * 2)  # 2000 keyed draws

    def texts(probability, rows=rows, **options):
        collator = TextRecorder(processor=processor, class_names=NAMES, template_probability=probability, seed=9,
                                **options)  # fmt: skip
        for start in range(0, len(rows), 250):
            collator(rows[start : start + 250])
        return collator.texts

    templates = {f"a photo of a {name}." for name in NAMES}
    mixed = texts(0.3)
    count = sum(text in templates for text in mixed)
    # Binomial(2000, 0.3): mean 600, sd 20.5; the bound is 5 sd wide.
    assert abs(count - 600) <= 5 * (2000 * 0.3 * 0.7) ** 0.5, count
    for text, row in zip(mixed, rows, strict=True):
        assert text in templates or text.removeprefix(f"a photo of a {NAMES[row['label']]}. ") in row["captions"]
    plain = texts(0.0, rows[:250])
    assert not any(text in templates for text in plain)
    unchanged = TextRecorder(processor=processor, class_names=NAMES, seed=9)
    unchanged(rows[:250])
    assert plain == unchanged.texts  # p = 0 draws exactly the captions drawn without the option
    assert all(text in templates for text in texts(1.0, rows[:250]))  # p = 1: FLYP's texts
    assert all(text in templates for text in texts(1.0, rows[:250], caption_sampling="sentence"))
    evaluation = TextRecorder(processor=processor, class_names=NAMES, template_probability=1.0, train=False)
    evaluation(rows[:2])  # no draw in evaluation
    assert evaluation.texts[:2] == [f"a photo of a {NAMES[0]}. alpha one", f"a photo of a {NAMES[1]}. gamma. Delta."]


def test_sentence_sampling_in_evaluation_and_edge_rows(tiny_clip):
    _, processor = tiny_clip
    collator = TextRecorder(processor=processor, class_names=NAMES, caption_sampling="sentence", train=False)
    collator([_row(["First one. Second one.", "Other."], label=1), _row(["  ...  "], label=2), _row([], label=0)])
    assert collator.texts == ["a photo of a dotted. First one.", "a photo of a striped.", "a photo of a banded."]
    bare = MMFTDataCollator(processor=processor, class_names=NAMES, class_template=None, caption_sampling="sentence")
    with pytest.raises(ValueError, match=r"batch position 0: 'captions'\[0\] '\.\.\.' has no sentence"):
        bare([_row(["..."])])


def test_recipe_options_are_checked(tiny_clip):
    _, processor = tiny_clip
    with pytest.raises(ValueError, match="caption_sampling must be one of"):
        MMFTDataCollator(processor=processor, class_names=NAMES, caption_sampling="words")
    for probability in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"template_probability must be in \[0, 1\]"):
            MMFTDataCollator(processor=processor, class_names=NAMES, template_probability=probability)
    with pytest.raises(ValueError, match="class_template is None"):
        MMFTDataCollator(processor=processor, class_names=NAMES, class_template=None, template_probability=0.5)


@pytest.mark.parametrize("text_source", ["class_name", "templates"])
def test_trainer_collates_flyp_texts_without_a_second_prefix(tiny_clip, synthetic_dataset, tmp_path, text_source):
    """FLYP's rows hold the class template already: the training text is `"a photo of a {c}."` itself, never the
    template twice (nor the template before one of the 80 templates), and recipe options do not apply."""
    from mmft_hf.training.arguments import MMFTTrainingArguments
    from mmft_hf.training.trainer import MMFTTrainer

    model, processor = tiny_clip
    args = MMFTTrainingArguments(
        output_dir=str(tmp_path), text_source=text_source, eval_strategy="no", use_cpu=True, report_to=[],
        caption_sampling="sentence", template_probability=0.5,
    )  # fmt: skip
    trainer = MMFTTrainer(model=model, args=args, train_dataset=synthetic_dataset["train"], processing_class=processor)
    row = trainer.train_dataset[0]
    name = trainer.text_class_names[row["label"]]
    batch = trainer.data_collator([row] * 8)
    texts = processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert all(text.count(name) == 1 for text in texts), texts
    if text_source == "class_name":
        assert torch.equal(batch["input_ids"], _ids(processor, [f"a photo of a {name}."] * 8))
