import json
import logging
import os
import warnings

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel

from mmft_hf import MMFTTrainer, MMFTTrainingArguments, load_class_prototypes, mmft_loss
from mmft_hf.classification.prototypes import OPENAI_IMAGENET_TEMPLATES


def make_args(tmp_path, **overrides) -> MMFTTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        learning_rate=1e-3,
        num_train_epochs=1,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return MMFTTrainingArguments(**settings)


def make_trainer(tiny_clip, synthetic_dataset, tmp_path, **overrides) -> MMFTTrainer:
    model, processor = tiny_clip
    return MMFTTrainer(
        model=model,
        args=make_args(tmp_path, **overrides),
        train_dataset=synthetic_dataset["train"],
        eval_dataset=synthetic_dataset["validation"],
        processing_class=processor,
    )


def reference_accuracy(model, processor, train, evaluation, template="a photo of a {}.") -> float:
    """Independent classifier: per-class mean of normalised caption embeddings, one text at a time."""
    names = train.features["label"].names
    texts = {index: [] for index in range(len(names))}
    for row in train:
        texts[row["label"]] += [f"{template.format(names[row['label']])} {caption}" for caption in row["captions"]]
    with torch.no_grad():
        prototypes = []
        for index in range(len(names)):
            embeddings = []
            for text in texts[index]:
                tokens = processor.tokenizer([text], truncation=True, max_length=77, return_tensors="pt")
                feature = model.get_text_features(**tokens).pooler_output[0]
                embeddings.append(feature / feature.norm())
            mean = torch.stack(embeddings).mean(0)
            prototypes.append(mean / mean.norm())
        prototypes = torch.stack(prototypes)
        correct = 0
        for row in evaluation:
            pixels = processor.image_processor(images=[row["image"].convert("RGB")], return_tensors="pt").pixel_values
            feature = model.get_image_features(pixel_values=pixels).pooler_output[0]
            correct += int((prototypes @ (feature / feature.norm())).argmax().item() == row["label"])
    return correct / len(evaluation)


def test_evaluate_matches_independent_classifier(tiny_clip, synthetic_dataset, tmp_path):
    trainer = make_trainer(tiny_clip, synthetic_dataset, tmp_path)
    metrics = trainer.evaluate()
    expected = reference_accuracy(*tiny_clip, synthetic_dataset["train"], synthetic_dataset["validation"])
    assert metrics["eval_accuracy"] == pytest.approx(expected)
    names = synthetic_dataset["train"].features["label"].names
    per_class = [metrics[f"eval_accuracy_{name}"] for name in names]
    assert metrics["eval_balanced_accuracy"] == pytest.approx(sum(per_class) / len(per_class))
    assert metrics["eval_samples"] == len(synthetic_dataset["validation"])


def test_training_improves_accuracy_and_rebuilds_prototypes(tiny_clip, synthetic_dataset, tmp_path):
    trainer = make_trainer(tiny_clip, synthetic_dataset, tmp_path, num_train_epochs=20)
    before_prototypes = trainer.compute_class_prototypes().clone()
    before = trainer.evaluate()["eval_accuracy"]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = trainer.evaluate()["eval_accuracy"]
    assert after > before and after >= 0.5  # 4 classes; chance is 0.25
    assert not torch.allclose(trainer.compute_class_prototypes(), before_prototypes)  # current text encoder


def test_compute_loss_is_mmft_loss_of_the_model_logits(tiny_clip, synthetic_dataset, tmp_path):
    trainer = make_trainer(tiny_clip, synthetic_dataset, tmp_path, supcon_weight=0.3)
    rows = [synthetic_dataset["train"][i] for i in range(8)]
    batch = trainer.data_collator(rows)
    labels = batch["labels"].clone()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        out = trainer.model(**{k: v for k, v in batch.items() if k != "labels"})
    expected = mmft_loss(out.logits_per_image, out.logits_per_text, labels, supcon_weight=0.3)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


def test_flyp_baseline_equals_clip_builtin_loss(tiny_clip, synthetic_dataset, tmp_path):
    trainer = make_trainer(tiny_clip, synthetic_dataset, tmp_path, supcon_weight=0.0, text_source="class_name")
    rows = [trainer.train_dataset[i] for i in range(8)]
    names = synthetic_dataset["train"].features["label"].names
    assert all(row["captions"] == [f"a photo of a {names[row['label']]}."] for row in rows)
    batch = trainer.data_collator(rows)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        builtin = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}, return_loss=True).loss
    torch.testing.assert_close(loss.detach(), builtin, rtol=1e-5, atol=1e-5)


