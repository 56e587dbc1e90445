"""The MMFT loss against an explicit double-loop reference written from method.md §5, in float64."""

import math

import pytest
import torch

import mmft_hf.training.losses as losses
from mmft_hf.training.losses import clip_loss, mmft_loss, supcon_loss

# ---------------------------------------------------------------------------------------------------------------
# Reference: scalar loops over i, j straight from the definitions (differentiable, so gradients can be compared).


def ref_logsumexp_row(z, i):
    shift = max(z[i, k].item() for k in range(z.shape[1]))  # a constant: does not change the gradient
    return shift + torch.log(sum(torch.exp(z[i, k] - shift) for k in range(z.shape[1])))


def ref_diagonal_ce(z):
    batch_size = z.shape[0]
    return sum(ref_logsumexp_row(z, i) - z[i, i] for i in range(batch_size)) / batch_size


def ref_supcon_direction(z, labels):
    batch_size, anchor_losses = z.shape[0], []
    for i in range(batch_size):
        log_normaliser = ref_logsumexp_row(z, i)
        total, count = 0.0, 0
        for j in range(batch_size):
            if labels[i] == labels[j] and i != j:  # same label, off-diagonal
                total = total + (z[i, j] - log_normaliser)
                count += 1
        if count > 0:
            anchor_losses.append(-total / count)
    if not anchor_losses:  # no positive anywhere: CE with diagonal targets
        return ref_diagonal_ce(z)
    return sum(anchor_losses) / len(anchor_losses)


def ref_mmft(logits_per_image, logits_per_text, labels, weight):
    labels = labels.tolist()
    supervised = (ref_supcon_direction(logits_per_image, labels) + ref_supcon_direction(logits_per_text, labels)) / 2
    clip = (ref_diagonal_ce(logits_per_image) + ref_diagonal_ce(logits_per_text)) / 2
    return weight * supervised + (1 - weight) * clip


# ---------------------------------------------------------------------------------------------------------------

LABEL_CASES = {
    "repeated": [0, 1, 0, 2, 1, 3, 0, 2],  # anchor with label 3 has no positive and is excluded
    "all_distinct": [4, 0, 3, 1, 2],  # fallback path
    "all_same": [2, 2, 2, 2, 2],
    "one_singleton": [0, 0, 1],
    "B1": [7],
    "B2_same": [1, 1],
    "B2_distinct": [0, 1],
}


