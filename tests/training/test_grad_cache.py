"""Gradient-cached contrastive batches (`--contrastive_chunk_size`): the chunked run trains the same weights as
the unchunked one. Runs in float64 so that "within float rounding" can be checked tightly."""

import contextlib
from pathlib import Path

import pytest
import torch
from conftest import run_torchrun

from mmft_hf import MMFTTrainer, MMFTTrainingArguments, mmft_loss
from mmft_hf.synthetic import build_clip
from mmft_hf.training.distributed import global_logits
from mmft_hf.training.grad_cache import RandomState, cached_gradient_objective, split_rows
from tests.training.test_trainer import make_args

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "chunked_training_check.py"
STEPS = 3
BATCH = 8
EXACT = dict(rtol=0, atol=1e-10)  # float64: the chunked and unchunked runs differ by rounding only (~1e-13)


def float64_clip(tokenizer, attention_dropout: float = 0.0):
    torch.manual_seed(0)
    model, processor = build_clip(tokenizer)
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            module.dropout = attention_dropout  # CLIPAttention reads it at each forward
    return model.to(torch.float64), processor


def train(tokenizer, dataset, tmp_path, chunk_size, trainer_class=MMFTTrainer, attention_dropout=0.0, **overrides):
    """Trains the tiny CLIP for `STEPS` optimiser steps; returns the trainer (weights and logged losses)."""
    model, processor = float64_clip(tokenizer, attention_dropout)
    args = make_args(
        tmp_path,
        output_dir=str(tmp_path / f"out-{chunk_size}"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        report_to=[],
        supcon_weight=0.5,  # both terms shape the gradients
        contrastive_chunk_size=chunk_size,
        **overrides,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=processor)
    trainer.initial_weights = weights(trainer)
    trainer.train()
    return trainer


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


def test_split_rows_slices_every_batch_tensor_and_keeps_the_rest():
    inputs = {"input_ids": torch.arange(14).reshape(7, 2), "pixel_values": torch.randn(7, 3), "flag": True}
    chunks = split_rows(inputs, 3)
    assert [len(chunk["input_ids"]) for chunk in chunks] == [3, 3, 1]
    assert all(chunk["flag"] is True for chunk in chunks)
    for key in ("input_ids", "pixel_values"):
        assert torch.equal(torch.cat([chunk[key] for chunk in chunks]), inputs[key])
    assert len(split_rows(inputs, 7)) == 1 and len(split_rows(inputs, 100)) == 1
    with pytest.raises(ValueError, match=r"disagree on the number of rows: \[6, 7\]"):
        split_rows({"input_ids": torch.zeros(7, 2), "pixel_values": torch.zeros(6, 3)}, 3)
    with pytest.raises(ValueError, match="at least 1"):
        split_rows(inputs, 0)


def test_random_state_replays_dropout_and_the_stream_continues_after_it():
    dropout = torch.nn.Dropout(0.5)
    ones = torch.ones(1000)
    state = RandomState.capture("cpu")
    first = dropout(ones)
    after = torch.get_rng_state()
    with state.replay():
        replayed = dropout(ones)
    assert torch.equal(first, replayed)
    assert torch.equal(torch.get_rng_state(), after)  # the replay does not rewind the generator
    assert not torch.equal(dropout(ones), first)  # negative control: the next draw differs


def test_cached_gradient_objective_sends_the_cached_gradients_upstream():
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    inputs = torch.randn(5, 4, dtype=torch.float64)
    target = torch.randn(5, 3, dtype=torch.float64)

    def loss_of(outputs):
        return ((outputs - target) ** 2).sum()

    loss_of(inputs @ weight).backward()
    expected, weight.grad = weight.grad.clone(), None
    outputs = (inputs @ weight).detach().requires_grad_(True)
    (cached,) = torch.autograd.grad(loss_of(outputs), [outputs])
    for rows in (slice(0, 2), slice(2, 5)):  # re-embed in two chunks, gradients add up in .grad
        cached_gradient_objective([inputs[rows] @ weight], [cached[rows]]).backward()
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="2 tensors and 1 gradients"):
        cached_gradient_objective([weight, weight], [cached])


