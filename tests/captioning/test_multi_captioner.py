"""Several captioners per image (issue 14 item 1), against the loopback chat server: one request per image, type
and model; a rerun pays nothing; adding a captioner pays only for it; `caption_sources` parallel to `captions`;
provenance, builder, card and the CLI list every captioner; training reads a two-captioner dataset."""

import json
import socket
from collections import Counter

import datasets
import pytest

from mmft_hf.captioning.builder import CaptionedImages, push_captioned
from mmft_hf.captioning.caption import CaptioningError, caption_dataset, caption_provenance, merge_caption_shards
from mmft_hf.captioning.captioners import CaptionerConnectionError, OpenAICompatibleCaptioner
from mmft_hf.captioning.prompts import build_prompt
from mmft_hf.captioning.provenance import MULTI_CAPTION_ORDER, caption_source
from mmft_hf.commands import caption as caption_command
from tests.captioning.test_caption import FakeCaptioner
from tests.fake_chat_server import FakeChatHandler, start_fake_api

TYPES = ("shape", "texture")


class ModelEchoHandler(FakeChatHandler):
    """Answers `[model] prompt`, so each caption shows which model wrote it."""

    def reply(self, body: dict) -> str:
        return f"[{body['model']}] {super().reply(body).strip()}"


@pytest.fixture
def server():
    server = start_fake_api()
    server.RequestHandlerClass = ModelEchoHandler  # read per connection: set before any request
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def four(image_files_dataset):
    """4 rows on real image files, 3 classes, no captions (8 captions per captioner with `TYPES`)."""
    return image_files_dataset.remove_columns("captions").select(range(4))


def api(server, model, **kwargs):
    return OpenAICompatibleCaptioner(model, base_url=server.base_url, api_key_env=None, max_concurrency=4, **kwargs)


def sent(server):
    """`(model, prompt, image data URL)` of every request the server received."""
    result = []
    for _, _, body in server.requests:
        content = body["messages"][-1]["content"]
        prompt = " ".join(part["text"] for part in content if part.get("type") == "text")
        image = next(part["image_url"]["url"] for part in content if part.get("type") == "image_url")
        result.append((body["model"], prompt, image))
    return result


def run(ds, captioners, tmp_path, **kwargs):
    return caption_dataset(
        ds, captioners, domain="textures", caption_types=TYPES, cache_dir=tmp_path / "cache", show_progress=False,
        **kwargs,
    )  # fmt: skip


def expected_captions(ds, row, models):
    name = ds.features["label"].names[ds[row]["label"]]
    return [f"[{model}] {build_prompt(name, 'textures', kind)}" for model in models for kind in TYPES]


def test_two_captioners_one_request_per_image_type_and_model_then_a_third_pays_only_for_itself(server, four, tmp_path):
    first, second = api(server, "model-a"), api(server, "model-b")
    result = run(four, [first, second], tmp_path)
    requests = sent(server)
    assert len(requests) == len(set(requests)) == 4 * 2 * 2  # rows x types x models, none twice
    assert Counter(model for model, _, _ in requests) == {"model-a": 8, "model-b": 8}
    sources = [caption_source(first.cache_identity()), caption_source(second.cache_identity())]
    assert sources[0].startswith("model-a#") and sources[1].startswith("model-b#") and len(set(sources)) == 2
    assert result.column_names == ["image", "label", "captions", "caption_sources"]
    for row in range(4):  # captioner-major, then type-major; sources parallel
        assert result[row]["captions"] == expected_captions(four, row, ["model-a", "model-b"])
        assert result[row]["caption_sources"] == [sources[0]] * 2 + [sources[1]] * 2
    provenance = caption_provenance(result)
    assert provenance["captioner"] == [first.cache_identity(), second.cache_identity()]
    assert provenance["caption_sources"] == sources and provenance["caption_order"] == MULTI_CAPTION_ORDER
    assert provenance["counts"]["captions"] == provenance["counts"]["captions_expected"] == 16
    summary = result.caption_summary
    assert (summary.requests, summary.cache_hits, summary.captions_expected, summary.captions_done) == (16, 0, 16, 16)

    again = run(four, [first, second], tmp_path)  # a rerun pays nothing
    assert len(server.requests) == 16 and again.caption_summary.cache_hits == 16
    assert again["captions"] == result["captions"] and again["caption_sources"] == result["caption_sources"]

    third = api(server, "model-c")
    three = run(four, [first, second, third], tmp_path)
    assert Counter(model for model, _, _ in sent(server)[16:]) == {"model-c": 8}  # only the new captioner
    assert three.caption_summary.cache_hits == 16 and three.caption_summary.requests == 8
    assert [row[:4] for row in three["captions"]] == result["captions"]
    assert three[0]["captions"][4:] == expected_captions(four, 0, ["model-c"])
    assert three[0]["caption_sources"][4:] == [caption_source(third.cache_identity())] * 2

    # one captioner reads exactly as before: no caption_sources, one identity; its captions come from the cache
    single = run(four, second, tmp_path)
    assert single.column_names == ["image", "label", "captions"] and len(server.requests) == 24
    assert caption_provenance(single)["captioner"] == second.cache_identity()
    assert "caption_sources" not in caption_provenance(single)
    assert [row[2:4] for row in result["captions"]] == single["captions"]