def test_flyp_ensemble_texts_and_zero_shot_prototypes(tiny_clip, synthetic_dataset, tmp_path):
    trainer = make_trainer(tiny_clip, synthetic_dataset, tmp_path, text_source="templates")
    names = synthetic_dataset["train"].features["label"].names
    row = trainer.train_dataset[0]
    assert row["captions"] == [template.format(names[row["label"]]) for template in OPENAI_IMAGENET_TEMPLATES]
    assert trainer.prototype_texts("single_template")[1] == [f"a photo of a {names[1]}"]
    assert len(trainer.prototype_texts("ensemble")[0]) == 80
    metrics = trainer.evaluate(prototype_source="ensemble", metric_key_prefix="zeroshot")
    assert 0.0 <= metrics["zeroshot_accuracy"] <= 1.0


def test_gradient_accumulation_scales_the_loss(tiny_clip, synthetic_dataset, tmp_path):
    trainer = make_trainer(tiny_clip, synthetic_dataset, tmp_path, gradient_accumulation_steps=2)
    batch = trainer.data_collator([synthetic_dataset["train"][i] for i in range(8)])
    torch.manual_seed(0)
    full = trainer.compute_loss(trainer.model, dict(batch)).item()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # what the training loop sets for a full accumulation window
    step = trainer.training_step(trainer.model, dict(batch)).item()
    assert step == pytest.approx(full / 2, rel=1e-5)


def test_weight_decay_applies_to_all_parameters(tiny_clip, synthetic_dataset, tmp_path):
    trainer = make_trainer(tiny_clip, synthetic_dataset, tmp_path)
    trainer.create_optimizer()
    decayed = {id(p) for group in trainer.optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert all(id(p) in decayed for p in trainer.model.parameters())
    hf_default = make_trainer(tiny_clip, synthetic_dataset, tmp_path, weight_decay_all_parameters=False)
    assert "logit_scale" in hf_default.get_decay_parameter_names(hf_default.model)
    assert not any("bias" in name for name in hf_default.get_decay_parameter_names(hf_default.model))


def test_best_epoch_is_selected_and_saved_with_prototypes(tiny_clip, synthetic_dataset, tmp_path):
    trainer = make_trainer(
        tiny_clip,
        synthetic_dataset,
        tmp_path,
        num_train_epochs=3,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        save_total_limit=None,
    )
    trainer.train()
    history = [entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry]
    assert len(history) == 3 and trainer.state.best_metric == max(history)
    best_epoch = history.index(max(history)) + 1  # strict improvement keeps the first best
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_epoch * 4}")
    for step in (4, 8, 12):
        prototypes, labels, _ = load_class_prototypes(str(tmp_path / "out" / f"checkpoint-{step}"))
        assert labels == synthetic_dataset["train"].features["label"].names and prototypes.shape == (4, 16)
    assert trainer.evaluate()["eval_accuracy"] == pytest.approx(max(history))  # the best weights are back

    trainer.save_model()
    out = str(tmp_path / "out")
    reloaded = CLIPModel.from_pretrained(out)
    assert reloaded.config.id2label[0] == "red circle"
    prototypes, labels, metadata = load_class_prototypes(out)
    torch.testing.assert_close(prototypes, trainer.compute_class_prototypes())
    assert metadata["source"] == "captions"
    assert os.path.isfile(os.path.join(out, "README.md"))


