"""Captions from a local vision-language model through transformers (`AutoModelForImageTextToText`).

Requests are captioned in batches: one chat-templated conversation per request (image then prompt), left-padded
so every prompt ends at the same column and the new tokens start there for the whole batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import torch

from .base import CaptionRequest, CaptionResult
from .images import prepare_image, strip_thinking


class TransformersCaptioner:
    """Captions images with a local multimodal model, e.g. `Qwen/Qwen3.5-4B` or any LLaVA-style checkpoint.

    The model and processor are loaded once, here (`AutoModelForImageTextToText`, `AutoProcessor`). Thinking is
    turned off (`enable_thinking=False`) for chat templates that have the switch, and any `<think>...</think>` block
    is removed from the answers. Each answer comes with its `finish_reason` (`"length"` when `max_new_tokens` cut
    it); the engine's quality gate never stores an empty, cut or refused answer as a caption, and asks a cut one again
    with a raised limit (`CaptionRequest.max_tokens`: requests with different limits are generated apart).

    Sampling is reproducible: batch `b` of each `caption` call runs under seed `seed + b`, on a forked RNG so the
    caller's global torch RNG state is left alone. Sampled captions still depend on how requests are grouped into
    batches; greedy ones (`do_sample=False`) do not.

    Args:
        model_name_or_path (`str`): a Hub model id or a local directory with model and processor files.
        batch_size (`int`, defaults to 8): requests per `generate` call.
        max_new_tokens (`int`, defaults to 256): the answer's token limit.
        temperature (`float`, defaults to 0.2): sampling temperature (unused when `do_sample=False`).
        do_sample (`bool`, defaults to `True`): sample (the MMFT reference) or decode greedily.
        device (`str` or `torch.device`, *optional*): where to run; defaults to CUDA when available, else CPU.
        torch_dtype (`str` or `torch.dtype`, *optional*): weights dtype, e.g. `torch.float16` (the MMFT reference)
            or `"bfloat16"`; `None` keeps the checkpoint's own dtype (`"auto"`).
        max_image_side (`int`, *optional*, defaults to 768): images are downscaled (never upscaled) so their longer
            side is at most this before the processor sees them; dynamic-resolution models (Qwen-VL) otherwise
            spend thousands of tokens on a large photo. `None` passes them at full size.
        seed (`int`, defaults to 0): the sampling seed.
        revision (`str`, *optional*): the Hub revision (branch, tag or commit) to load.
        trust_remote_code (`bool`, defaults to `False`): passed to `from_pretrained`.
    """

    def __init__(
        self,
        model_name_or_path: str,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 0.2,
        do_sample: bool = True,
        device: str | torch.device | None = None,
        torch_dtype: str | torch.dtype | None = None,
        max_image_side: int | None = 768,
        seed: int = 0,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if do_sample and not temperature > 0:
            raise ValueError(f"Sampling needs temperature > 0, got {temperature}; use do_sample=False for greedy.")
        if max_image_side is not None and max_image_side < 1:
            raise ValueError(f"max_image_side must be a positive number of pixels or None, got {max_image_side}.")
        if isinstance(torch_dtype, str) and torch_dtype != "auto":
            if not isinstance(getattr(torch, torch_dtype, None), torch.dtype):
                raise ValueError(f"Unknown torch_dtype {torch_dtype!r}; use e.g. 'float16', 'bfloat16' or 'auto'.")
            torch_dtype = getattr(torch, torch_dtype)

        self.model_name_or_path = str(model_name_or_path)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.do_sample = do_sample
        self.max_image_side = max_image_side
        self.seed = seed
        self.revision = revision
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        load = dict(revision=revision, trust_remote_code=trust_remote_code)
        self.processor = AutoProcessor.from_pretrained(self.model_name_or_path, **load)
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.model_name_or_path, dtype=torch_dtype or "auto", **load
        )
        self.model.to(self.device).eval()

        template = getattr(self.processor, "chat_template", None)
        if not template:
            raise ValueError(
                f"The processor of {self.model_name_or_path!r} has no chat template; captioning needs one to place "
                "the image and the prompt. Set `processor.chat_template` or use an instruction-tuned checkpoint."
            )
        template_text = template if isinstance(template, str) else json.dumps(template)
        # Only templates that read `enable_thinking` get it: elsewhere transformers would route it to the processor
        # and warn that it is unknown.
        self._template_kwargs = {"enable_thinking": False} if "enable_thinking" in template_text else {}
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_name_or_path={self.model_name_or_path!r}, batch_size={self.batch_size}, "
            f"do_sample={self.do_sample}, temperature={self.temperature}, device={str(self.device)!r}, "
            f"dtype={str(self.model.dtype)!r})"
        )

    @property
    def max_tokens(self) -> int:
        """`max_new_tokens`, under the name of the `TokenLimitedCaptioner` protocol (a request may raise it)."""
        return self.max_new_tokens

    def cache_identity(self) -> dict:
        """Model, weights version, dtype and every generation setting that changes the captions.

        `batch_size` and `device` are left out: greedy captions do not depend on them, and sampled ones differ
        only as two draws of the same distribution do.
        """
        identity = {
            "backend": "transformers",
            "model": self.model_name_or_path,
            "revision": self.revision,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature if self.do_sample else None,
            "seed": self.seed if self.do_sample else None,
            "max_image_side": self.max_image_side,
        }
        commit = getattr(self.model.config, "_commit_hash", None)  # the resolved Hub commit, None for local files
        if commit:
            identity["commit_hash"] = commit
        return identity

    def caption(self, requests: Sequence[CaptionRequest]) -> Iterator[tuple[int, CaptionResult]]:
        """Captions `requests` in batches of `batch_size`, yielding `(index, result)` after each batch.

        Args:
            requests (`Sequence[CaptionRequest]`): the images and full prompts.

        Yields:
            `tuple[int, CaptionResult]`: the index into `requests` and its result, in input order.
        """
        requests = list(requests)
        for index, request in enumerate(requests):
            if not isinstance(request, CaptionRequest):
                raise TypeError(f"requests[{index}] is a {type(request).__name__}, expected a CaptionRequest.")
        for batch_number, start in enumerate(range(0, len(requests), self.batch_size)):
            indices = list(range(start, min(start + self.batch_size, len(requests))))
            images, ready = {}, []
            for index in indices:
                try:
                    images[index] = prepare_image(requests[index].image, self.max_image_side)
                    ready.append(index)
                except (OSError, ValueError) as err:  # an unreadable file fails its own request only
                    yield index, CaptionResult(text=None, error=f"could not prepare the image: {err}", processed=False)
            limits = {index: requests[index].max_tokens or self.max_new_tokens for index in ready}
            for limit in sorted(set(limits.values())):  # one generate call per token limit
                group = [index for index in ready if limits[index] == limit]
                texts, usages, finish_reasons = self._generate(
                    [images[i] for i in group], [requests[i].prompt for i in group], self.seed + batch_number, limit
                )
                for index, text, usage, finish in zip(group, texts, usages, finish_reasons, strict=True):
                    # the answer as generated, with its finish_reason: the engine's quality gate judges it
                    yield index, CaptionResult(text=text, usage=usage, finish_reason=finish, max_tokens=limit)

    def _generate(
        self, images: list, prompts: list[str], seed: int, max_new_tokens: int
    ) -> tuple[list[str], list[dict], list[str]]:
        """Generates one answer per (image, prompt) within `max_new_tokens`; returns the texts, their token usage and
        their finish reason (`"stop"` when the model ended its answer, `"length"` when the limit cut it)."""
        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
            for image, prompt in zip(images, prompts, strict=True)
        ]
        batch = self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            # Left padding: every prompt then ends at the same column, where the new tokens start.
            processor_kwargs={"padding": True, "padding_side": "left"},
            **self._template_kwargs,
        ).to(self.device)
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.do_sample else {"do_sample": False}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            output = self.model.generate(
                **batch, max_new_tokens=max_new_tokens, pad_token_id=self._pad_token_id, **sampling
            )
        prompt_length = batch["input_ids"].shape[1]
        new_tokens = output[:, prompt_length:]
        texts = [strip_thinking(text) for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        completion_tokens = (new_tokens != self._pad_token_id).sum(dim=1).tolist()
        usages = [
            {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
            for p, c in zip(prompt_tokens, completion_tokens, strict=True)
        ]
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        finish_reasons = [
            "stop" if eos & set(row) or len(row) < max_new_tokens else "length" for row in new_tokens.tolist()
        ]
        return texts, usages, finish_reasons