def test_settings_identity_separates_two_captioners_of_one_model(server, four, tmp_path):
    cold, warm = api(server, "model-a", temperature=0.0), api(server, "model-a", temperature=0.9)
    result = run(four, [cold, warm], tmp_path)
    assert len(server.requests) == 16  # the same model twice, two settings: two captions per image and type
    sources = result[0]["caption_sources"]
    assert sources[0] != sources[2] and {source.split("#")[0] for source in sources} == {"model-a"}
    with pytest.raises(ValueError, match="captioners 0 and 1 have the same identity"):
        run(four, [cold, api(server, "model-a", temperature=0.0)], tmp_path)
    with pytest.raises(ValueError, match="already has a 'caption_sources' column"):
        run(result.remove_columns("captions"), [cold, warm], tmp_path)


def test_missing_captions_keep_sources_parallel_and_name_their_captioner(four, tmp_path):
    first = FakeCaptioner(model="fake-a")
    second = FakeCaptioner(model="fake-b", fail=lambda request, seen: "texture characteristics" in request.prompt)
    with pytest.raises(CaptioningError, match=r"captioner fake-b#\w{8}, caption type 'texture'"):
        run(four, [first, second], tmp_path, max_passes=1)
    kept = run(four, [first, second], tmp_path, max_passes=1, allow_missing=True)
    source_a, source_b = (caption_source(c.cache_identity()) for c in (first, second))
    for captions, sources in zip(kept["captions"], kept["caption_sources"], strict=True):
        assert len(captions) == 3 and sources == [source_a, source_a, source_b]
        assert "shape" in captions[2] and all("#" in caption for caption in captions)
    assert caption_provenance(kept)["counts"]["rows_incomplete"] == 4


def test_an_unreachable_captioner_stops_with_one_line_naming_it_and_counting_every_cached_caption(
    server, four, tmp_path
):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = OpenAICompatibleCaptioner(
            "model-b", base_url=f"http://127.0.0.1:{probe.getsockname()[1]}/v1", api_key_env=None, max_retries=0
        )
    for order in ([api(server, "model-a"), dead], [dead, api(server, "model-a")]):
        with pytest.raises(CaptionerConnectionError) as info:
            run(four, order, tmp_path)
        message = str(info.value)
        assert (
            message.startswith(f"captioner {caption_source(dead.cache_identity())}: Cannot connect")
            and "\n" not in message
        )
        assert "8 of 16 captions are cached" in message  # model-a's, whichever runs first
    assert Counter(model for model, _, _ in sent(server)) == {"model-a": 8}


def test_shards_of_a_two_captioner_run_merge_with_their_sources(four, tmp_path):
    first, second = FakeCaptioner(model="fake-a"), FakeCaptioner(model="fake-b")
    shards = [run(four, [first, second], tmp_path, num_shards=2, shard_index=index) for index in (1, 0)]
    merged = merge_caption_shards(shards)
    whole = run(four, [first, second], tmp_path)  # every caption a cache hit
    assert whole.caption_summary.requests == 0 and len(first.requests) == len(second.requests) == 8
    assert merged["captions"] == whole["captions"] and merged["caption_sources"] == whole["caption_sources"]
    assert caption_provenance(merged)["counts"] == caption_provenance(whole)["counts"]


def test_caption_stats_attribute_each_captioners_captions_to_their_types(four, tmp_path):
    from mmft_hf.captioning.stats import caption_stats

    two = run(four, [FakeCaptioner(model="fake-a"), FakeCaptioner(model="fake-b")], tmp_path)
    report = caption_stats(two)  # the card's statistics: types from the provenance, captioner-major rows
    assert report["rows_incomplete"] == 0
    assert report["shape"]["captions"] == report["texture"]["captions"] == 4 * 2  # rows x captioners
    assert report["all"]["captions"] == 16