@pytest.mark.parametrize(
    "chunk_size, overrides",
    [
        (3, {}),  # 3 does not divide the batch of 8: chunks of 3, 3, 2
        (4, {"gradient_accumulation_steps": 2, "gradient_checkpointing": True}),
        (2, {"use_lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}),
    ],
    ids=["full-model", "accumulation-checkpointing", "lora"],
)
def test_chunked_training_gives_the_unchunked_weights(
    tiny_tokenizer, synthetic_dataset, tmp_path, chunk_size, overrides
):
    plain = train(tiny_tokenizer, synthetic_dataset["train"], tmp_path, None, **overrides)
    chunked = train(tiny_tokenizer, synthetic_dataset["train"], tmp_path, chunk_size, **overrides)
    assert plain.state.global_step == chunked.state.global_step == STEPS
    assert (
        max_difference(plain.initial_weights, weights(plain)) > 1e-4
    )  # the runs moved the weights: the comparison can fail
    assert max_difference(weights(plain), weights(chunked)) < EXACT["atol"]
    assert losses(chunked) == pytest.approx(losses(plain), rel=1e-12)


class ChunkwiseForwardTrainer(MMFTTrainer):
    """Reference for dropout: the ordinary (unchunked) loss and backward through one graph, but the batch goes
    through the model in the same chunks, in the same order, as the gradient-cached pass without the graph, so that
    dropout draws the same masks. Independent of the trainer's GradCache code."""

    chunk_size = 3

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        labels = inputs.pop("labels")
        outputs = [
            model(**{key: value[start : start + self.chunk_size] for key, value in inputs.items()})
            for start in range(0, len(labels), self.chunk_size)
        ]
        image_embeds = torch.cat([output.image_embeds for output in outputs])
        text_embeds = torch.cat([output.text_embeds for output in outputs])
        scale = self.accelerator.unwrap_model(model).get_base_model().logit_scale.exp()
        logits_per_image, logits_per_text = global_logits(image_embeds, text_embeds, scale)
        return mmft_loss(logits_per_image, logits_per_text, labels, supcon_weight=self.args.supcon_weight)


def test_dropout_masks_replay_exactly(tiny_tokenizer, synthetic_dataset, tmp_path, monkeypatch):
    dropout = dict(attention_dropout=0.2, use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.2)
    reference = train(tiny_tokenizer, synthetic_dataset["train"], tmp_path, None, ChunkwiseForwardTrainer, **dropout)
    chunked = train(tiny_tokenizer, synthetic_dataset["train"], tmp_path, 3, **dropout)
    assert max_difference(weights(reference), weights(chunked)) < EXACT["atol"]
    assert losses(chunked) == pytest.approx(losses(reference), rel=1e-12)

    # negative control: without the replay the pass with gradients draws other masks, and the weights drift
    monkeypatch.setattr(RandomState, "replay", lambda self: contextlib.nullcontext())
    unreplayed = train(tiny_tokenizer, synthetic_dataset["train"], tmp_path, 3, **dropout)
    assert max_difference(weights(reference), weights(unreplayed)) > 1e-6


def test_chunk_at_least_the_batch_is_the_plain_step(tiny_tokenizer, synthetic_dataset, tmp_path, monkeypatch):
    plain = train(tiny_tokenizer, synthetic_dataset["train"], tmp_path, None)

    def refuse(*args, **kwargs):
        raise AssertionError("the gradient-cached step ran for a chunk as large as the batch")

    monkeypatch.setattr(MMFTTrainer, "_gradient_cached_step", refuse)
    same = train(tiny_tokenizer, synthetic_dataset["train"], tmp_path, BATCH)
    assert max_difference(weights(plain), weights(same)) == 0.0
    with pytest.raises(AssertionError, match="gradient-cached step ran"):
        train(tiny_tokenizer, synthetic_dataset["train"], tmp_path, BATCH - 1)


def test_chunked_training_runs_under_bf16_autocast(tiny_tokenizer, synthetic_dataset, tmp_path):
    """Both passes of every chunk run under the accelerator's autocast; the weights stay within bf16 rounding."""

    def bf16_run(chunk_size):
        torch.manual_seed(0)
        model, processor = build_clip(tiny_tokenizer)
        dtypes = []
        model.text_model.encoder.layers[0].self_attn.q_proj.register_forward_hook(
            lambda module, args, output: dtypes.append(output.dtype)
        )
        args = MMFTTrainingArguments(
            output_dir=str(tmp_path / "bf16"), max_steps=2, per_device_train_batch_size=BATCH, use_cpu=True,
            bf16=True, optim="sgd", learning_rate=1e-2, save_strategy="no", eval_strategy="no",
            load_best_model_at_end=False, seed=0, report_to=[], disable_tqdm=True, contrastive_chunk_size=chunk_size,
        )  # fmt: skip
        trainer = MMFTTrainer(
            model=model, args=args, train_dataset=synthetic_dataset["train"], processing_class=processor
        )
        trainer.train()
        return weights(trainer), dtypes

    plain, plain_dtypes = bf16_run(None)
    chunked, chunked_dtypes = bf16_run(3)
    assert len(chunked_dtypes) == 2 * 2 * 3  # 2 steps x (pass without and with graph) x 3 chunks
    assert set(plain_dtypes) == set(chunked_dtypes) == {torch.bfloat16}
    assert max_difference(plain, chunked) < 1e-3  # an SGD step of lr 1e-2 moves weights by ~1e-2


def test_chunk_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="contrastive_chunk_size must be a positive number of pairs, got 0"):
        MMFTTrainingArguments(output_dir=str(tmp_path), contrastive_chunk_size=0, use_cpu=True)


def test_two_processes_chunked_match_plain(tmp_path):
    """A real two-process DDP run (gloo, CPU): the gradient-cached step gives the plain step's weights."""
    output = tmp_path / "rank0.pt"
    run_torchrun(2, SCRIPT, output, cwd=REPO, timeout=240)
    results = torch.load(output)
    plain, chunked = results["plain"], results["chunked"]
    assert plain["world_size"] == chunked["world_size"] == 2
    assert chunked["wrapped"] == "DistributedDataParallel"
    assert len(chunked["losses"]) == 3 and chunked["losses"] == pytest.approx(plain["losses"], rel=1e-12)
    assert max_difference(plain["initial_weights"], plain["weights"]) > 1e-4  # the comparison below can fail
    assert max_difference(plain["weights"], chunked["weights"]) < EXACT["atol"]


def test_fp16_loss_scaling_reaches_the_chunked_gradients(tiny_tokenizer, synthetic_dataset, tmp_path):
    """Under fp16 the accelerator's GradScaler multiplies what is back-propagated (a GPU feature: set by hand here);
    the chunked step's gradients carry the same factor as the plain step's."""
    gradients, batch = {}, None
    for chunk_size, scale in ((None, None), (None, 1024.0), (3, 1024.0)):
        model, processor = float64_clip(tiny_tokenizer)
        args = MMFTTrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=BATCH, contrastive_chunk_size=chunk_size,
            use_cpu=True, eval_strategy="no", save_strategy="no", report_to=[], supcon_weight=0.5,
        )  # fmt: skip
        trainer = MMFTTrainer(
            model=model, args=args, train_dataset=synthetic_dataset["train"], processing_class=processor
        )
        if batch is None:
            batch = trainer.data_collator([trainer.train_dataset[index] for index in range(BATCH)])
        if scale is not None:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        trainer.current_gradient_accumulation_steps = 1  # what the training loop sets
        trainer.training_step(trainer.model, dict(batch))
        gradients[chunk_size, scale] = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    unscaled, plain, chunked = gradients[None, None], gradients[None, 1024.0], gradients[3, 1024.0]
    for name, gradient in unscaled.items():
        torch.testing.assert_close(plain[name], 1024.0 * gradient, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(chunked[name], plain[name], rtol=1e-9, atol=1e-9)
