import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from transformers import HfArgumentParser

from mmft_hf.captioning.builder import PRESETS, CaptionedImages, make_captioner, push_captioned
from mmft_hf.captioning.caption import caption_dataset, caption_provenance
from mmft_hf.captioning.prompts import DOMAINS, build_prompt
from mmft_hf.captioning.stats import caption_stats, clip_score, dataset_clip_score
from mmft_hf.commands import caption as caption_command
from tests.captioning.test_caption import FakeCaptioner
from tests.fake_chat_server import start_fake_api

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def source(image_files_dataset):
    ds = image_files_dataset.remove_columns("captions")
    return datasets.DatasetDict({"train": ds.select(range(8)), "test": ds.select(range(8, 12))})


def test_every_benchmark_has_a_preset_config():
    assert set(PRESETS) == set(DOMAINS)
    for name, preset in PRESETS.items():  # `config_name=name` gives a config with the preset's source and columns
        config = CaptionedImages.builder_configs[name]
        assert (config.source, config.splits, config.domain, config.image_column, config.label_column) == (
            preset.source,
            preset.splits,
            preset.domain,
            preset.image_column,
            preset.label_column,
        )


def test_builder_prepares_and_reuses_its_cache(source, tmp_path):
    fake = FakeCaptioner()
    kwargs = dict(
        source=source,
        domain="textures",
        caption_types=["shape", "texture"],
        dataset_name="captioned_test",
        cache_dir=str(tmp_path / "hf"),
        caption_cache_dir=str(tmp_path / "captions"),
    )
    builder = CaptionedImages(captioner=fake, **kwargs)
    builder.download_and_prepare()
    dataset = builder.as_dataset()
    assert len(fake.requests) == 12 * 2
    assert set(dataset) == {"train", "test"} and len(dataset["train"]) == 8 and len(dataset["test"]) == 4
    features = dataset["train"].features
    assert isinstance(features["image"], datasets.Image) and isinstance(features["label"], datasets.ClassLabel)
    assert features["label"].names == ["banded", "dotted", "striped"]
    assert features["captions"].feature.dtype == "string"
    row = dataset["test"][1]  # row 9 of the fixture: class 9 % 3 = banded
    assert row["image"].size == (33, 38) and row["label"] == 0
    assert [c.split(" ", 1)[1] for c in row["captions"]] == [
        build_prompt("banded", "textures", kind) for kind in ("shape", "texture")
    ]
    assert caption_provenance(dataset["train"])["caption_types"] == ["shape", "texture"]

    again = FakeCaptioner()
    second = CaptionedImages(captioner=again, **kwargs)
    assert second.cache_dir == builder.cache_dir  # same config id: the prepared files are reused
    second.download_and_prepare()
    assert list(second.as_dataset()["train"]["captions"]) == list(dataset["train"]["captions"])
    assert again.requests == []
    # another datasets cache but the same caption cache: prepared again, every caption a cache hit
    third = FakeCaptioner()
    other = CaptionedImages(captioner=third, **{**kwargs, "cache_dir": str(tmp_path / "hf2")})
    other.download_and_prepare()
    assert third.requests == [] and list(other.as_dataset()["test"]["captions"]) == list(dataset["test"]["captions"])


def test_builder_with_a_spec_records_the_built_captioners_identity(source, tmp_path, monkeypatch):
    built = []

    def fake_make_captioner(spec, **kwargs):
        assert (spec, kwargs) == ("transformers:tiny-vlm", {"torch_dtype": torch.float16})
        built.append(FakeCaptioner(model=spec))
        return built[-1]

    monkeypatch.setattr("mmft_hf.captioning.builder.make_captioner", fake_make_captioner)
    # string labels: the builder makes the ClassLabel (sorted names) and maps each row's label to its id
    names = source["train"].features["label"].names
    strings = source.map(lambda row: {"name": names[row["label"]]}).remove_columns("label")
    builder = CaptionedImages(
        source=strings,
        label_column="name",
        domain="textures",
        captioner="transformers:tiny-vlm",
        captioner_kwargs={"torch_dtype": torch.float16},  # not JSON: recorded as text until the captioner exists
        dataset_name="captioned_spec",
        cache_dir=str(tmp_path / "hf"),
        caption_cache_dir=str(tmp_path / "captions"),
    )
    assert built == []  # building the builder does not build (load) the captioner
    assert json.loads(builder.info.features["captions"].feature.id)["captioner"] == {
        "spec": "transformers:tiny-vlm",
        "kwargs": {"torch_dtype": "torch.float16"},
    }
    builder.download_and_prepare()
    dataset = builder.as_dataset()
    (fake,) = built
    assert caption_provenance(dataset["train"])["captioner"] == fake.cache_identity()
    assert dataset["train"].features["label"].names == ["banded", "dotted", "striped"]
    assert list(dataset["train"]["label"]) == list(source["train"]["label"])
    assert list(dataset["test"]["label"]) == list(source["test"]["label"])