def test_builder_and_card_list_every_captioner(four, tmp_path):
    first, second = FakeCaptioner(model="fake-a"), FakeCaptioner(model="fake-b")
    builder = CaptionedImages(
        source=datasets.DatasetDict({"train": four}),
        domain="textures",
        caption_types=TYPES,
        captioner=[first, second],
        dataset_name="captioned_two",
        cache_dir=str(tmp_path / "hf"),
        caption_cache_dir=str(tmp_path / "captions"),
    )
    builder.download_and_prepare()
    train = builder.as_dataset()["train"]
    sources = [caption_source(c.cache_identity()) for c in (first, second)]
    assert [len(c) for c in train["captions"]] == [4] * 4 and train[0]["caption_sources"] == [sources[0]] * 2 + [
        sources[1]
    ] * 2
    assert caption_provenance(train)["captioner"] == [first.cache_identity(), second.cache_identity()]
    assert len(first.requests) == len(second.requests) == 8
    test = four.select(range(2))  # an uncaptioned split gets empty captions and sources
    out = push_captioned(datasets.DatasetDict({"train": train, "test": test}), str(tmp_path / "pushed"))
    card = (tmp_path / "pushed" / "README.md").read_text()
    assert "**Captioners** (2, in caption order" in card and all(f"`{source}`" in card for source in sources)
    assert "captioner-major" in card and "fake-a, fake-b" in card
    loaded = datasets.load_dataset(out, cache_dir=str(tmp_path / "hf2"))
    assert loaded["train"]["caption_sources"] == train["caption_sources"]
    assert loaded["test"]["caption_sources"] == [[], []]
    assert caption_provenance(loaded["train"])["caption_sources"] == sources


def test_builder_with_several_specs_builds_each_with_its_own_settings(four, tmp_path, monkeypatch):
    built = []

    def fake_make_captioner(spec, **kwargs):
        built.append((spec, kwargs))
        return FakeCaptioner(model=f"{spec}-{kwargs.get('temperature')}")

    monkeypatch.setattr("mmft_hf.captioning.builder.make_captioner", fake_make_captioner)
    builder = CaptionedImages(
        source=four,
        domain="textures",
        caption_types=TYPES,
        captioner=["openai:a", {"spec": "openai:b", "temperature": 0.9}],
        captioner_kwargs={"temperature": 0.1},
        dataset_name="captioned_specs",
        cache_dir=str(tmp_path / "hf"),
        caption_cache_dir=str(tmp_path / "captions"),
    )
    assert built == []  # nothing is built before preparing
    builder.download_and_prepare()
    assert built == [("openai:a", {"temperature": 0.1}), ("openai:b", {"temperature": 0.9})]
    train = builder.as_dataset()["train"]
    assert [source.split("#")[0] for source in train[0]["caption_sources"]] == ["openai:a-0.1"] * 2 + [
        "openai:b-0.9"
    ] * 2


def test_captioner_specs_carry_their_own_settings():
    args = caption_command.CaptioningArguments(base_url="http://shared/v1", temperature=0.2)
    spec, own = caption_command.parse_captioner_spec(
        'openai:m,base_url=http://local:8000/v1,api_key_env=none,temperature=0.7,extra_body={"a": 1, "b": [2, 3]}',
        args,
    )
    assert spec == "openai:m" and (own.base_url, own.api_key_env, own.temperature) == (
        "http://local:8000/v1",
        "none",
        0.7,
    )
    assert json.loads(own.extra_body) == {"a": 1, "b": [2, 3]} and args.base_url == "http://shared/v1"
    kwargs = caption_command.captioner_kwargs(own, spec)
    assert kwargs["api_key_env"] is None and kwargs["extra_body"] == {"a": 1, "b": [2, 3]}
    assert caption_command.parse_captioner_spec("openai:m", args) == ("openai:m", args)
    with pytest.raises(ValueError, match="unknown setting 'base'; a captioner's own settings are base_url"):
        caption_command.parse_captioner_spec("openai:m,base=x", args)
    with pytest.raises(ValueError, match="temperature must be float, got 'hot'"):
        caption_command.parse_captioner_spec("openai:m,temperature=hot", args)


