import pytest
import torch
from peft import LoraConfig, get_peft_model

from mmft_hf.classification.prototypes import (
    OPENAI_IMAGENET_TEMPLATES,
    build_class_prototypes,
    encode_texts,
    load_class_prototypes,
    save_class_prototypes,
    zero_shot_prototypes,
)
from mmft_hf.classification.remote_pipeline import write_prototypes_file


def reference_prototype(model, tokenizer, texts):
    """Independent reference: one text at a time, normalise, mean, normalise."""
    embeddings = []
    for text in texts:
        tokens = tokenizer([text], return_tensors="pt", truncation=True, max_length=77)
        feature = model.get_text_features(**tokens).pooler_output[0]
        embeddings.append(feature / feature.norm())
    mean = torch.stack(embeddings).mean(0)
    return mean / mean.norm()


def test_prototypes_match_one_at_a_time_reference(tiny_clip):
    model, processor = tiny_clip
    class_texts = [["a red circle", "the circle has round curved outline", "red"], ["a blue square"], ["x"] * 5]
    with torch.no_grad():
        expected = torch.stack([reference_prototype(model, processor.tokenizer, texts) for texts in class_texts])
        for batch_size in (1, 2, 256):  # batching and padding must not change the result
            got = build_class_prototypes(model, processor.tokenizer, class_texts, batch_size=batch_size)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))


def test_encode_texts_keeps_eos_when_truncating(tiny_clip):
    model, processor = tiny_clip
    long_text = " ".join(["red"] * 200)
    embedding = encode_texts(model, processor.tokenizer, [long_text])
    tokens = processor.tokenizer([long_text], truncation=True, max_length=77, return_tensors="pt")
    assert tokens.input_ids.shape[1] == 77 and tokens.input_ids[0, -1].item() == processor.tokenizer.eos_token_id
    with torch.no_grad():
        expected = model.get_text_features(**tokens).pooler_output
    torch.testing.assert_close(embedding, torch.nn.functional.normalize(expected, dim=-1))


def test_class_without_texts_is_an_error(tiny_clip):
    model, processor = tiny_clip
    with pytest.raises(ValueError, match=r"Classes \[1\] have no texts"):
        build_class_prototypes(model, processor.tokenizer, [["a"], []])


def test_zero_shot_ensemble_averages_templates(tiny_clip):
    model, processor = tiny_clip
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    names = ["red circle", "blue square"]
    with torch.no_grad():
        ensemble = zero_shot_prototypes(model, processor.tokenizer, names, OPENAI_IMAGENET_TEMPLATES, batch_size=33)
        expected = torch.stack(
            [
                reference_prototype(model, processor.tokenizer, [t.format(n) for t in OPENAI_IMAGENET_TEMPLATES])
                for n in names
            ]
        )
    torch.testing.assert_close(ensemble, expected, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    prototypes = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    save_class_prototypes(prototypes, ["a", "b", "c"], str(tmp_path), metadata={"source": "captions"})
    loaded, labels, metadata = load_class_prototypes(str(tmp_path))
    torch.testing.assert_close(loaded, prototypes)
    assert labels == ["a", "b", "c"] and metadata == {"source": "captions"}


def test_save_rejects_mismatched_labels(tmp_path):
    with pytest.raises(ValueError, match="do not match 2 labels"):
        save_class_prototypes(torch.zeros(3, 4), ["a", "b"], str(tmp_path))


def test_load_without_prototypes_explains_how_to_build_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_class_prototypes"):
        load_class_prototypes(str(tmp_path))


def test_load_rejects_a_file_with_mismatched_labels(tmp_path):
    write_prototypes_file(torch.zeros(3, 4), ["a", "b"], str(tmp_path))  # the unchecked writer
    with pytest.raises(ValueError, match="holds 3 prototypes but 2 labels"):
        load_class_prototypes(str(tmp_path))


def dropout_lora(model, seed=0):
    """LoRA with dropout 0.5 and non-zero B, so the text features are random in train mode."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def test_prototypes_are_deterministic_in_train_mode_and_modes_are_restored(tiny_clip):
    model, processor = tiny_clip
    model = dropout_lora(model)
    class_texts = [["a red circle", "red"], ["a blue square"]]
    model.eval()
    with torch.no_grad():
        expected = build_class_prototypes(model, processor.tokenizer, class_texts)
    model.train()
    frozen = model.base_model.model.vision_model  # a submodule the caller keeps in eval mode
    frozen.eval()
    torch.manual_seed(1)
    first = build_class_prototypes(model, processor.tokenizer, class_texts)
    second = build_class_prototypes(model, processor.tokenizer, class_texts)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    torch.testing.assert_close(
        encode_texts(model, processor.tokenizer, ["red"]), encode_texts(model, processor.tokenizer, ["red"])
    )
    assert model.training and model.base_model.model.text_model.training  # given back in train mode ...
    assert not frozen.training and not any(module.training for module in frozen.modules())  # ... exactly as it was
