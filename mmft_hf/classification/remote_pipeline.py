"""Self-contained MMFT classification pipeline: the file published next to a model for `trust_remote_code=True`.

An image is classified by the cosine similarity of its CLIP image embedding to stored class prototypes
(`class_prototypes.safetensors`): `softmax(exp(logit_scale) * cos(image, prototype_c) + logit_bias)` over the classes
(`logit_bias` is SigLIP's, 0 elsewhere; a constant shift, so the softmax ignores it, but `function_to_apply="sigmoid"`
gives SigLIP's own per-class probabilities).
No captions, trainer or dataset are needed at inference, and the prototypes are loaded once, at construction.

This module must import only what every `transformers` user has (torch, transformers, PIL, numpy, safetensors):
`Pipeline.save_pretrained`/`push_to_hub` copy it into the model repository, where `mmft_hf` may not be installed.
`mmft_hf.classification.pipeline.MMFTClassificationPipeline` subclasses it (adding zero-shot prototypes from class names).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import shutil
import urllib.request
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Pipeline
from transformers.utils import cached_file, logging
from transformers.utils.hub import is_offline_mode

logger = logging.get_logger(__name__)

TASK = "mmft-classification"
# The task name under `config.custom_pipelines`. It must differ from `TASK`: transformers' `pipeline()` insists on
# `trust_remote_code=True` for any task listed there, even one registered locally, so with the library installed
# `pipeline(TASK, model=repo)` would refuse the repository. Under another name, `pipeline(TASK, ...)` gets the
# library's class, and `pipeline(model=repo, trust_remote_code=True)` (no task) infers this one and runs this file.
REMOTE_TASK = f"{TASK}-remote-code"
PROTOTYPES_FILENAME = "class_prototypes.safetensors"
PROTOTYPES_TENSOR = "class_prototypes"
REMOTE_MODULE_FILENAME = "remote_pipeline.py"
REMOTE_CLASS_NAME = "MMFTClassificationPipeline"
_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]{64,}$")
SCORE_FUNCTIONS = ("softmax", "sigmoid", "none")


def read_prototypes_file(path: str) -> tuple[torch.Tensor, list[str], dict]:
    """Reads a `class_prototypes.safetensors` file: `(prototypes [num_classes, dim], labels, metadata)`.

    The one implementation of the format (one float32 tensor, the label names and JSON build facts in the
    safetensors metadata); `mmft_hf.classification.prototypes.load_class_prototypes` validates around it.
    """
    with safe_open(path, framework="pt") as handle:
        if PROTOTYPES_TENSOR not in handle.keys():
            raise ValueError(
                f"{path} has no {PROTOTYPES_TENSOR!r} tensor (found {sorted(handle.keys())}); rebuild the file."
            )
        header = handle.metadata() or {}
        prototypes = handle.get_tensor(PROTOTYPES_TENSOR)
    return prototypes, json.loads(header.get("labels", "[]")), json.loads(header.get("metadata", "{}"))


def write_prototypes_file(
    prototypes: torch.Tensor, labels: Sequence[str], save_directory: str, metadata: dict | None = None
) -> str:
    """Writes `prototypes` and `labels` to `save_directory/class_prototypes.safetensors` and returns the path.

    No checks: `mmft_hf.classification.prototypes.save_class_prototypes` is the validating writer.
    """
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, PROTOTYPES_FILENAME)
    header = {"labels": json.dumps(list(labels)), "metadata": json.dumps(metadata or {})}
    save_file({PROTOTYPES_TENSOR: prototypes.detach().float().cpu().contiguous()}, path, metadata=header)
    return path


def _scale_to_uint8(image: Image.Image) -> Image.Image:
    """Maps a 16/32-bit integer or float single-channel image to 8-bit "L" instead of clipping at 255."""
    array = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.size and array.max() > 255):
        array = np.clip(array.astype(np.float64), 0, 65535) / 257.0  # 16-bit range -> 8-bit range
    elif image.mode == "F" and array.size and np.nanmax(array) <= 1.0:
        array = array.astype(np.float64) * 255.0  # float images in [0, 1]
    array = np.nan_to_num(np.clip(np.rint(array), 0, 255))
    return Image.fromarray(array.astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL image to 3-channel 8-bit RGB, the same way for training and for this pipeline.

    - Images with transparency (RGBA, LA, PA, and P or L/RGB images with a `transparency` entry) are composited
      onto a **white** background, as transformers' image processors do (`convert_to_rgb`). A plain
      `convert("RGB")` would expose whatever colour hides under transparent pixels, often black.
    - 16-bit ("I;16", "I") and float ("F") images are rescaled to 8 bits (16-bit range divided by 257, floats in
      [0, 1] multiplied by 255); PIL's own conversion clips them at 255, turning most 16-bit images white.
    - Everything else (L, 1, CMYK, YCbCr, LAB, HSV, P without transparency) uses PIL's `convert("RGB")`.

    `mmft_hf.images.to_rgb` is an identical copy (this file must be self-contained on the Hub).

    Args:
        image (`PIL.Image.Image`): the image.

    Returns:
        `PIL.Image.Image`: an RGB image of the same size (`image` itself when it already is RGB).
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _scale_to_uint8(image).convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _describe(image) -> str:
    text = repr(image)
    return text if len(text) <= 120 else text[:117] + "..."


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """HxW, HxWxC or CxHxW (C in 1, 3, 4) arrays; uint8 in [0, 255] or floats in [0, 1] (or [0, 255])."""
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first -> channels last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.size == 0:
        raise ValueError(
            f"Cannot read a numpy array of shape {array.shape} as an image; expected HxW, HxWxC or CxHxW with "
            "C in (1, 3, 4)."
        )
    if array.dtype != np.uint8:
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise ValueError(f"The image array of shape {array.shape} contains NaN or infinite values.")
        scale = 255.0 if values.max() <= 1.0 else 1.0
        array = np.clip(values * scale, 0, 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _decode(source, name: str) -> Image.Image:
    """Opens and decodes a file path or file object now (a truncated file fails here, with `name`), as RGB."""
    try:
        with Image.open(source) as opened:
            opened.load()
            return to_rgb(ImageOps.exif_transpose(opened))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"Cannot read image {name}: {error}") from error


def load_image_input(image, timeout: float | None = None) -> Image.Image:
    """Turns one pipeline input into an RGB PIL image, with an error that names the input when it cannot.

    The conversion to RGB is `to_rgb`, the one training uses: transparency is composited on white and 16-bit or
    float images are rescaled, so the pipeline sees the pixels the model was trained and evaluated on.

    Args:
        image: a PIL image, a local file path (`str` or `os.PathLike`), an http(s) URL, a base64 string or data URL,
            a numpy array or a torch tensor (HxW, HxWxC or CxHxW).
        timeout (`float`, *optional*): seconds to wait for a URL.

    Returns:
        `PIL.Image.Image` in RGB mode, EXIF orientation applied.
    """
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return to_rgb(_array_to_pil(image))
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if not isinstance(image, str):
        raise TypeError(
            f"Unsupported image input of type {type(image).__name__}: {_describe(image)}. Pass a PIL image, a local "
            "file path, a URL, a base64 string, a numpy array, or a list of these."
        )
    if image.startswith(("http://", "https://")):
        request = urllib.request.Request(image, headers={"User-Agent": "mmft-classification-pipeline"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = response.read()
        except OSError as error:
            raise OSError(f"Cannot fetch image URL {_describe(image)}: {error}") from error
        return _decode(io.BytesIO(data), f"URL {_describe(image)}")
    if image.startswith("data:image/"):
        try:
            data = base64.b64decode(image.partition(",")[2])
        except ValueError as error:
            raise ValueError(f"Cannot read image data URL {_describe(image)}: {error}") from error
        return _decode(io.BytesIO(data), f"data URL {_describe(image)}")
    if os.path.isfile(image):
        return _decode(image, f"file {image!r}")
    if _BASE64.match(image):
        try:
            return _decode(io.BytesIO(base64.b64decode(image, validate=False)), "base64 string")
        except ValueError:
            pass  # not base64 after all: report the missing file below
    raise FileNotFoundError(
        f"Image file {_describe(image)} does not exist (and is neither a URL nor a base64-encoded image)."
    )


class MMFTClassificationPipeline(Pipeline):
    """Classifies images with a CLIP-style dual encoder and stored class prototypes (task `"mmft-classification"`).

    Output matches `zero-shot-image-classification`: for one image a list of `{"label": str, "score": float}`
    sorted by score, for a list of images one such list per image.

    Args:
        model: a dual encoder with `get_image_features` and `logit_scale` (e.g. `CLIPModel`).
        image_processor: the model's image processor.
        class_prototypes (`torch.Tensor`, *optional*): `[num_classes, dim]` class embeddings. Without it, the
            prototypes are read from `class_prototypes.safetensors` in the model's directory or Hub repository.
        labels (`Sequence[str]`, *optional*): the class names, in prototype row order (required with
            `class_prototypes`).
        top_k (`int`, *optional*, defaults to 5): labels returned per image (clamped to the number of classes).
        function_to_apply (`str`, *optional*, defaults to `"softmax"`): how logits become scores: `"softmax"` over
            the classes (scores sum to 1), `"sigmoid"` per class (SigLIP's probabilities, as transformers'
            zero-shot-image-classification reports for SigLIP) or `"none"` (the logits
            `exp(logit_scale) * cos + logit_bias`). The ranking is the same for all three.
        dtype / torch_dtype (`torch.dtype` or `str`, *optional*): cast the model to this dtype (`"auto"` keeps it).
        local_files_only (`bool`, *optional*, defaults to `False`): fetch the prototypes file from the local cache
            only (`pipeline(..., local_files_only=True)` passes it here). The revision `pipeline()` resolved is
            used too (through `config._commit_hash`). `token=` and `model_kwargs={"cache_dir": ...}` given to
            `pipeline()` do not reach the pipeline class: the prototypes are fetched with the default token
            (`HF_TOKEN` or `hf auth login`) and cache (`HF_HUB_CACHE`).
        device, batch_size: as for every pipeline.
    """

    _load_processor = False
    _load_image_processor = None  # optional here so `processor=` (a CLIPProcessor) also works; checked in __init__
    _load_feature_extractor = False
    _load_tokenizer = None  # optional: only zero-shot prototypes need it, and it is republished with the model

    def __init__(
        self, *args, class_prototypes: torch.Tensor | None = None, labels: Sequence[str] | None = None, **kwargs
    ):
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        requested = dtype if dtype not in (None, "auto") else torch_dtype
        self._local_files_only = bool(kwargs.pop("local_files_only", False))
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            raise ValueError(
                "MMFTClassificationPipeline needs an image processor: pass `image_processor=` or `processor=`, or "
                "load from a directory that has `preprocessor_config.json`/`processor_config.json`."
            )
        if requested not in (None, "auto"):
            if isinstance(requested, str):
                requested = getattr(torch, requested)
            self.model.to(dtype=requested)
        self.model.eval()
        # exp(logit_scale), read once: the classifier's temperature (1 for a model without `logit_scale`)
        scale = getattr(self.model, "logit_scale", None)
        self.logit_scale = 1.0 if scale is None else scale.detach().float().exp().item()
        bias = getattr(self.model, "logit_bias", None)  # SigLIP's learnt bias; none for CLIP
        self.logit_bias = 0.0 if bias is None else bias.detach().float().sum().item()
        prototypes, labels, metadata = self._resolve_prototypes(class_prototypes, labels)
        self._set_prototypes(prototypes, labels, metadata)

    # ----------------------------------------------------------------------------------------------- prototypes
    def _resolve_prototypes(
        self, class_prototypes: torch.Tensor | None, labels: Sequence[str] | None
    ) -> tuple[torch.Tensor, list[str], dict]:
        """Where the classifier comes from: explicit tensors, else the prototypes file of the model's checkpoint."""
        if class_prototypes is not None:
            if labels is None:
                raise ValueError("`class_prototypes` was given without `labels`; pass one label name per row.")
            return class_prototypes, list(labels), {}
        if labels is not None:
            raise ValueError(
                "`labels` was given without `class_prototypes`; pass both, or neither to read the checkpoint's "
                f"{PROTOTYPES_FILENAME}."
            )
        source = getattr(self.model, "name_or_path", None) or getattr(self.model.config, "_name_or_path", "")
        how = (
            "Build them with `mmft_hf.classification.prototypes.zero_shot_prototypes` (or `prototypes_from_captioned_dataset`) and "
            "save them with `mmft_hf.classification.prototypes.save_class_prototypes(prototypes, labels, directory)`, pass "
            "`class_prototypes=` and `labels=`, or (with mmft_hf) `class_names=[...]` for zero-shot CLIP."
        )
        if not source:
            raise ValueError(f"The model was not loaded from a directory, so there are no class prototypes. {how}")
        try:
            path = cached_file(
                source,
                PROTOTYPES_FILENAME,
                revision=getattr(self.model.config, "_commit_hash", None),
                local_files_only=self._local_files_only,
                _raise_exceptions_for_missing_entries=False,
            )
        except OSError as error:
            raise FileNotFoundError(f"Could not fetch {PROTOTYPES_FILENAME} for {source!r}: {error}. {how}") from error
        if path is None:
            if not os.path.isdir(source) and (self._local_files_only or is_offline_mode()):
                raise FileNotFoundError(
                    f"{PROTOTYPES_FILENAME} of {source!r} is not in the local cache, and offline mode "
                    "(HF_HUB_OFFLINE=1 or local_files_only=True) stops it from being downloaded: load once online, "
                    f"or pass a local directory. {how}"
                )
            raise FileNotFoundError(f"No {PROTOTYPES_FILENAME} in {source!r}. {how}")
        return read_prototypes_file(path)

    def _embedding_dim(self) -> int | None:
        return getattr(self.model.config, "projection_dim", None)

    def _set_prototypes(self, prototypes: torch.Tensor, labels: list[str], metadata: dict) -> None:
        if not isinstance(prototypes, torch.Tensor) or prototypes.ndim != 2:
            shape = tuple(prototypes.shape) if isinstance(prototypes, torch.Tensor) else type(prototypes).__name__
            raise ValueError(f"Class prototypes must be a [num_classes, dim] tensor, got {shape}.")
        if prototypes.shape[0] != len(labels):
            raise ValueError(
                f"{prototypes.shape[0]} class prototypes but {len(labels)} labels; pass one label per prototype row."
            )
        if len(labels) == 0:
            raise ValueError("There are no classes: the prototypes and labels are empty.")
        duplicates = sorted(label for label, count in Counter(labels).items() if count > 1)
        if duplicates:
            raise ValueError(f"Duplicate labels {duplicates}; each class needs a distinct name.")
        dim = self._embedding_dim()
        if dim is not None and prototypes.shape[1] != dim:
            raise ValueError(
                f"The class prototypes have dimension {prototypes.shape[1]} but the model's embeddings have "
                f"dimension {dim}: they were built with another model. Rebuild them with this model."
            )
        id2label = getattr(self.model.config, "id2label", None) or {}
        configured = [id2label.get(i, id2label.get(str(i))) for i in range(len(id2label))]
        if configured and configured != list(labels) and not all(f"LABEL_{i}" == c for i, c in enumerate(configured)):
            logger.warning(
                f"config.id2label {configured} differs from the labels stored with the prototypes {list(labels)}; "
                "the prototype labels are used."
            )
        # Unit rows make the score a cosine even when the caller passes unnormalised class embeddings.
        self.class_prototypes = torch.nn.functional.normalize(prototypes.detach().float(), dim=-1).to(self.device)
        self.labels = [str(label) for label in labels]
        self.prototype_metadata = dict(metadata)

    # ------------------------------------------------------------------------------------------------ pipeline
    def __call__(self, inputs, **kwargs):
        """Classifies one image (a list of `{"label", "score"}`) or a list of images (one such list per image).

        An empty list gives an empty list (the arguments are still checked).
        """
        if isinstance(inputs, (list, tuple)) and len(inputs) == 0:
            self._sanitize_parameters(**{k: v for k, v in kwargs.items() if k not in ("batch_size", "num_workers")})
            return []
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        timeout: float | None = None,
        function_to_apply: str | None = None,
        **kwargs,
    ):
        unknown = sorted(kwargs)
        if unknown:
            raise TypeError(
                f"Unknown arguments {unknown} for {TASK!r}; accepted: top_k, function_to_apply, timeout, batch_size."
            )
        postprocess_params = {}
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
            postprocess_params["top_k"] = top_k
        if function_to_apply is not None:
            if function_to_apply not in SCORE_FUNCTIONS:
                raise ValueError(f"function_to_apply must be one of {SCORE_FUNCTIONS}, got {function_to_apply!r}.")
            postprocess_params["function_to_apply"] = function_to_apply
        return ({"timeout": timeout} if timeout is not None else {}), {}, postprocess_params

    def preprocess(self, image, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """The image processor's model inputs: `pixel_values`, and for SigLIP 2 (NaFlex, images cut into patches
        at their own aspect ratio) also `pixel_attention_mask` and `spatial_shapes`."""
        inputs = self.image_processor(images=[load_image_input(image, timeout=timeout)], return_tensors="pt")
        names = getattr(self.image_processor, "model_input_names", None) or ["pixel_values"]
        return {name: inputs[name] for name in names if name in inputs}

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {**model_inputs, "pixel_values": model_inputs["pixel_values"].to(self.model.dtype)}
        features = self.model.get_image_features(**inputs)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output  # v4 / v5
        if features.shape[-1] != self.class_prototypes.shape[-1]:
            raise ValueError(
                f"The model's image embeddings have dimension {features.shape[-1]} but the class prototypes have "
                f"{self.class_prototypes.shape[-1]}: rebuild the prototypes with this model."
            )
        # fp32 for the similarity: low-precision models would otherwise round scores near 1 together
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return {"logits": self.logit_scale * features @ self.class_prototypes.T + self.logit_bias}

    def postprocess(
        self, model_outputs: dict[str, torch.Tensor], top_k: int = 5, function_to_apply: str = "softmax"
    ) -> list[dict]:
        logits = model_outputs["logits"][0].float()
        if function_to_apply == "softmax":
            logits = logits.softmax(dim=-1)
        elif function_to_apply == "sigmoid":
            logits = logits.sigmoid()
        scores, indices = logits.topk(min(top_k, len(self.labels)))
        return [{"label": self.labels[i], "score": s} for s, i in zip(scores.tolist(), indices.tolist())]

    # ------------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike, remote_code: bool = True, **kwargs) -> None:
        """Saves the model, its processor, the class prototypes and (by default) this pipeline's code.

        The pipeline's model is left as it was: `config.id2label`/`label2id` (set to the prototype labels in the
        saved config) and `config.custom_pipelines` are restored after saving. A peft `PeftModel` (anything with
        `merge_and_unload`) is saved as a plain checkpoint merged from a copy, so the directory has a
        `config.json` and loads with `pipeline(...)`; to save the adapter only, call the model's own
        `save_pretrained`.

        Args:
            save_directory (`str` or `os.PathLike`): the output directory (created if missing).
            remote_code (`bool`, defaults to `True`): also write `remote_pipeline.py` and `config.custom_pipelines`,
                so `pipeline(model=save_directory, trust_remote_code=True)` works without mmft_hf (the task is
                listed as `REMOTE_TASK`, so `import mmft_hf; pipeline("mmft-classification", model=...)` still gets
                the library's class without `trust_remote_code`). With `False` the directory is a plain checkpoint.
            kwargs: passed to `model.save_pretrained` (e.g. `max_shard_size`).
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory!r} is a file; pass a directory.")
        os.makedirs(save_directory, exist_ok=True)
        model = self.model
        if hasattr(model, "merge_and_unload"):  # peft: adapter files alone would have no config.json
            model = copy.deepcopy(model).merge_and_unload()
        config = model.config
        label_maps = {name: getattr(config, name) for name in ("id2label", "label2id")}
        had_custom, previous = hasattr(config, "custom_pipelines"), getattr(config, "custom_pipelines", None)
        try:  # saving must not change the in-memory model's config
            config.id2label = dict(enumerate(self.labels))
            config.label2id = {label: index for index, label in enumerate(self.labels)}
            if remote_code:
                module = REMOTE_MODULE_FILENAME[: -len(".py")]
                config.custom_pipelines = {
                    REMOTE_TASK: {"impl": f"{module}.{REMOTE_CLASS_NAME}", "pt": ["AutoModel"], "type": "multimodal"}
                }
                shutil.copyfile(os.path.abspath(__file__), os.path.join(save_directory, REMOTE_MODULE_FILENAME))
            elif had_custom:
                del config.custom_pipelines
            model.save_pretrained(save_directory, **kwargs)
        finally:
            for name, value in label_maps.items():
                setattr(config, name, value)
            if had_custom:
                config.custom_pipelines = previous
            elif hasattr(config, "custom_pipelines"):
                del config.custom_pipelines
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)
        else:
            for component in (self.tokenizer, self.image_processor):
                if component is not None:
                    component.save_pretrained(save_directory)
        write_prototypes_file(self.class_prototypes, self.labels, save_directory, self.prototype_metadata)