def test_cli_with_two_captioners_writes_sources_and_a_card_listing_both(server, four, tmp_path, capsys):
    four.save_to_disk(str(tmp_path / "source"))
    argv = [
        "--dataset_name", str(tmp_path / "source"), "--domain", "textures", "--caption_types", *TYPES,
        "--captioner", "openai:model-a", "--captioner", "openai:model-b,temperature=0.5,max_tokens=64",
        "--base_url", server.base_url, "--api_key_env", "none", "--cache_dir", str(tmp_path / "cache"),
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    summaries = caption_command.main(argv)
    assert summaries["train"].requests == 16 and summaries["train"].captions_done == 16
    bodies = [body for _, _, body in server.requests]
    assert {(b["model"], b["temperature"], b["max_tokens"]) for b in bodies} == {
        ("model-a", 0.2, 256),
        ("model-b", 0.5, 64),
    }
    loaded = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))["train"]
    assert [source.split("#")[0] for source in loaded[0]["caption_sources"]] == ["model-a"] * 2 + ["model-b"] * 2
    assert [caption.split("]")[0] for caption in loaded[0]["captions"]] == ["[model-a"] * 2 + ["[model-b"] * 2
    card = (tmp_path / "out" / "README.md").read_text()
    assert all(f"`{source}`" in card for source in loaded[0]["caption_sources"])
    caption_command.main([*argv[:-1], str(tmp_path / "again")])  # a rerun pays nothing
    assert len(server.requests) == 16
    with pytest.raises(ValueError, match="--export_requests writes one captioner's requests"):
        caption_command.main([*argv, "--export_requests", str(tmp_path / "requests.jsonl")])


def test_training_and_the_benchmark_read_a_two_captioner_dataset(
    tiny_clip, tiny_clip_dir, synthetic_dataset, tmp_path
):
    from mmft_hf import MMFTTrainer
    from mmft_hf.commands import benchmark
    from mmft_hf.evaluation.protocol import select_caption_types
    from mmft_hf.training.data import validate_captioned_dataset
    from tests.training.test_trainer import make_args

    plain = synthetic_dataset["train"].remove_columns("captions")
    two = caption_dataset(
        plain, [FakeCaptioner(model="fake-a"), FakeCaptioner(model="fake-b")], domain="shapes",
        caption_types=("shape", "texture"), cache_dir=tmp_path / "cache", show_progress=False,
    )  # fmt: skip
    assert all(len(captions) == 4 for captions in two["captions"])
    validate_captioned_dataset(two)
    # the benchmark's caption-type ablation keeps the type in every captioner's block, sources alike
    texture = select_caption_types(two, ["texture"])
    assert [row[1::2] for row in two["captions"]] == texture["captions"]
    assert [row[1::2] for row in two["caption_sources"]] == texture["caption_sources"]
    model, processor = tiny_clip
    trainer = MMFTTrainer(model=model, args=make_args(tmp_path), train_dataset=two, processing_class=processor)
    trainer.train()
    metrics = trainer.evaluate(synthetic_dataset["test"], metric_key_prefix="test")
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert trainer.model_card_data(num_shots=0).captioner == "fake-a, fake-b"
    # one benchmark cell (mmft, 2 shots, one seed) on the saved two-captioner dataset
    datasets.DatasetDict(
        train=two, validation=synthetic_dataset["validation"], test=synthetic_dataset["test"]
    ).save_to_disk(str(tmp_path / "two"))
    summary = benchmark.main([
        "--dataset", f"two={tmp_path / 'two'}", "--methods", "mmft", "--shots", "2", "--seeds", "1",
        "--model_name_or_path", tiny_clip_dir, "--output_dir", str(tmp_path / "results"), "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8", "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none",
    ])  # fmt: skip
    (record,) = summary["ran"]
    assert record["method"] == "mmft" and 0.0 <= record["accuracy"] <= 1.0 and record["test_samples"] == 16
    assert record["settings"]["dataset"]["caption_provenance"]["caption_sources"] == two[0]["caption_sources"][::2]


def test_the_estimate_and_the_export_take_one_captioner_and_say_how_to_do_several(server, four, tmp_path):
    from mmft_hf.captioning.offline import export_caption_requests
    from mmft_hf.captioning.stats import estimate_captioning_cost

    pair = [api(server, "model-a"), api(server, "model-b")]
    with pytest.raises(TypeError, match="takes one captioner, got a list of 2: estimate each captioner"):
        estimate_captioning_cost(four, pair, domain="textures", cache_dir=tmp_path / "cache")
    with pytest.raises(TypeError, match="takes one captioner, got a list of 2: export one requests file per"):
        export_caption_requests(four, tmp_path / "requests.jsonl", pair, domain="textures")
    assert server.requests == [] and not (tmp_path / "requests.jsonl").exists()