def test_builder_errors(source, tmp_path):
    with pytest.raises(ValueError, match="domain"):
        CaptionedImages(source=source, captioner=FakeCaptioner(), dataset_name="x", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Split"):
        CaptionedImages(
            source=source,
            captioner=FakeCaptioner(),
            domain="t",
            splits=["validation"],
            dataset_name="x",
            cache_dir=str(tmp_path),
        )
    with pytest.raises(ValueError, match="openai:MODEL"):
        make_captioner("gpt-4o")


def test_push_captioned_local_layout_and_provenance(source, tmp_path, tiny_tokenizer):
    train = caption_dataset(
        source["train"], FakeCaptioner(), domain="textures", cache_dir=tmp_path / "c", show_progress=False
    )
    out = push_captioned(
        datasets.DatasetDict({"train": train, "test": source["test"]}),
        str(tmp_path / "repo"),
        source="local/textures",
        license="cc-by-4.0",
        tokenizer=tiny_tokenizer,
    )
    files = sorted(os.listdir(Path(out) / "data"))
    assert files == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    # the image bytes are embedded, not file paths
    table = pq.read_table(Path(out) / "data" / files[1])
    images = table.column("image").to_pylist()
    assert all(image["bytes"] for image in images)
    assert (
        images[0]["bytes"]
        == Path(source["train"].cast_column("image", datasets.Image(decode=False))[0]["image"]["path"]).read_bytes()
    )

    readme = (Path(out) / "README.md").read_text()
    header = yaml.safe_load(readme.split("---")[1])
    assert header["configs"] == [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": "data/train-*"}, {"split": "test", "path": "data/test-*"}],
        }
    ]
    assert header["license"] == "cc-by-4.0" and {s["name"] for s in header["dataset_info"]["splits"]} == {
        "train",
        "test",
    }
    assert "local/textures" in readme and "To differentiate this {class_name} photo" in readme
    assert "| train | 8 | 24 / 24 | 0 | 0 |" in readme and "| test | 4 | 0 / 0 | 0 | 4 |" in readme
    assert "terms of service" in readme

    loaded = datasets.load_dataset(out, cache_dir=str(tmp_path / "hf"))  # not the shared ~/.cache
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    assert loaded["train"].features["label"] == datasets.ClassLabel(names=["banded", "dotted", "striped"])
    assert loaded["train"].features["captions"].feature.dtype == "string"
    assert loaded["train"][3]["image"].size == source["train"][3]["image"].size
    assert list(loaded["train"]["captions"]) == list(train["captions"])
    assert list(loaded["test"]["captions"]) == [[]] * 4
    provenance = caption_provenance(loaded["train"])
    original = caption_provenance(train)
    for key in ("captioner", "prompt_template", "domain", "caption_types", "captions_per_type", "words"):
        assert provenance[key] == original[key]
    assert provenance["counts"]["train"]["captions"] == 24 and provenance["source"] == "local/textures"


def test_push_captioned_to_the_hub_uploads_then_removes_its_staging_folder(source, tmp_path, monkeypatch):
    train = caption_dataset(
        source["train"], FakeCaptioner(), domain="textures", cache_dir=tmp_path / "c", show_progress=False
    )
    uploads = []

    class FakeHfApi:
        def __init__(self, token=None):
            assert token == "hf_test"

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            assert (repo_id, repo_type, exist_ok) == ("me/captioned", "dataset", True)
            return f"https://huggingface.co/datasets/{repo_id}"

        def upload_folder(self, repo_id, folder_path, repo_type, commit_message):
            uploads.append(
                (folder_path, sorted(os.listdir(folder_path)), sorted(os.listdir(Path(folder_path) / "data")))
            )

    monkeypatch.setattr("huggingface_hub.HfApi", FakeHfApi)
    url = push_captioned(datasets.DatasetDict({"train": train}), "me/captioned", token="hf_test")
    assert url == "https://huggingface.co/datasets/me/captioned"
    ((folder, files, data),) = uploads
    assert files == ["README.md", "data"] and data == ["train-00000-of-00001.parquet"]
    assert not os.path.exists(folder)  # the staging copy is deleted after the upload


