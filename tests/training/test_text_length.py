"""Text length from one place (issue 15 item 5): a SigLIP whose tokenizer allows 77 tokens but whose text tower has
64 positions trains, and the collator, the class prototypes and the caption statistics all cut texts at 64."""

import sys
from pathlib import Path

import datasets
import torch
from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

from mmft_hf import MMFTTrainer, MMFTTrainingArguments
from mmft_hf.captioning.stats import caption_stats, dataset_clip_score
from mmft_hf.encoders import max_text_length
from mmft_hf.synthetic import caption_vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "classification"))
from dual_encoders import TOWER, siglip_text_config, siglip_tokenizer  # noqa: E402

POSITIONS, TOKENIZER_LIMIT = 64, 77


def tiny_siglip(words):
    tokenizer = siglip_tokenizer(words)
    tokenizer.model_max_length = TOKENIZER_LIMIT
    text_config = siglip_text_config(tokenizer) | {"max_position_embeddings": POSITIONS}
    config = SiglipConfig(text_config=text_config, vision_config=dict(image_size=32, patch_size=8, **TOWER))
    torch.manual_seed(0)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    return SiglipModel(config), SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def with_long_captions(split: datasets.Dataset) -> datasets.Dataset:
    """Every row gets a caption of ~100 words as well, so some texts exceed both 64 and 77 tokens."""

    def lengthen(row):
        return {"captions": [*row["captions"], " ".join(row["captions"] * 10)]}

    return split.map(lengthen)


def text_lengths(model) -> list[int]:
    """Records the token length of every text the model's text tower embeds."""
    lengths = []
    model.text_model.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((kwargs.get("input_ids") if not args else args[0]).shape[1]),
        with_kwargs=True,
    )
    return lengths


def test_siglip_with_fewer_positions_than_its_tokenizer_allows(synthetic_dataset, tmp_path):
    train = with_long_captions(synthetic_dataset["train"])
    model, processor = tiny_siglip(caption_vocabulary(train, extra_text="a photo of a"))
    assert processor.tokenizer.model_max_length == TOKENIZER_LIMIT
    assert max_text_length(model, processor.tokenizer) == POSITIONS
    lengths = text_lengths(model)
    args = MMFTTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, use_cpu=True,
        save_strategy="no", eval_strategy="no", load_best_model_at_end=False, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    trainer = MMFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor)
    assert trainer.data_collator.max_length == POSITIONS
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(8)])
    assert batch["input_ids"].shape == (8, POSITIONS)  # SigLIP pads to the limit
    eos = processor.tokenizer.eos_token_id
    assert (batch["input_ids"][:, -1] == eos).any()  # a cut text keeps its end token
    lengths.clear()
    trainer.train()  # crashed before: "Sequence length must be less than max_position_embeddings (got 77 ...)"
    assert lengths and set(lengths) == {POSITIONS}

    lengths.clear()
    prototypes = trainer.compute_class_prototypes()
    assert prototypes.shape[0] == 4 and set(lengths) == {POSITIONS}

    report = caption_stats(train, processor.tokenizer, model=model)
    assert report["max_length"] == POSITIONS
    assert report["all"]["fraction_over_max_length"] > 0  # the long captions count as cut at 64
    assert caption_stats(train, processor.tokenizer)["max_length"] == TOKENIZER_LIMIT  # no model: the tokenizer's
    lengths.clear()
    scores = dataset_clip_score(train.select(range(4)), model, processor, batch_size=4)
    assert scores["all"]["count"] == 16 and set(lengths) == {POSITIONS}
