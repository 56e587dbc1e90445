"""mmft-hf: MultiModal Fine-Tuning (MMFT) with synthetic captions for the Hugging Face stack.

The public API of the three journeys, imported lazily (PEP 562): `from mmft_hf import caption_dataset` loads the
captioning stage only, never the Trainer, peft or the pipeline machinery.

```python
from mmft_hf import OpenAICompatibleCaptioner, caption_dataset                   # 1. caption a labelled dataset
from mmft_hf import MMFTTrainer, MMFTTrainingArguments, mmft_loss                 # 2. fine-tune
from mmft_hf import pipeline                                                      # 3. classify
classifier = pipeline("mmft-classification", model="outputs/dtd-16shot")
```

Importing the package registers the `"mmft-classification"` pipeline task with transformers: at once when
`transformers.pipelines` is already loaded, otherwise the moment it is (`from transformers import pipeline`), so
that `import mmft_hf` itself stays cheap. `mmft_hf.pipeline` is transformers' `pipeline` function itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

from .version import __version__

# Public name -> the module (under mmft_hf) that defines it.
_EXPORTS = {
    # 1. captioning: labelled images -> a captioned dataset
    "caption_dataset": "captioning.caption",
    "merge_caption_shards": "captioning.caption",
    "CaptioningSummary": "captioning.engine",
    "CaptioningError": "captioning.engine",
    "CaptioningInterrupted": "captioning.engine",
    "CaptionCacheError": "captioning.cache",
    "export_caption_requests": "captioning.offline",
    "import_caption_results": "captioning.offline",
    "caption_stats": "captioning.stats",
    "clip_score": "captioning.stats",
    "dataset_clip_score": "captioning.stats",
    "estimate_captioning_cost": "captioning.stats",
    "CAPTION_TYPES": "captioning.prompts",
    "DOMAINS": "captioning.prompts",
    "PROMPT_TEMPLATE": "captioning.prompts",
    "build_prompt": "captioning.prompts",
    "normalize_class_name": "captioning.prompts",
    "split_sentences": "captioning.sentences",
    "PRESETS": "captioning.builder",
    "CaptionedImages": "captioning.builder",
    "CaptionedImagesConfig": "captioning.builder",
    "push_captioned": "captioning.builder",
    # the captioning backends, their protocol and the errors that stop a run
    "Captioner": "captioning.captioners",
    "CaptionRequest": "captioning.captioners",
    "CaptionResult": "captioning.captioners",
    "OpenAICompatibleCaptioner": "captioning.captioners",
    "OpenAIBatchCaptioner": "captioning.captioners",
    "TransformersCaptioner": "captioning.captioners",
    "CaptionerUnavailableError": "captioning.captioners",
    "CaptionerConnectionError": "captioning.captioners",
    "CaptionerNotAnsweringError": "captioning.captioners",
    "CaptionerServerError": "captioning.captioners",
    "CaptionerAuthenticationError": "captioning.captioners",
    "CaptionerModelNotFoundError": "captioning.captioners",
    # 2. training: a captioned dataset -> a fine-tuned dual encoder
    "MMFTTrainer": "training.trainer",
    "MMFTTrainingArguments": "training.arguments",
    "MMFTDataCollator": "training.collator",
    "sample_few_shot": "training.data",
    "train_validation_split": "training.data",
    "validate_captioned_dataset": "training.data",
    "clip_loss": "training.losses",
    "supcon_loss": "training.losses",
    "mmft_loss": "training.losses",
    "wise_ft": "training.wise_ft",
    # 3. classification: class prototypes -> the "mmft-classification" pipeline, saved and published
    "MMFTClassificationPipeline": "classification.pipeline",
    "build_class_prototypes": "classification.prototypes",
    "load_class_prototypes": "classification.prototypes",
    "save_class_prototypes": "classification.prototypes",
    "zero_shot_prototypes": "classification.prototypes",
    "OPENAI_IMAGENET_TEMPLATES": "classification.prototypes",
    "class_texts_from_captions": "classification.class_texts",
    "prototypes_from_captioned_dataset": "classification.class_texts",
    "save_for_hub": "publishing",
    "publish": "publishing",
    "MMFTModelCardData": "model_card",
    "create_model_card": "model_card",
}

__all__ = ["__version__", "pipeline", *_EXPORTS]

_PIPELINE_MODULE = "mmft_hf.classification.pipeline"  # registers the task when imported
_TRANSFORMERS_PIPELINES = "transformers.pipelines"


def __getattr__(name: str):
    if name == "pipeline":  # transformers' function, never a module of this package
        from transformers import pipeline as value
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _LoaderThenRegister(importlib.abc.Loader):
    """Runs `transformers.pipelines` with its own loader, then registers the task (which needs that module)."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        if any(getattr(getattr(sys.modules[name], "__spec__", None), "_initializing", False) for name in _ours()):
            # loaded from inside an import of this package (e.g. the prototypes importing the Hub copy of the
            # pipeline, which subclasses transformers' `Pipeline`): the pipeline module needs those finished first
            _register_on_first_lookup(module.PIPELINE_REGISTRY)
        else:
            importlib.import_module(_PIPELINE_MODULE)

    def __getattr__(self, name):  # get_source (tracebacks), is_package, get_resource_reader, ...
        return getattr(self.loader, name)


class _RegisterWithPipelines(importlib.abc.MetaPathFinder):
    """Finds `transformers.pipelines` through the other finders and hands it a loader that registers the task."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRANSFORMERS_PIPELINES:
            return None
        sys.meta_path.remove(self)  # once: the task is registered for the life of the process
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _LoaderThenRegister(spec.loader)
                return spec
        return None


def _ours() -> list[str]:
    return [name for name in list(sys.modules) if name.startswith(f"{__name__}.")]


def _register_on_first_lookup(registry) -> None:
    """Registers the task the first time transformers looks a task up (`pipeline()` calls `check_task`)."""
    originals = {name: getattr(registry, name) for name in ("check_task", "get_supported_tasks")}

    def registering_first(name):
        def lookup(*args, **kwargs):
            for attribute in originals:  # back to the registry's own methods
                vars(registry).pop(attribute, None)
            importlib.import_module(_PIPELINE_MODULE)
            return originals[name](*args, **kwargs)

        return lookup

    for name in originals:
        setattr(registry, name, registering_first(name))


def _register_pipeline_task() -> None:
    """Registers `"mmft-classification"` now if transformers' pipeline registry is loaded, else when it is.

    Registering needs `transformers.pipelines` (about 3 s to import, with torch); the registry lives there, so no one
    can ask for the task before that module is loaded.
    """
    if _TRANSFORMERS_PIPELINES in sys.modules:
        importlib.import_module(_PIPELINE_MODULE)
    elif not any(isinstance(finder, _RegisterWithPipelines) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWithPipelines())


_register_pipeline_task()