def test_caption_stats_against_an_independent_count(synthetic_dataset, tiny_tokenizer):
    train = synthetic_dataset["train"]
    report = caption_stats(train, tiny_tokenizer, caption_types=("visual", "shape", "texture"), max_length=20)
    names = train.features["label"].names
    for position, kind in enumerate(("visual", "shape", "texture")):
        words = [len(row["captions"][position].split()) for row in train]
        # independent: BPE pieces without special tokens, plus <|startoftext|> and <|endoftext|>
        prefixed = [
            len(tiny_tokenizer.tokenize(f"a photo of a {names[row['label']]}. {row['captions'][position]}")) + 2
            for row in train
        ]
        entry = report[kind]
        assert entry["captions"] == len(train)
        assert entry["words"]["mean"] == pytest.approx(np.mean(words)) and entry["words"]["max"] == max(words)
        assert entry["words"]["p50"] == pytest.approx(np.median(words))
        assert entry["tokens_with_prefix"]["mean"] == pytest.approx(np.mean(prefixed))
        assert entry["fraction_over_max_length"] == pytest.approx(np.mean([n > 20 for n in prefixed]))
    assert report["all"]["captions"] == 3 * len(train)
    assert 0 < report["visual"]["fraction_over_max_length"] < 1 or report["shape"]["fraction_over_max_length"] > 0
    words_only = caption_stats(train)  # no tokenizer, no provenance: word counts over all captions only
    assert set(words_only) == {"rows", "rows_incomplete", "max_length", "all"} and "tokens" not in words_only["all"]


def test_clip_score_matches_the_model_forward(synthetic_dataset, tiny_clip, monkeypatch):
    model, processor = tiny_clip
    model.eval()
    rows = synthetic_dataset["test"].select(range(6))
    images = list(rows["image"])

    def reference(captions):  # independent: the full forward's normalised embeddings
        with torch.no_grad():
            inputs = processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True)
            output = model(**inputs)
        return (output.image_embeds * output.text_embeds).sum(-1).tolist()

    cosine = reference([c[0] for c in rows["captions"]])
    scores = clip_score(model, processor, images, [c[0] for c in rows["captions"]], batch_size=4)
    assert scores == pytest.approx([2.5 * max(c, 0.0) for c in cosine], abs=1e-5)
    assert min(cosine) < 0 and 0.0 in scores  # a negative cosine scores 0
    # a 16-bit image scores as its 8-bit version (rescaled, not clipped to white)
    gray = images[0].convert("L")
    deep = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)
    caption = rows["captions"][0][:1]
    assert clip_score(model, processor, [deep], caption) == pytest.approx(
        clip_score(model, processor, [gray], caption)
    )

    types = ("visual", "shape", "texture")
    expected = {
        kind: [2.5 * max(c, 0.0) for c in reference([c[k] for c in rows["captions"]])] for k, kind in enumerate(types)
    }
    encoded = []
    get_image_features = model.get_image_features

    def counting(pixel_values, **kwargs):
        encoded.append(len(pixel_values))
        return get_image_features(pixel_values, **kwargs)

    monkeypatch.setattr(model, "get_image_features", counting)
    report = dataset_clip_score(rows, model, processor, caption_types=types, batch_size=4)
    assert encoded == [4, 2]  # each image once, in batches of rows
    for kind, values in expected.items():
        assert report[kind]["count"] == 6 and report[kind]["mean"] == pytest.approx(np.mean(values), abs=1e-5)
        assert report[kind]["max"] == pytest.approx(max(values), abs=1e-5)
    assert report["all"]["count"] == 18
    assert report["all"]["mean"] == pytest.approx(np.mean(sum(expected.values(), [])), abs=1e-5)


@pytest.fixture(scope="module")
def generate_captions():
    return caption_command