def random_logits(batch_size, seed, transpose=True, scale=5.0):
    generator = torch.Generator().manual_seed(seed)
    logits_per_image = scale * torch.randn(batch_size, batch_size, generator=generator, dtype=torch.float64)
    if transpose:
        return logits_per_image, logits_per_image.t().clone()
    return logits_per_image, scale * torch.randn(batch_size, batch_size, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("case", list(LABEL_CASES))
@pytest.mark.parametrize("weight", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("transpose", [True, False], ids=["transposed", "independent_text_logits"])
def test_mmft_loss_matches_reference(case, weight, transpose):
    labels = torch.tensor(LABEL_CASES[case])
    logits_per_image, logits_per_text = random_logits(len(labels), seed=len(case), transpose=transpose)
    got = mmft_loss(logits_per_image, logits_per_text, labels, supcon_weight=weight)
    expected = ref_mmft(logits_per_image, logits_per_text, labels, weight)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_supcon_loss_matches_reference(case):
    labels = torch.tensor(LABEL_CASES[case])
    logits, _ = random_logits(len(labels), seed=3)
    expected = ref_supcon_direction(logits, labels.tolist())
    torch.testing.assert_close(supcon_loss(logits, labels), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["repeated", "all_distinct", "all_same", "one_singleton", "B2_same"])
@pytest.mark.parametrize("weight", [0.1, 0.7])
def test_gradients_match_reference(case, weight):
    labels = torch.tensor(LABEL_CASES[case])
    base_image, base_text = random_logits(len(labels), seed=11, transpose=False)
    grads = []
    for loss_fn in (mmft_loss, ref_mmft):
        logits_per_image = base_image.clone().requires_grad_(True)
        logits_per_text = base_text.clone().requires_grad_(True)
        loss_fn(logits_per_image, logits_per_text, labels, weight).backward()
        grads.append((logits_per_image.grad, logits_per_text.grad))
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gradcheck_supcon_loss():
    logits, _ = random_logits(5, seed=2, scale=2.0)
    logits.requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda z: supcon_loss(z, labels), (logits,))


def test_closed_form_on_equal_logits():
    # All logits equal: every log-probability is -log(B), so both terms are log(B) whatever the labels.
    for labels in ([0, 0, 0, 0], [0, 1, 2, 3], [0, 0, 1, 2]):
        logits = torch.zeros(4, 4)
        for weight in (0.0, 0.3, 1.0):
            assert mmft_loss(logits, logits, torch.tensor(labels), weight).item() == pytest.approx(math.log(4))


@pytest.mark.parametrize("weight", [0.1, 0.5, 1.0])
def test_all_distinct_labels_reduce_to_clip_loss(weight):
    logits_per_image, logits_per_text = random_logits(6, seed=5, transpose=False)
    labels = torch.arange(6)
    torch.testing.assert_close(
        mmft_loss(logits_per_image, logits_per_text, labels, weight), clip_loss(logits_per_image, logits_per_text)
    )


def test_weight_zero_is_clip_loss_and_weight_one_is_supcon():
    logits_per_image, logits_per_text = random_logits(8, seed=6, transpose=False)
    labels = torch.tensor(LABEL_CASES["repeated"])
    assert torch.equal(
        mmft_loss(logits_per_image, logits_per_text, labels, 0.0), clip_loss(logits_per_image, logits_per_text)
    )
    both_directions = (supcon_loss(logits_per_image, labels) + supcon_loss(logits_per_text, labels)) / 2
    assert torch.equal(mmft_loss(logits_per_image, logits_per_text, labels, 1.0), both_directions)
    # and the mixture is not accidentally one of them
    mixed = mmft_loss(logits_per_image, logits_per_text, labels, 0.5)
    assert abs(mixed.item() - both_directions.item()) > 1e-3
    assert abs(mixed.item() - clip_loss(logits_per_image, logits_per_text).item()) > 1e-3


def test_zero_or_one_weight_skips_the_other_term(monkeypatch):
    logits_per_image, logits_per_text = random_logits(4, seed=7)
    labels = torch.tensor([0, 0, 1, 1])

    def must_not_run(*args, **kwargs):
        raise AssertionError("a term with weight 0 was computed")

    with monkeypatch.context() as patch:
        patch.setattr(losses, "supcon_loss", must_not_run)
        mmft_loss(logits_per_image, logits_per_text, labels, 0.0)
        with pytest.raises(AssertionError, match="weight 0"):  # the patch is effective
            mmft_loss(logits_per_image, logits_per_text, labels, 0.5)
    with monkeypatch.context() as patch:
        patch.setattr(losses, "clip_loss", must_not_run)
        mmft_loss(logits_per_image, logits_per_text, labels, 1.0)


def test_weight_zero_equals_transformers_clip_loss(tiny_clip):
    model, processor = tiny_clip
    texts = ["a red circle", "a blue square", "the red circle has a round curved outline", "a green triangle"]
    inputs = processor.tokenizer(texts, padding=True, return_tensors="pt")
    pixel_values = torch.randn(len(texts), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(**inputs, pixel_values=pixel_values, return_loss=True)
    labels = torch.tensor([0, 1, 0, 2])
    got = mmft_loss(out.logits_per_image, out.logits_per_text, labels, supcon_weight=0.0)
    torch.testing.assert_close(got, out.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(clip_loss(out.logits_per_image, out.logits_per_text), out.loss, rtol=1e-6, atol=1e-6)
    # the supervised term sees the same-label pair (0, 2), so the default weight gives a different value
    assert abs(mmft_loss(out.logits_per_image, out.logits_per_text, labels).item() - out.loss.item()) > 1e-4


def near_parallel_logits(batch_size=8, dim=64, noise=0.07, scale=100.0, seed=0):
    """`scale * cos` for unit vectors with cosines around 0.99: logits near 100, beyond fp32's exp range (88.7)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=generator, dtype=torch.float64)

    def unit_vectors():
        vectors = base + noise * base.norm() / math.sqrt(dim) * torch.randn(batch_size, dim, generator=generator)
        return vectors / vectors.norm(dim=-1, keepdim=True)

    return scale * unit_vectors() @ unit_vectors().t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight", [0.1, 1.0])
def test_stable_for_large_logits_in_low_precision(dtype, weight):
    logits64 = near_parallel_logits()
    assert logits64.min() > 95 and torch.isinf(torch.exp(logits64.float())).all()  # naive log(sum(exp)) would be inf
    labels = torch.tensor(LABEL_CASES["repeated"])
    logits = logits64.to(dtype).requires_grad_(True)
    loss = mmft_loss(logits, logits.t(), labels, weight)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()
    # Computed in fp32 from the rounded logits: matches fp64 on the same rounded values.
    rounded = logits.detach().double()
    expected = ref_mmft(rounded, rounded.t(), labels, weight)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:  # rounding to fp32 itself barely moves the loss
        torch.testing.assert_close(
            loss.double(), ref_mmft(logits64, logits64.t(), labels, weight), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_fp32_outputs(dtype):
    logits = torch.randn(4, 4).to(dtype)
    labels = torch.tensor([0, 0, 1, 2])
    assert clip_loss(logits, logits.t()).dtype == torch.float32
    assert supcon_loss(logits, labels).dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: mmft_loss(torch.zeros(3, 4), torch.zeros(4, 3), torch.arange(3)), ValueError, r"square.*\(3, 4\)"),
        (lambda: mmft_loss(torch.zeros(3), torch.zeros(3), torch.arange(3)), ValueError, r"square.*\(3,\)"),
        (lambda: mmft_loss(torch.zeros(0, 0), torch.zeros(0, 0), torch.arange(0)), ValueError, "non-empty"),
        (lambda: mmft_loss(torch.zeros(3, 3), torch.zeros(4, 4), torch.arange(3)), ValueError, "same B pairs"),
        (lambda: mmft_loss(torch.zeros(3, 3), torch.zeros(3, 3), torch.arange(4)), ValueError, r"3 for these.*\(4,\)"),
        (lambda: mmft_loss(torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, 1)), ValueError, r"1-D.*\(3, 1\)"),
        (lambda: mmft_loss(torch.zeros(2, 2), torch.zeros(2, 2), [0, 1]), TypeError, "labels must be a torch.Tensor"),
        (lambda: mmft_loss([[0.0]], [[0.0]], torch.arange(1)), TypeError, "logits_per_image must be a torch.Tensor"),
        (
            lambda: mmft_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.arange(2), -0.1),
            ValueError,
            r"\[0, 1\].*-0.1",
        ),
        (lambda: mmft_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.arange(2), 1.5), ValueError, r"\[0, 1\].*1.5"),
        (lambda: mmft_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.arange(2), math.nan), ValueError, "nan"),
        (lambda: mmft_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.arange(2), True), TypeError, "bool"),
        (lambda: supcon_loss(torch.zeros(2, 3), torch.arange(2)), ValueError, r"square.*\(2, 3\)"),
        (lambda: supcon_loss(torch.zeros(2, 2), torch.arange(3)), ValueError, r"2 for these"),
        (lambda: clip_loss(torch.zeros(2, 2), torch.zeros(3, 3)), ValueError, "2x2.*3x3"),
    ],
    ids=[
        "non_square",
        "one_dim",
        "empty",
        "text_shape",
        "label_count",
        "label_2d",
        "label_list",
        "logits_list",
        "weight_negative",
        "weight_above_one",
        "weight_nan",
        "weight_bool",
        "supcon_non_square",
        "supcon_label_count",
        "clip_shapes",
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
