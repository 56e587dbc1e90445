"""Global-batch loss: a real two-process DDP run (gloo, CPU) must reproduce one process on the full batch."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import run_torchrun

from mmft_hf.training.distributed import gather_batch, global_logits
from mmft_hf.training.losses import mmft_loss

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "distributed_loss_check.py"
TEARDOWN_SCRIPT = REPO / "tests" / "scripts" / "teardown_check.py"
SUPCON_WEIGHT = 0.5  # large enough that both terms shape the gradients


def load_script():
    spec = importlib.util.spec_from_file_location("distributed_loss_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gather_batch_is_a_no_op_without_process_group():
    assert not dist.is_initialized()
    image_embeds, text_embeds = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    labels = torch.tensor([0, 1, 0])
    gathered = gather_batch(image_embeds, text_embeds, labels)
    assert gathered[0] is image_embeds and gathered[1] is text_embeds and gathered[2] is labels


def test_gather_batch_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="3 image embeddings, 2 text embeddings and 3 labels"):
        gather_batch(torch.randn(3, 4), torch.randn(2, 4), torch.arange(3))


def test_global_logits_match_clip_model(tiny_clip):
    model, processor = tiny_clip
    inputs = processor.tokenizer(
        ["a red circle", "a blue square", "a green triangle"], padding=True, return_tensors="pt"
    )
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(**inputs, pixel_values=pixel_values)
        logits_per_image, logits_per_text = global_logits(out.image_embeds, out.text_embeds, model.logit_scale.exp())
    torch.testing.assert_close(logits_per_image, out.logits_per_image, rtol=0, atol=0)
    torch.testing.assert_close(logits_per_text, out.logits_per_text, rtol=0, atol=0)
    biased_image, biased_text = global_logits(out.image_embeds, out.text_embeds, 2.0, logit_bias=torch.tensor(-1.5))
    expected = 2.0 * out.image_embeds @ out.text_embeds.t() - 1.5
    torch.testing.assert_close(biased_image, expected)
    torch.testing.assert_close(biased_text, expected.t())
    with pytest.raises(ValueError, match="same D"):
        global_logits(torch.randn(2, 4), torch.randn(2, 5), 1.0)


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    output = tmp_path / "rank0.pt"
    run_torchrun(2, SCRIPT, output, "--supcon-weight", SUPCON_WEIGHT, cwd=REPO, timeout=180)
    distributed = torch.load(output)
    assert distributed["world_size"] == 2

    # One process, full batch of 8, CLIPModel's own logits (not global_logits), same weights and data.
    script = load_script()
    model, _, labels = script.build_model_and_batch()
    model.load_state_dict(distributed["state_dict"])
    out = model(**distributed["inputs"], return_dict=True)
    loss = mmft_loss(out.logits_per_image, out.logits_per_text, labels, supcon_weight=SUPCON_WEIGHT)
    loss.backward()
    expected_grads = dict(model.named_parameters())

    for split in script.SPLITS:  # equal (4, 4) and unequal (5, 3) local batches
        run = distributed[split]
        assert torch.equal(run["labels"], labels)  # gathered in rank order
        for rank_loss in run["losses"]:  # every process computed the global loss
            torch.testing.assert_close(rank_loss, loss.detach(), rtol=1e-12, atol=1e-12)
        # negative control: rank 0's batch alone gives another loss, so the comparison above can fail
        assert abs(run["local_loss"].item() - loss.item()) > 0.1
        assert run["grads"].keys() == expected_grads.keys()
        for name, parameter in expected_grads.items():
            assert parameter.grad is not None and run["grads"][name] is not None, name
            torch.testing.assert_close(
                run["grads"][name],
                parameter.grad,
                rtol=1e-9,
                atol=1e-12,
                msg=lambda m, s=split, n=name: f"{s} {n}: {m}",
            )
    assert expected_grads["logit_scale"].grad.abs() > 1e-3  # the learnable temperature is part of the check


def test_torchrun_timeout_kills_the_run_and_shows_its_output(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\nprint('worker started', flush=True)\ntime.sleep(300)\n")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)timed out after 10 s\..*worker started"):
        run_torchrun(1, script, cwd=tmp_path, timeout=10)


def test_teardown_frees_a_group_whose_gloo_worker_still_holds_work(tmp_path):
    """The commands' `process_group_teardown` on two real processes, when the group outlives `destroy_process_group`
    in a DDP reference cycle and its gloo worker still owns an unfinished all_gather (see the script). Leaving the
    group to the interpreter's exit aborted a rank (SIGABRT, "terminate called without an active exception");
    freeing it inside the garbage collection, holding the GIL, deadlocked. Both ranks must exit 0, threads joined."""
    finished = run_torchrun(2, TEARDOWN_SCRIPT, cwd=tmp_path, timeout=60)
    assert finished.stdout.count("gloo threads after the teardown: none") == 2, finished.stdout