@pytest.fixture(autouse=True)
def http_log_levels():
    """The command quiets the HTTP loggers of its process; give other tests theirs back."""
    names = ("httpx2", "httpx", "openai")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_generate_captions_arguments(generate_captions, monkeypatch):
    def kwargs(*argv):
        parser = HfArgumentParser(generate_captions.CaptioningArguments)
        args = parser.parse_args_into_dataclasses(args=list(argv))[0]
        return generate_captions.captioner_kwargs(args, (args.captioner or [generate_captions.DEFAULT_CAPTIONER])[0])

    local = kwargs("--captioner", "transformers:x", "--temperature", "0.7", "--max_tokens", "64", "--batch_size", "2")
    assert local == {"batch_size": 2, "temperature": 0.7, "max_new_tokens": 64}
    api = kwargs("--temperature", "0.7", "--max_tokens", "64", "--base_url", "http://localhost:8000/v1")
    assert api["api_key_env"] == "OPENAI_API_KEY" and (api["temperature"], api["max_tokens"]) == (0.7, 64)
    for no_key in ("none", "None", ""):  # a local server needs no key
        assert kwargs("--api_key_env", no_key)["api_key_env"] is None
    with pytest.raises(ValueError, match="Unknown preset 'dtdd'; choose from"):
        generate_captions.main(["--preset", "dtdd"])

    # every option of the API captioner has a flag; unset ones keep the captioner's defaults
    tuned = kwargs(
        "--timeout", "20", "--max_retries", "1", "--max_answer_retries", "0", "--image_format", "PNG",
        "--max_image_side", "0", "--extra_body", '{"reasoning_effort": "none"}', "--cache_tag", "q4",
        "--max_consecutive_connection_errors", "5",
    )  # fmt: skip
    assert {key: tuned[key] for key in generate_captions.API_OPTIONS} == {
        "timeout": 20.0,
        "max_retries": 1,
        "max_answer_retries": 0,
        "image_format": "PNG",
        "max_image_side": None,  # 0: full size
        "extra_body": {"reasoning_effort": "none"},
        "cache_tag": "q4",
        "max_consecutive_connection_errors": 5,
    }
    assert not set(generate_captions.API_OPTIONS) & set(api)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    captioner = make_captioner("openai:m", **tuned)
    assert (captioner.timeout, captioner.max_image_side, captioner.extra_body) == (
        20.0,
        None,
        {"reasoning_effort": "none"},
    )
    with pytest.raises(ValueError, match="--extra_body must be a JSON object"):
        kwargs("--extra_body", "{reasoning_effort: none}")
    with pytest.raises(ValueError, match="--extra_body must be a JSON object"):
        kwargs("--extra_body", "[1]")
    with pytest.raises(ValueError, match="--timeout, --extra_body apply to API captioners"):
        kwargs("--captioner", "transformers:x", "--timeout", "5", "--extra_body", "{}")


def test_caption_types_accept_spaces_or_commas():
    parse = caption_command.parse_caption_types
    assert parse(["shape", "texture"]) == parse(["shape,texture"]) == parse(["shape, texture"]) == ["shape", "texture"]
    assert parse(["visual", "shape,texture"]) == ["visual", "shape", "texture"]
    for bad, message in ((["shape,,texture"], "empty characteristic"), (["shape,"], "empty characteristic")):
        with pytest.raises(ValueError, match=message):
            parse(bad)
    with pytest.raises(ValueError, match="twice"):
        parse(["shape", "texture,shape"])


