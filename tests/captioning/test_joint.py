"""One request per image for every caption type: JSON replies, per-type keys, origins, fallback per type."""

import sqlite3

import pytest

from mmft_hf import OpenAIBatchCaptioner, caption_dataset
from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner
from mmft_hf.captioning.joint import build_joint_prompt, joint_response_format, parse_joint_reply
from mmft_hf.captioning.prompts import build_prompt

TYPES = ("visual", "shape", "texture")


@pytest.fixture
def labelled(image_files_dataset):
    return image_files_dataset.remove_columns("captions")


def sync_captioner(server):
    return OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None, max_retries=0)


def per_type_prompts(ds, row):
    name = ds.features["label"].names[ds[row]["label"]]
    return [build_prompt(name, "textures", kind) for kind in TYPES]


def origins(cache_dir):
    with sqlite3.connect(cache_dir / "captions.sqlite") as connection:
        return connection.execute("SELECT key, origin FROM caption_origins").fetchall()


def test_joint_run_makes_one_request_per_image_and_stores_every_caption(batch_api, labelled, tmp_path):
    server = batch_api()
    result = caption_dataset(
        labelled, sync_captioner(server), domain="textures", cache_dir=tmp_path, one_request_per_image=True,
        show_progress=False,
    )  # fmt: skip
    summary = result.caption_summary
    assert len(server.requests) == summary.requests == len(labelled) == 12  # one request per image
    assert summary.captions_done == 36 and summary.failures == []
    for row in range(len(labelled)):  # each caption answers its own per-type prompt, in type-major order
        assert result[row]["captions"] == [
            f"{kind} caption: {prompt}" for kind, prompt in zip(TYPES, per_type_prompts(labelled, row))
        ]
    body = server.requests[0][2]
    assert body["response_format"] == joint_response_format(TYPES)
    assert len(origins(tmp_path)) == 36 and all('"request": "joint"' in origin for _, origin in origins(tmp_path))
    # a per-type run reuses the joint captions (same per-type keys): zero requests
    again = caption_dataset(
        labelled, sync_captioner(server), domain="textures", cache_dir=tmp_path, show_progress=False
    )
    assert again.caption_summary.requests == 0 and again["captions"] == result["captions"]


def test_joint_saves_image_tokens(batch_api, labelled, tmp_path):
    per_type, joint = batch_api(), batch_api()  # the server counts an image's tiles and the prompt's words
    per_type_result = caption_dataset(
        labelled, sync_captioner(per_type), domain="textures", cache_dir=tmp_path / "a", show_progress=False
    )
    joint_result = caption_dataset(
        labelled, sync_captioner(joint), domain="textures", cache_dir=tmp_path / "b", one_request_per_image=True,
        show_progress=False,
    )  # fmt: skip
    assert len(per_type.requests) == 3 * len(joint.requests)
    per_type_tokens = per_type_result.caption_summary.usage["prompt_tokens"]
    assert joint_result.caption_summary.usage["prompt_tokens"] < 0.5 * per_type_tokens


def test_unparseable_replies_fall_back_to_per_type_requests(batch_api, labelled, tmp_path):
    server = batch_api(json_replies=False)
    result = caption_dataset(
        labelled, sync_captioner(server), domain="textures", cache_dir=tmp_path, one_request_per_image=True,
        show_progress=False,
    )  # fmt: skip
    assert len(server.requests) == 12 + 36 and result.caption_summary.failures == []
    assert result[0]["captions"] == per_type_prompts(labelled, 0)  # the echoed per-type prompts
    assert origins(tmp_path) == []  # nothing came from a joint request


def test_reply_missing_a_type_asks_only_for_that_type(batch_api, labelled, tmp_path):
    server = batch_api(drop_types=("shape",))
    result = caption_dataset(
        labelled, sync_captioner(server), domain="textures", cache_dir=tmp_path, one_request_per_image=True,
        show_progress=False,
    )  # fmt: skip
    assert len(server.requests) == 12 + 12 and result.caption_summary.failures == []
    fallback_prompts = {body["messages"][0]["content"][1]["text"] for *_, body in server.requests[12:]}
    assert fallback_prompts == {per_type_prompts(labelled, row)[1] for row in range(12)}
    assert result[0]["captions"][1] == per_type_prompts(labelled, 0)[1]
    assert result[0]["captions"][0].startswith("visual caption: ")


def test_joint_requests_through_a_batch(batch_api, labelled, tmp_path):
    server = batch_api()
    captioner = OpenAIBatchCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None, poll_interval_s=0.01)
    result = caption_dataset(
        labelled, captioner, domain="textures", cache_dir=tmp_path, one_request_per_image=True, show_progress=False
    )
    assert server.requests == [] and len(server.processed) == 12 and result.caption_summary.captions_done == 36


def test_parse_joint_reply_is_forgiving_but_never_invents_captions():
    assert parse_joint_reply('{"visual": "red", "Shape": " round "}', ["visual", "shape"]) == (
        {"visual": "red", "shape": "round"},
        "",
    )
    fenced = 'Sure!\n```json\n{"visual": "red", "shape": "round"}\n```\nAnything else?'
    assert parse_joint_reply(fenced, ["visual", "shape"])[0] == {"visual": "red", "shape": "round"}
    prose = 'Here: {"visual": "red", "shape": 3, "texture": ""} done'
    found, problem = parse_joint_reply(prose, ["visual", "shape", "texture"])
    assert found == {"visual": "red"} and "['shape', 'texture']" in problem
    assert parse_joint_reply("visual: red", ["visual"]) == ({}, "the joint reply is not a JSON object: 'visual: red'")
    assert parse_joint_reply("[1, 2]", ["visual"])[0] == {}


def test_joint_prompt_holds_each_per_type_prompt():
    prompts = {"visual": "Describe its colours.", "shape": "Describe its shape."}
    prompt = build_joint_prompt(prompts)
    assert prompt.endswith('"visual": Describe its colours.\n"shape": Describe its shape.')
    assert '"visual", "shape"' in prompt and "JSON object" in prompt
    with pytest.raises(ValueError):
        build_joint_prompt({})


def test_joint_requests_per_copy_with_several_captions_per_type(batch_api, labelled, tmp_path):
    server = batch_api()
    result = caption_dataset(
        labelled.select(range(4)), sync_captioner(server), domain="textures", cache_dir=tmp_path,
        one_request_per_image=True, captions_per_type=2, show_progress=False,
    )  # fmt: skip
    assert len(server.requests) == 8 and result.caption_summary.captions_done == 24  # one request per image and copy
    prompts = [body["messages"][0]["content"][1]["text"] for *_, body in server.requests]
    assert len(set(prompts)) == len(set(labelled.select(range(4))["label"]))  # both copies ask the same question
    assert len(origins(tmp_path)) == 24