def test_lora_trains_adapters_and_logit_scale_then_saves_a_merged_model(tiny_clip, synthetic_dataset, tmp_path, capfd):
    trainer = make_trainer(
        tiny_clip,
        synthetic_dataset,
        tmp_path,
        use_lora=True,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        learning_rate=1e-2,
        num_train_epochs=2,
        save_strategy="epoch",
    )
    base = trainer.model.get_base_model()
    frozen = base.text_model.embeddings.token_embedding.weight.detach().clone()
    scale = base.logit_scale.detach().clone()
    trainer.train()
    assert torch.equal(base.text_model.embeddings.token_embedding.weight, frozen)
    assert not torch.equal(base.logit_scale.detach(), scale)
    checkpoint = tmp_path / "out" / "checkpoint-8"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    extras = load_file(str(checkpoint / "mmft_extra_parameters.safetensors"))
    torch.testing.assert_close(extras["logit_scale"], base.logit_scale.detach().reshape(-1))

    capfd.readouterr()
    trainer.save_model()
    assert "Writing model shards" not in "".join(capfd.readouterr())  # the final save is as quiet as checkpoints
    out = str(tmp_path / "out")
    merged = CLIPModel.from_pretrained(out)
    batch = trainer.data_collator([synthetic_dataset["validation"][i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits_per_image, trainer.model(**inputs).logits_per_image)
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["id2label"]["3"] == "yellow cross"
    assert not os.path.isfile(os.path.join(out, "adapter_config.json"))
    trainer.save_model(_internal_call=True)  # what Trainer.push_to_hub does: the output dir stays a merged model
    assert not os.path.isfile(os.path.join(out, "adapter_config.json"))
    elsewhere = str(tmp_path / "elsewhere")
    trainer.save_model(elsewhere)
    assert CLIPModel.from_pretrained(elsewhere) is not None and os.path.isfile(os.path.join(elsewhere, "README.md"))


def test_batch_with_a_single_label_gives_a_finite_loss(tiny_clip, synthetic_dataset, tmp_path):
    trainer = make_trainer(tiny_clip, synthetic_dataset, tmp_path)
    same = synthetic_dataset["train"].filter(lambda row: row["label"] == 2)
    batch = trainer.data_collator([same[i] for i in range(len(same))])
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    assert torch.isfinite(loss) and all(
        torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None
    )


def test_wrong_arguments_are_clear_errors(tiny_clip, synthetic_dataset, tmp_path):
    model, processor = tiny_clip
    with pytest.raises(ValueError, match="supcon_weight"):
        make_args(tmp_path, supcon_weight=1.5)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        make_args(tmp_path, remove_unused_columns=True)
    with pytest.raises(ValueError, match="processing_class"):
        MMFTTrainer(model=model, args=make_args(tmp_path), train_dataset=synthetic_dataset["train"])
    with pytest.raises(ValueError, match="caption_column"):
        make_trainer(tiny_clip, synthetic_dataset, tmp_path, caption_column="texts")


def tiny_vision_text_dual_encoder(words):
    """A ViT + BERT `VisionTextDualEncoderModel` with an in-memory WordPiece tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        VisionTextDualEncoderProcessor,
        ViTConfig,
        ViTImageProcessorPil,
    )

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words]
    backend = Tokenizer(models.WordPiece({word: index for index, word in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=77,
    )
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(image_size=32, patch_size=8, **tower),
        BertConfig(vocab_size=len(vocab), max_position_embeddings=77, **tower),
        projection_dim=16,
    )
    torch.manual_seed(0)
    processor = VisionTextDualEncoderProcessor(
        image_processor=ViTImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    return VisionTextDualEncoderModel(config), processor


def test_vision_text_dual_encoder_trains_with_the_same_code(synthetic_dataset, tmp_path):
    from mmft_hf.synthetic import caption_vocabulary

    model, processor = tiny_vision_text_dual_encoder(
        caption_vocabulary(synthetic_dataset["train"], extra_text="a photo")
    )
    trainer = MMFTTrainer(
        model=model,
        args=make_args(tmp_path, num_train_epochs=2, supcon_weight=0.5),
        train_dataset=synthetic_dataset["train"],
        eval_dataset=synthetic_dataset["validation"],
        processing_class=processor,
    )
    batch = trainer.data_collator([synthetic_dataset["train"][i] for i in range(8)])
    labels = batch["labels"].clone()
    trainer.model.eval()  # BERT and ViT have dropout: compare two identical forward passes
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        out = trainer.model(**{k: v for k, v in batch.items() if k != "labels"})
    torch.testing.assert_close(loss.detach(), mmft_loss(out.logits_per_image, out.logits_per_text, labels, 0.5))
    before = trainer.model.text_projection.weight.detach().clone()
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
    assert not torch.equal(trainer.model.text_projection.weight, before)
    assert 0.0 <= trainer.evaluate()["eval_accuracy"] <= 1.0
    trainer.save_model()
    _, labels_saved, _ = load_class_prototypes(str(tmp_path / "out"))
    assert labels_saved == synthetic_dataset["train"].features["label"].names


def test_corrupt_image_fails_with_its_row_and_file(tiny_clip, image_files_dataset, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows = image_files_dataset.to_dict()
    rows["image"] = [str(corrupt) if index == 5 else path for index, path in enumerate(rows["image"])]
    broken = datasets.Dataset.from_dict(rows, features=image_files_dataset.features)
    model, processor = tiny_clip
    args = make_args(tmp_path, per_device_train_batch_size=12, max_steps=1)
    trainer = MMFTTrainer(model=model, args=args, train_dataset=broken, processing_class=processor)
    with pytest.raises(ValueError, match=r"(?s)Row 5\b.*'image'.*corrupt\.png"):
        trainer.train()
    with pytest.raises(ValueError, match=r"(?s)Row 5\b.*corrupt\.png"):
        trainer.evaluate(broken)


def test_model_card_data_comes_from_the_run_and_the_caption_provenance(tiny_clip, synthetic_dataset, tmp_path):
    from mmft_hf.captioning.provenance import PROVENANCE_FORMAT, attach_provenance

    provenance = {
        "format": PROVENANCE_FORMAT,
        "captioner": {"backend": "openai-compatible", "model": "gemini-2.5-flash-lite"},
        "prompt_template": "describe {class_name}",
        "caption_types": ["visual", "shape", "texture"],
        "domain": "synthetic shapes",
    }
    train = attach_provenance(synthetic_dataset["train"], provenance)
    model, processor = tiny_clip
    trainer = MMFTTrainer(
        model=model, args=make_args(tmp_path, supcon_weight=0.25), train_dataset=train, processing_class=processor
    )
    trainer.evaluate(synthetic_dataset["test"], metric_key_prefix="test")
    card = trainer.model_card_data(num_shots=8)
    assert (card.captioner, card.domain, card.caption_types) == (
        "gemini-2.5-flash-lite",
        "synthetic shapes",
        ["visual", "shape", "texture"],
    )
    assert card.supcon_weight == 0.25 and card.num_shots == 8 and card.eval_split == "test"
    assert card.eval_accuracy == trainer.state.log_history[-1]["test_accuracy"]
    assert set(card.per_class_accuracy) == set(train.features["label"].names)


def test_integer_labels_with_class_names(tiny_clip, synthetic_dataset, tmp_path):
    names = synthetic_dataset["train"].features["label"].names
    plain = synthetic_dataset["train"].cast_column("label", datasets.Value("int64"))
    model, processor = tiny_clip
    with pytest.raises(ValueError, match="class_names"):
        MMFTTrainer(model=model, args=make_args(tmp_path), train_dataset=plain, processing_class=processor)
    trainer = MMFTTrainer(
        model=model, args=make_args(tmp_path), train_dataset=plain, processing_class=processor, class_names=names
    )
    assert trainer.class_names == names and trainer.model.config.id2label[1] == names[1]
    assert trainer.evaluate(synthetic_dataset["validation"])["eval_samples"] == 16


def test_texts_use_normalised_class_names_and_labels_keep_the_dataset_names(tiny_clip, synthetic_dataset, tmp_path):
    raw_names = ["001.Red_Circle", "Green-Square", "blue_triangle", "YELLOW CROSS"]
    train = synthetic_dataset["train"].cast_column("label", datasets.ClassLabel(names=raw_names))
    model, processor = tiny_clip
    trainer = MMFTTrainer(model=model, args=make_args(tmp_path), train_dataset=train, processing_class=processor)
    assert trainer.prototype_texts("single_template") == [
        ["a photo of a red circle"],
        ["a photo of a green square"],
        ["a photo of a blue triangle"],
        ["a photo of a yellow cross"],
    ]
    assert trainer.prototype_texts()[0][0].startswith("a photo of a red circle. ")
    batch_texts = processor.tokenizer.batch_decode(trainer.data_collator([train[0]])["input_ids"])
    assert batch_texts[0].startswith("<|startoftext|>a photo of a red circle . ")  # CLIP decodes "." as " ."
    assert trainer.model.config.id2label[0] == "001.Red_Circle"


def relabelled(split: datasets.Dataset, names: list[str]) -> datasets.Dataset:
    """`split` with a ClassLabel listing `names` (same classes, other order); every row keeps its class."""
    old = split.features["label"].names
    plain = split.cast_column("label", datasets.Value("int64"))
    plain = plain.map(lambda row: {"label": names.index(old[row["label"]])})
    return plain.cast_column("label", datasets.ClassLabel(names=names))


def test_evaluation_matches_labels_by_name_not_by_position(tiny_clip, synthetic_dataset, tmp_path):
    trainer = make_trainer(tiny_clip, synthetic_dataset, tmp_path)
    test = synthetic_dataset["test"]
    names = test.features["label"].names
    expected = trainer.evaluate(test, metric_key_prefix="test")
    shuffled = relabelled(test, [names[2], names[0], names[3], names[1]])
    assert shuffled.features["label"].int2str(shuffled["label"]) == test.features["label"].int2str(test["label"])
    metrics = trainer.evaluate(shuffled, metric_key_prefix="test")
    for name in ("test_accuracy", "test_balanced_accuracy", *(f"test_accuracy_{n}" for n in names)):
        assert metrics[name] == expected[name], name
    # an eval_dataset given at construction is matched too
    args = make_args(tmp_path, eval_strategy="epoch")
    model, processor = tiny_clip
    at_construction = MMFTTrainer(
        model=model, args=args, train_dataset=synthetic_dataset["train"], eval_dataset=shuffled,
        processing_class=processor,
    )  # fmt: skip
    assert at_construction.evaluate(metric_key_prefix="test")["test_accuracy"] == expected["test_accuracy"]


def test_evaluation_refuses_unknown_classes_and_unnamed_labels_whose_count_differs(
    tiny_clip, synthetic_dataset, tmp_path
):
    trainer = make_trainer(tiny_clip, synthetic_dataset, tmp_path)
    test = synthetic_dataset["test"]
    names = test.features["label"].names
    unknown = test.cast_column("label", datasets.ClassLabel(names=[names[0], "purple star", names[2], names[3]]))
    with pytest.raises(ValueError, match=r"1 class\(es\) that training does not have: \['purple star'\]"):
        trainer.evaluate(unknown)
    fewer = relabelled(test.filter(lambda row: row["label"] != 1), [names[3], names[2], names[0]])
    assert trainer.evaluate(fewer)["eval_samples"] == 12  # a split may hold fewer classes, matched by name
    plain = test.cast_column("label", datasets.Value("int64"))
    assert trainer.evaluate(plain)["eval_accuracy"] == trainer.evaluate(test)["eval_accuracy"]
    with pytest.raises(ValueError, match=r"plain integers without class names \(3 distinct values"):
        trainer.evaluate(plain.filter(lambda row: row["label"] != 1))


def test_gradient_accumulation_warns_once_and_the_card_shows_both_batches(
    tiny_clip, synthetic_dataset, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="mmft_hf.training.trainer"):
        trainer = make_trainer(tiny_clip, synthetic_dataset, tmp_path, gradient_accumulation_steps=3)
        make_trainer(tiny_clip, synthetic_dataset, tmp_path, gradient_accumulation_steps=3)
    warnings = [
        record.getMessage() for record in caplog.records if "gradient_accumulation_steps" in record.getMessage()
    ]
    assert len(warnings) == 1 and "still sees 8 pairs per batch" in warnings[0]
    hyperparameters = trainer.model_card_data().hyperparameters
    assert hyperparameters["contrastive_batch_size (pairs per loss)"] == 8
    assert hyperparameters["optimizer_batch_size (pairs per update)"] == 24
    with pytest.raises(ValueError, match="contrastive batch of one image-text pair"):
        make_trainer(tiny_clip, synthetic_dataset, tmp_path, per_device_train_batch_size=1)


def test_classes_without_training_images_are_named_and_an_empty_split_is_an_error(
    tiny_clip, synthetic_dataset, tmp_path, caplog
):
    model, processor = tiny_clip
    train = synthetic_dataset["train"].filter(lambda row: row["label"] not in (1, 3))
    with caplog.at_level(logging.WARNING, logger="mmft_hf.training.trainer"):
        MMFTTrainer(model=model, args=make_args(tmp_path), train_dataset=train, processing_class=processor)
    (warning,) = [record.getMessage() for record in caplog.records if "no training image" in record.getMessage()]
    assert "2 of 4 classes have no training image: ['green square', 'yellow cross']" in warning
    assert "fallback template 'a photo of a {}'" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmft_hf.training.trainer"):
        MMFTTrainer(
            model=model, args=make_args(tmp_path, prototype_source="ensemble"), train_dataset=train,
            processing_class=processor,
        )  # fmt: skip
    assert any("the 'ensemble' class-name templates" in record.getMessage() for record in caplog.records)
    with pytest.raises(ValueError, match=r"training split is empty \(0 rows\)"):
        MMFTTrainer(model=model, args=make_args(tmp_path), train_dataset=train.select([]), processing_class=processor)


def test_saving_or_evaluation_off_falls_back_from_best_model_selection(tiny_clip, synthetic_dataset, tmp_path):
    default = MMFTTrainingArguments(output_dir=str(tmp_path / "a"), use_cpu=True)
    assert default.load_best_model_at_end  # the paper's best-epoch selection stays the default
    for strategies in ({"save_strategy": "no"}, {"eval_strategy": "no"}, {"save_strategy": "steps"}):
        assert not MMFTTrainingArguments(
            output_dir=str(tmp_path / "a"), use_cpu=True, **strategies
        ).load_best_model_at_end
    with pytest.raises(ValueError, match="save and eval strategy to match"):  # asked for explicitly: impossible
        MMFTTrainingArguments(output_dir=str(tmp_path / "a"), save_strategy="no", load_best_model_at_end=True)
    model, processor = tiny_clip
    args = MMFTTrainingArguments(
        output_dir=str(tmp_path / "out"), save_strategy="no", num_train_epochs=2, learning_rate=1e-3,
        per_device_train_batch_size=8, disable_tqdm=True, report_to="none",
    )  # fmt: skip
    trainer = MMFTTrainer(
        model=model, args=args, train_dataset=synthetic_dataset["train"],
        eval_dataset=synthetic_dataset["validation"], processing_class=processor,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    if not torch.cuda.is_available():  # no "pin_memory ... no accelerator" warning on a CPU-only machine
        assert not [warning for warning in caught if "pin_memory" in str(warning.message)]
    assert [entry["epoch"] for entry in trainer.state.log_history if "eval_accuracy" in entry] == [1.0, 2.0]


def test_evaluation_only_trainer_needs_no_eval_strategy(tiny_clip, synthetic_dataset, tmp_path):
    model, processor = tiny_clip
    args = MMFTTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True)  # eval_strategy="epoch"
    trainer = MMFTTrainer(
        model=model, args=args, prototype_dataset=synthetic_dataset["train"], processing_class=processor
    )
    metrics = trainer.evaluate(synthetic_dataset["test"], metric_key_prefix="test")
    assert metrics["test_samples"] == 16
    assert args.eval_strategy == "epoch"  # the caller's arguments are left as they were


def test_lora_adapter_folder_holds_the_trained_logit_scale(tiny_clip, synthetic_dataset, tmp_path):
    trainer = make_trainer(
        tiny_clip, synthetic_dataset, tmp_path, use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
        learning_rate=1e-2, max_steps=2,
    )  # fmt: skip
    initial = trainer.model.get_base_model().logit_scale.detach().clone()
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    extras = load_file(str(out / "adapter" / "mmft_extra_parameters.safetensors"))
    merged = CLIPModel.from_pretrained(out)
    torch.testing.assert_close(extras["logit_scale"], merged.logit_scale.detach().reshape(-1))
    assert not torch.equal(extras["logit_scale"], initial.reshape(-1))  # the trained value, not the initial one


def test_dataloader_defaults_feed_an_accelerator_and_spare_a_cpu_run(tmp_path, monkeypatch):
    from mmft_hf.training import arguments

    args = MMFTTrainingArguments(output_dir=str(tmp_path))
    if not torch.cuda.is_available():
        assert (args.dataloader_pin_memory, args.dataloader_num_workers, args.dataloader_persistent_workers) == (
            False, 0, False,
        )  # fmt: skip
    monkeypatch.setattr(arguments, "_accelerator_available", lambda: True)
    monkeypatch.setattr(arguments, "is_torch_cuda_available", lambda: True)
    assert arguments.dataloader_defaults(cpus=16, processes_per_node=1) == {
        "dataloader_num_workers": 8, "dataloader_pin_memory": True, "dataloader_persistent_workers": True,
    }  # fmt: skip
    assert arguments.dataloader_defaults(cpus=16, processes_per_node=4)["dataloader_num_workers"] == 3
    assert arguments.dataloader_defaults(cpus=2, processes_per_node=1)["dataloader_num_workers"] == 1
    assert arguments.dataloader_defaults(use_cpu=True, cpus=16)["dataloader_num_workers"] == 0
    explicit = MMFTTrainingArguments(output_dir=str(tmp_path), use_cpu=True, dataloader_num_workers=2)
    assert explicit.dataloader_persistent_workers and not explicit.dataloader_pin_memory
