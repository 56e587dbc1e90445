"""The shape every rendered MMFT model card must have (SetFit style: a regex over the whole README)."""

import re

MODEL_CARD_PATTERN = re.compile(
    r"""\A---
.*base_model: openai/clip-vit-base-patch32
datasets:
- mmft/captioned-dtd
library_name: transformers
license: mit
pipeline_tag: zero-shot-image-classification
tags:
- mmft
- clip
- image-classification
- synthetic-captions
- few-shot
- lora
model-index:
- name: me/mmft-dtd
  results:
  - task:
      type: image-classification
.*      value: 0\.7768
.*---

# me/mmft-dtd

This is an image classifier fine-tuned with \*\*MMFT\*\* .*arXiv 2601\.21426.* library, starting from \[openai/clip-vit-base-patch32\]\(https://huggingface\.co/openai/clip-vit-base-patch32\), trained on \[mmft/captioned-dtd\]\(https://huggingface\.co/datasets/mmft/captioned-dtd\)\.
.*## Model details
.*\| Base model \| openai/clip-vit-base-patch32 \|
\| Captioned dataset \| mmft/captioned-dtd \(domain: textures\) \|
\| Captioner \(MLLM\) \| gemini-2\.5-flash-lite \|
\| Caption types \| visual, shape, texture \|
\| SupCon weight `w` \| 0\.1 \|
\| Shots per class \| 16 \|
\| Seed \| 1 \|
\| Classes \| 3 \|
\| LoRA \| yes \(r=4, lora_alpha=8, merged=True\) \|
.*To differentiate this \{class_name\} photo.*
## Evaluation

Top-1 accuracy on the `test` split: \*\*77\.68 %\*\*\.
.*### Per-class accuracy

!\[Per-class accuracy\]\(per_class_accuracy\.png\)

\| Class \| Accuracy \(%\) \|
\|---\|---\|
\| banded \| 90\.00 \|
\| dotted \| 50\.00 \|
\| zig\\\|zag \| 93\.33 \|
.*## Usage
.*mmft-hf is not on PyPI yet: install it from a checkout of its source
repository \(`pip install \.` in the checkout, or `pip install "mmft-hf @ git\+<repository URL>"`\)\.
.*import mmft_hf  # registers the "mmft-classification" task
.*pipeline\("mmft-classification", model="me/mmft-dtd"\)
.*pipeline\(model="me/mmft-dtd", trust_remote_code=True\)
.*## Training hyperparameters
.*\| learning_rate \| 1e-05 \|
\| num_train_epochs \| 50 \|
.*## Limitations
.*multimodal LLM \(gemini-2\.5-flash-lite\).*
.*averages of the \*training\* captions' embeddings.*
## Framework versions
.*- transformers: \d+\.\d+.*
## Citation

```bibtex
@misc\{enomoto2026mmft,
  title         = \{MultiModal Fine-tuning with Synthetic Captions\},
.*  eprint        = \{2601\.21426\},
.*```
?\Z""",
    flags=re.DOTALL,
)
