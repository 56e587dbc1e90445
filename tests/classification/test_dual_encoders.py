"""Every dual encoder family transformers has (CLIP, SigLIP, SigLIP 2, and `VisionTextDualEncoderModel` with a
CNN image tower) trains with `MMFTTrainer`, saves, loads with its own `from_pretrained`, and classifies through
the library pipeline and through the repository's remote-code copy. Tiny models built from configs, offline."""

import os
from types import SimpleNamespace

import pytest
import torch
from dual_encoders import BUILDERS, build
from transformers import pipeline

from mmft_hf import MMFTTrainer, MMFTTrainingArguments
from mmft_hf.classification.pipeline import MMFTClassificationPipeline
from mmft_hf.classification.prototypes import load_class_prototypes
from mmft_hf.synthetic import caption_vocabulary

# What each family's text tower needs (stated here independently of mmft_hf.encoders.text_padding): SigLIP pools
# the last position and was trained on texts padded to the context length; the others pool EOS / [CLS].
TEXT_PADDING = {"clip": True, "siglip": "max_length", "siglip2": "max_length", "cnn-dual-encoder": True}


@pytest.fixture(scope="module", params=list(BUILDERS))
def trained(request, synthetic_dataset, tmp_path_factory):
    family = request.param
    words = caption_vocabulary(synthetic_dataset["train"], extra_text="a photo of a")
    model, processor = build(family, words)
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    directory = tmp_path_factory.mktemp(family)
    args = MMFTTrainingArguments(
        output_dir=str(directory),
        learning_rate=1e-3,
        max_steps=2,
        per_device_train_batch_size=8,
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        seed=0,
        disable_tqdm=True,
        report_to="none",
    )
    trainer = MMFTTrainer(model=model, args=args, train_dataset=synthetic_dataset["train"], processing_class=processor)
    batch = trainer.data_collator([synthetic_dataset["train"][index] for index in range(4)])
    result = trainer.train()
    trainer.save_model()
    return SimpleNamespace(
        family=family,
        model=model.eval(),
        processor=processor,
        directory=str(directory),
        before=before,
        result=result,
        batch=batch,
    )


@pytest.fixture(scope="module")
def images(synthetic_dataset):
    return list(synthetic_dataset["test"].select(range(4))["image"])


def image_inputs(processor, images):
    return dict(processor.image_processor(images=images, return_tensors="pt"))


def test_training_batches_carry_what_the_family_needs(trained):
    batch, tokenizer = trained.batch, trained.processor.tokenizer
    names = getattr(trained.processor.image_processor, "model_input_names", ["pixel_values"])
    assert set(names) <= set(batch)  # SigLIP 2: pixel_attention_mask and spatial_shapes too
    lengths = batch["attention_mask"].sum(dim=1)
    if TEXT_PADDING[trained.family] == "max_length":
        assert batch["input_ids"].shape[1] == tokenizer.model_max_length and lengths.max() < tokenizer.model_max_length
    else:
        assert batch["input_ids"].shape[1] == lengths.max()


def test_trains_saves_and_loads_with_its_own_class(trained):
    assert trained.result.global_step == 2 and torch.isfinite(torch.tensor(trained.result.training_loss))
    changed = {
        name for name, value in trained.model.named_parameters() if not torch.equal(value, trained.before[name])
    }
    assert any(name.startswith(("text_model", "text_projection")) for name in changed), trained.family
    assert any(name.startswith(("vision_model", "visual_projection")) for name in changed), trained.family
    loaded = type(trained.model).from_pretrained(trained.directory)
    for name, value in trained.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert os.path.isfile(os.path.join(trained.directory, "class_prototypes.safetensors"))


def test_pipeline_scores_equal_the_models_own_logits(trained, images):
    """Zero-shot through the pipeline vs the model's own forward (its pooling, logit scale and SigLIP's bias)."""
    names = ["red circle", "green square", "blue triangle", "yellow cross"]
    classifier = pipeline("mmft-classification", model=trained.directory, class_names=names, device="cpu")
    assert type(classifier) is MMFTClassificationPipeline
    texts = [f"a photo of a {name}" for name in names]
    tokenizer = trained.processor.tokenizer
    tokens = tokenizer(
        texts, padding=TEXT_PADDING[trained.family], truncation=True, max_length=tokenizer.model_max_length
    )
    with torch.no_grad():
        inputs = {**image_inputs(trained.processor, images), **{k: torch.tensor(v) for k, v in tokens.items()}}
        inputs.pop("token_type_ids", None)
        logits = trained.model(**inputs).logits_per_image
    outputs = classifier(images, top_k=len(names), function_to_apply="none")
    got = torch.tensor([[{o["label"]: o["score"] for o in out}[name] for name in names] for out in outputs])
    torch.testing.assert_close(got, logits, atol=1e-4, rtol=1e-4)
    if trained.family.startswith("siglip"):  # SigLIP's probabilities are sigmoids of the biased logits
        sigmoid = classifier(images[0], top_k=len(names), function_to_apply="sigmoid")
        assert sorted(o["score"] for o in sigmoid) == pytest.approx(sorted(logits[0].sigmoid().tolist()), abs=1e-5)


def test_stored_prototypes_classify_through_the_library_and_the_remote_copy(trained, images, tmp_path):
    classifier = pipeline("mmft-classification", model=trained.directory, device="cpu")
    prototypes, labels, _ = load_class_prototypes(trained.directory)
    with torch.no_grad():  # independent reference: image features -> cosine -> exp(scale) (+ bias) -> softmax
        features = trained.model.get_image_features(**image_inputs(trained.processor, images)).pooler_output
        cosine = torch.nn.functional.normalize(features, dim=-1) @ torch.nn.functional.normalize(prototypes, dim=-1).T
        bias = getattr(trained.model, "logit_bias", torch.zeros(1))
        expected = (trained.model.logit_scale.exp() * cosine + bias).softmax(dim=-1)
    outputs = classifier(images, top_k=len(labels), batch_size=3)
    got = torch.tensor([[{o["label"]: o["score"] for o in out}[label] for label in labels] for out in outputs])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    classifier.save_pretrained(tmp_path / "published")  # with remote_pipeline.py
    card = (tmp_path / "published" / "README.md").read_text()
    assert f"standard `{type(trained.model).__name__}`" in card  # the card names the family's own class
    remote = pipeline(model=str(tmp_path / "published"), trust_remote_code=True, device="cpu")
    assert type(remote).__module__.startswith("transformers_modules.")
    assert isinstance(remote.model, type(trained.model))
    for mine, theirs in zip(outputs, remote(images, top_k=len(labels), batch_size=3)):
        assert [o["label"] for o in theirs] == [o["label"] for o in mine]
        assert [o["score"] for o in theirs] == pytest.approx([o["score"] for o in mine], abs=1e-5)