def free_port():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_generate_captions_errors_name_flags_and_come_before_any_request(
    generate_captions, source, tmp_path, monkeypatch
):
    monkeypatch.delenv("MMFT_UNSET_KEY", raising=False)
    source.save_to_disk(str(tmp_path / "src"))
    source.cast_column("label", datasets.Value("int64")).save_to_disk(str(tmp_path / "ids"))
    source["train"].add_column("captions", [["a caption"]] * 8).save_to_disk(str(tmp_path / "captioned"))
    server = start_fake_api()
    try:
        argv = ["--dataset_name", str(tmp_path / "src"), "--captioner", "openai:fake-mllm", "--api_key_env", "none"]
        argv += ["--base_url", server.base_url, "--domain", "textures", "--cache_dir", str(tmp_path / "cache")]
        argv += ["--output_dir", str(tmp_path / "out")]
        with pytest.raises(ValueError, match=r"^--split trian: no such split; the dataset has train, test\.$"):
            generate_captions.main([*argv, "--split", "trian"])
        with pytest.raises(ValueError, match="--caption_types has an empty characteristic in 'shape,'"):
            generate_captions.main([*argv, "--caption_types", "shape,", "texture"])
        with pytest.raises(
            ValueError, match="--image_column 'picture': split 'train' has no such column; its columns are"
        ):
            generate_captions.main([*argv, "--image_column", "picture"])
        with pytest.raises(ValueError, match="--class_names") as info:  # integer labels without names
            generate_captions.main([*argv, "--dataset_name", str(tmp_path / "ids")])
        assert "class_names=" not in str(info.value)
        with pytest.raises(ValueError, match="^Split 'train' already has a 'captions' column"):
            generate_captions.main([*argv, "--dataset_name", str(tmp_path / "captioned")])
        with pytest.raises(
            ValueError, match="^--api_key_env MMFT_UNSET_KEY: the environment variable MMFT_UNSET_KEY is not"
        ):
            generate_captions.main([*argv, "--api_key_env", "MMFT_UNSET_KEY"])
        with pytest.raises(ValueError, match=r"^--push_to_hub needs --hub_repo_id org/name\.$"):
            generate_captions.main([*argv[:-2], "--push_to_hub"])  # refused before captioning, not after
        assert server.requests == []
        # a server that cannot answer: one line naming the cause, a non-zero exit, nothing retried for hours
        server.plan[:] = [(404, {}, {"error": {"message": "no such model"}})]
        with pytest.raises(SystemExit) as info:
            generate_captions.main(argv)
        assert info.value.code.startswith("mmft-hf caption: error: Model 'fake-mllm' not found (HTTP 404)")
        assert len(server.requests) == 1
    finally:
        server.shutdown()
        server.server_close()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "captions.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(SystemExit) as info:
        generate_captions.main([*argv, "--cache_dir", str(tmp_path / "broken")])
    broken = tmp_path / "broken" / "captions.sqlite"
    assert info.value.code.startswith(f"mmft-hf caption: error: Cannot use the caption cache {broken}")
    assert f"mv '{broken}' '{broken}.broken'" in info.value.code
    unreachable = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(SystemExit) as info:
        generate_captions.main([*argv, "--base_url", unreachable, "--max_retries", "0"])
    assert info.value.code.startswith(f"mmft-hf caption: error: Cannot connect to {unreachable}")
    assert "0 of 24 captions are cached" in info.value.code  # train (8 rows) is the first split: 8 x 3
    assert "\n" not in info.value.code  # one line, the resume note included


def test_generate_captions_ctrl_c_prints_one_line_then_the_same_command_resumes(source, tmp_path):
    source.save_to_disk(str(tmp_path / "src"))
    server = start_fake_api(delay=0.3)
    argv = ["caption", "--dataset_name", str(tmp_path / "src"), "--split", "train", "--captioner", "openai:fake-mllm"]
    argv += ["--base_url", server.base_url, "--api_key_env", "none", "--domain", "textures", "--max_concurrency", "1"]
    argv += [
        "--caption_types",
        "shape,texture",
        "--cache_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = subprocess.Popen(
        [sys.executable, "-m", "mmft_hf.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(server.requests) < 3:
            assert command.poll() is None, command.communicate()
            assert time.monotonic() < deadline, "the command made no request"
            time.sleep(0.02)
        command.send_signal(signal.SIGINT)
        stdout, stderr = command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
    with sqlite3.connect(tmp_path / "cache" / "captions.sqlite") as db:
        cached = db.execute("SELECT COUNT(*) FROM captions").fetchone()[0]
    assert command.returncode == 130, stderr
    assert "Traceback" not in stderr and "HTTP Request:" not in stderr
    lines = [line for line in stderr.splitlines() if "Interrupted" in line]
    assert lines == [
        f"Interrupted. {cached} of 16 captions are cached in {tmp_path / 'cache' / 'captions.sqlite'}; run the same "
        "command again to resume (only the missing captions are requested)."
    ]
    # the third request arrived, so the first answer (0.3 s earlier) is committed; the second may still be on its way
    assert 1 <= cached < 16
    try:
        summaries = caption_command.main(argv[1:])  # the same command
    finally:
        server.shutdown()
        server.server_close()
    assert summaries["train"].cache_hits == cached and summaries["train"].requests == 16 - cached
    assert summaries["train"].failures == []


def test_generate_captions_example_end_to_end(generate_captions, source, tmp_path, monkeypatch, caplog, capsys):
    source.save_to_disk(str(tmp_path / "src"))
    names = ["wavy bands", "polka dots", "pinstripes"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n\n")
    server = start_fake_api()
    try:
        argv = [
            "--dataset_name",
            str(tmp_path / "src"),
            "--split",
            "train",
            "--captioner",
            "openai:fake-mllm",
            "--base_url",
            server.base_url,
            "--api_key_env",
            "FAKE_KEY",
            "--domain",
            "textures",
            "--caption_types",
            "visual",
            "shape",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_concurrency",
            "4",
            "--class_names",
            str(tmp_path / "names.txt"),
        ]
        monkeypatch.setenv("FAKE_KEY", "sk-test")
        with caplog.at_level(logging.INFO):
            summary = generate_captions.main(argv)
        assert summary["train"].requests == 16 and len(server.requests) == 16
        # no log line per request, and the summary once (printed; the library no longer logs it as well)
        assert not [record for record in caplog.records if "HTTP Request" in record.getMessage()]
        assert not [record for record in caplog.records if "Captioned 8 rows" in record.getMessage()]
        assert capsys.readouterr().out.count("Captioned 8 rows") == 1
        assert generate_captions.main(argv)["train"].requests == 0 and len(server.requests) == 16
    finally:
        server.shutdown()
        server.server_close()
    loaded = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))
    assert list(loaded) == ["train", "test"] and len(loaded["train"]) == 8  # test is written, not captioned
    assert set(map(len, loaded["test"]["captions"])) == {0}
    for row in (0, 1):  # the prompts name the classes from --class_names
        label = loaded["train"][row]["label"]
        assert loaded["train"][row]["captions"] == [
            build_prompt(names[label], "textures", k) for k in ("visual", "shape")
        ]
    assert json.loads(loaded["train"].features["captions"].feature.id)["captioner"]["model"] == "fake-mllm"


def test_a_split_the_command_cannot_write_is_named_not_left_out_silently(source, tmp_path, caplog):
    odd = datasets.DatasetDict({"train": source["train"].select(range(2)), "test": source["test"]})
    odd["test"] = odd["test"].add_column("note", ["x"] * len(odd["test"]))  # another schema than train's
    odd.save_to_disk(str(tmp_path / "src"))
    server = start_fake_api()
    try:
        argv = ["--dataset_name", str(tmp_path / "src"), "--captioner", "openai:fake-mllm", "--api_key_env", "none"]
        argv += ["--base_url", server.base_url, "--domain", "textures", "--caption_types", "shape"]
        argv += ["--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")]
        with caplog.at_level(logging.WARNING):
            caption_command.main(argv)
    finally:
        server.shutdown()
        server.server_close()
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(message.startswith("Split 'test' is not written: its features") for message in warnings), warnings
    assert list(datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))) == ["train"]


def test_estimate_only_takes_the_run_flags_its_errors_name(source, tmp_path, capsys):
    # the sample's missing-captions error says "--allow_missing": that flag (and --max_passes) must reach the sample
    source.save_to_disk(str(tmp_path / "src"))
    server = start_fake_api(plan=[(200, {}), (500, {})])  # one request of the sample fails (no retries, one pass)
    try:
        argv = ["--dataset_name", str(tmp_path / "src"), "--captioner", "openai:fake-mllm", "--api_key_env", "none"]
        argv += ["--base_url", server.base_url, "--domain", "textures", "--caption_types", "shape"]
        argv += ["--cache_dir", str(tmp_path / "cache"), "--max_retries", "0", "--max_concurrency", "1"]
        argv += ["--estimate_only", "--estimate_sample_rows", "3", "--max_passes", "1"]
        with pytest.raises(SystemExit, match="1 caption\\(s\\) still missing .*--allow_missing"):
            caption_command.main(argv)
        assert len(server.requests) == 3  # one pass, as asked
        server.plan[:] = [(500, {})]  # the rerun asks for the missing one only, and it fails again
        estimate = caption_command.main([*argv, "--allow_missing"])["train"]
    finally:
        server.shutdown()
        server.server_close()
    assert len(server.requests) == 4 and estimate.sample_rows == 3 and estimate.requests > 0
    assert "[train] Estimate for 8 rows" in capsys.readouterr().out
