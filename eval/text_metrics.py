"""Text metrics of the visual-storytelling paper: METEOR, sentence-embedding similarity, pronouns, word KL.

All four share one tokenizer (:func:`tokenize`), so a caption is split the same way everywhere.

* **METEOR** -- nltk's sentence-level ``meteor_score`` on our tokens, averaged over predictions
  (the paper's ~0.07 is this average, not a corpus-level score).
* **Sentence similarity** -- cosine of sentence-transformers embeddings (the paper's "SRoBERTa" column
  uses a RoBERTa-family model; tests use a packaged all-MiniLM-L6-v2).
* **Pronouns per story** -- a closed list of English personal, possessive and reflexive pronouns
  (:data:`PRONOUNS`), counted as whole words.
* **Word KL** -- KL(P_generated || P_reference) between smoothed word distributions over a shared vocabulary.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import StorypipeError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------

# One token per match, tried left to right:
#   1. a word right before "n't" ("didn't" -> "did", "n't"; "can't" -> "ca", "n't", as Penn Treebank does),
#   2. the clitic "n't" itself,
#   3. the clitics 's 're 've 'll 'd 'm ("she's" -> "she", "'s"),
#   4. a run of letters/digits (any script; underscores are not word characters here),
#   5. any single other non-space character (punctuation: ". , ! ? ' " ( )" ...).
# This matches VIST's pre-tokenised SIS/DII text ("she did n't want the ride to end .").
_TOKEN_RE = re.compile(
    r"[^\W_]+?(?=n't\b)"
    r"|n't"
    r"|'(?:s|re|ve|ll|d|m)\b"
    r"|[^\W_]+"
    r"|[^\w\s]",
)
# Typographic apostrophes/quotes that should behave like their ASCII forms.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def tokenize(text: str) -> list[str]:
    """Split ``text`` into lower-case word and punctuation tokens, deterministically.

    Rules: lower-case; curly apostrophes become ``'``; words are runs of letters/digits; the clitics
    ``n't 's 're 've 'll 'd 'm`` are split off as their own tokens (Penn-Treebank/VIST style); every other
    non-space character is a one-character punctuation token; whitespace and underscores are dropped.

    >>> tokenize("She didn't want the ride to end!")
    ['she', 'did', "n't", 'want', 'the', 'ride', 'to', 'end', '!']
    """
    return _TOKEN_RE.findall(text.translate(_APOSTROPHES).lower())


def words(text: str) -> list[str]:
    """The word tokens of ``text``: :func:`tokenize` without pure-punctuation tokens (clitics are kept)."""
    return [token for token in tokenize(text) if any(char.isalnum() for char in token)]


# ---------------------------------------------------------------------------------------------------------
# METEOR
# ---------------------------------------------------------------------------------------------------------


def meteor(prediction: str, reference: str) -> float:
    """Sentence-level METEOR of one prediction against one reference (nltk, with WordNet synonyms).

    Both strings go through :func:`tokenize`; an empty prediction or reference scores 0.
    """
    from nltk.translate.meteor_score import meteor_score

    # METEOR (Banerjee & Lavie, 2005) via nltk.translate.meteor_score (alpha=0.9, beta=3, gamma=0.5).
    return float(meteor_score([tokenize(reference)], tokenize(prediction)))


def mean_meteor(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean of sentence-level :func:`meteor` over aligned prediction/reference pairs (the paper's number)."""
    _check_pairs(predictions, references)
    return float(np.mean([meteor(p, r) for p, r in zip(predictions, references, strict=True)]))


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    if not predictions:
        raise ValueError("no predictions to score")


# ---------------------------------------------------------------------------------------------------------
# Sentence-embedding similarity
# ---------------------------------------------------------------------------------------------------------

PYTHON_PACKAGE_PREFIX = "python-package:"


def resolve_model_reference(spec: str) -> str:
    """Turn a model spec into something ``SentenceTransformer(...)`` / ``from_pretrained`` can load.

    * ``python-package:NAME`` -> the model folder shipped inside the installed Python package ``NAME``
      (a dash in NAME is read as an underscore, so the PyPI and import names both work). The folder is the
      shallowest directory in the package holding ``modules.json`` (a sentence-transformers model), else
      ``config.json`` (a plain transformers model). The package is located, not imported.
    * anything else (a hub id or a local folder) is returned unchanged.

    Raises :class:`StorypipeError` when the package is not installed or ships no model folder.
    """
    if not spec.startswith(PYTHON_PACKAGE_PREFIX):
        return spec
    name = spec[len(PYTHON_PACKAGE_PREFIX) :].strip().replace("-", "_")
    if not name:
        raise StorypipeError(f"model spec {spec!r} names no package; write it as 'python-package:NAME'")
    try:
        module_spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        module_spec = None
    if module_spec is None or not module_spec.submodule_search_locations:
        raise StorypipeError(
            f"model spec {spec!r}: Python package {name!r} is not installed; install it "
            f"(e.g. `.venv/bin/pip install {name.replace('_', '-')}`) "
            "or give a hub id or model folder instead"
        )
    for marker in ("modules.json", "config.json"):
        found = [
            path.parent
            for root in module_spec.submodule_search_locations
            for path in Path(root).rglob(marker)
        ]
        if found:
            best = min(found, key=lambda folder: (len(folder.parts), str(folder)))
            return str(best)
    raise StorypipeError(
        f"model spec {spec!r}: package {name!r} is installed but ships no model folder (no modules.json or "
        "config.json inside it); reinstall the package or give a hub id or model folder instead"
    )


class SentenceSimilarity:
    """Cosine similarity of sentence-transformers embeddings, pair by pair."""

    def __init__(self, model: SentenceTransformer, batch_size: int = 64) -> None:
        self.model = model
        self.batch_size = batch_size

    @classmethod
    def load(cls, name_or_path: str, device: str = "cpu", batch_size: int = 64) -> SentenceSimilarity:
        """Load a model from a hub id, a local folder, or ``python-package:NAME`` (see
        :func:`resolve_model_reference`)."""
        from sentence_transformers import SentenceTransformer

        reference = resolve_model_reference(name_or_path)
        try:
            model = SentenceTransformer(reference, device=device)
        except OSError as error:
            raise StorypipeError(
                f"could not load sentence model {name_or_path!r} ({error}); give a local model folder, "
                "'python-package:NAME', or a hub id that is downloaded or reachable"
            ) from error
        return cls(model, batch_size=batch_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Raw (unnormalised) embeddings of ``texts``, shape ``(len(texts), dim)``."""
        return np.asarray(
            self.model.encode(
                list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
            )
        )

    def __call__(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        """Cosine similarity of each (prediction, reference) pair, in [-1, 1]; no pairs give ``[]``."""
        if len(predictions) != len(references):
            _check_pairs(predictions, references)
        if not predictions:
            return []
        return cosine_pairs(self.embed(predictions), self.embed(references))


def cosine_pairs(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Row-wise cosine similarity of two equally shaped embedding matrices (computed in float64)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a64.shape != b64.shape or a64.ndim != 2:
        raise ValueError(f"need two (n, dim) matrices of the same shape, got {a64.shape} and {b64.shape}")
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    dots = np.einsum("ij,ij->i", a64, b64)
    # A zero vector has no direction: score it 0 rather than NaN.
    return [float(d / n) if n > 0 else 0.0 for d, n in zip(dots, norms, strict=True)]


# ---------------------------------------------------------------------------------------------------------
# Pronouns
# ---------------------------------------------------------------------------------------------------------

#: English personal (subject and object), possessive (determiner and independent) and reflexive pronouns:
#: the words Penn-Treebank tags PRP / PRP$, as a closed list. Matched as whole lower-cased tokens, so
#: "she'll" counts "she" but "shell", "hero" and "this" count nothing. There is no tagger, so homographs
#: ("US", a coal "mine") count too.
PRONOUNS: frozenset[str] = frozenset(
    {
        # first person
        "i", "me", "my", "mine", "myself",
        "we", "us", "our", "ours", "ourselves",
        # second person
        "you", "your", "yours", "yourself", "yourselves",
        # third person singular
        "he", "him", "his", "himself",
        "she", "her", "hers", "herself",
        "it", "its", "itself",
        # third person plural (and singular they)
        "they", "them", "their", "theirs", "themselves", "themself",
    }
)  # fmt: skip


def count_pronouns(text: str) -> int:
    """Number of whole-word, case-insensitive occurrences of :data:`PRONOUNS` in ``text``."""
    return sum(1 for token in tokenize(text) if token in PRONOUNS)


def pronouns_per_story(stories: Sequence[Sequence[str]]) -> float:
    """Mean over stories of the total pronoun count of each story's captions (paper: SIS 2.73, ours 1.71)."""
    if not stories:
        raise ValueError("no stories to count pronouns in")
    return float(np.mean([sum(count_pronouns(caption) for caption in story) for story in stories]))


# ---------------------------------------------------------------------------------------------------------
# Word-distribution KL
# ---------------------------------------------------------------------------------------------------------

#: Additive smoothing for :func:`word_kl`: 1.0 is Laplace's add-one rule, the textbook parameter-free
#: choice. Any epsilon > 0 keeps KL finite on a shared vocabulary; a small one (1e-6) lets a word the
#: reference never uses dominate the score through log(count / epsilon), while add-one keeps the score
#: driven by words both corpora use. Larger epsilon pulls both distributions toward uniform and KL toward 0.
DEFAULT_KL_EPSILON: float = 1.0


def _word_counts(texts: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(words(text))
    return counts


def word_distribution(texts: Iterable[str], vocabulary: Sequence[str], epsilon: float) -> np.ndarray:
    """Smoothed unigram distribution of ``texts`` over ``vocabulary`` (in its order), as float64.

    ``p[w] = (count[w] + epsilon) / sum_v (count[v] + epsilon)``; words are :func:`words` tokens
    (punctuation excluded) and tokens outside ``vocabulary`` are ignored.
    """
    if not epsilon >= 0 or math.isinf(epsilon):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
    if not vocabulary:
        raise ValueError("empty vocabulary")
    counts = _word_counts(texts)
    # Additive (Lidstone/Laplace) smoothing: epsilon added to every vocabulary count.
    smoothed = np.array([counts[word] for word in vocabulary], dtype=np.float64) + epsilon
    total = smoothed.sum()
    if total <= 0:
        raise ValueError(
            "no vocabulary word occurs in the texts and epsilon is 0: the distribution is undefined"
        )
    return smoothed / total


def word_kl(generated: Sequence[str], reference: Sequence[str], epsilon: float = DEFAULT_KL_EPSILON) -> float:
    """KL(P_generated || P_reference) in nats, between word distributions over the shared vocabulary.

    The vocabulary is the union of both corpora's words; ``epsilon`` (> 0) is added to every count of
    both corpora before normalising (see :data:`DEFAULT_KL_EPSILON`), so the result is finite even for
    disjoint vocabularies. Equals ``scipy.stats.entropy(p_generated, p_reference)`` on those distributions.
    """
    if not epsilon > 0 or math.isinf(epsilon):
        raise ValueError(
            f"epsilon must be a finite number > 0 (KL is infinite without smoothing), got {epsilon}"
        )
    vocabulary = sorted(_word_counts(generated).keys() | _word_counts(reference).keys())
    if not vocabulary:
        raise ValueError("neither corpus contains any word")
    p = word_distribution(generated, vocabulary, epsilon)
    q = word_distribution(reference, vocabulary, epsilon)
    # KL divergence sum_w p(w) * ln(p(w) / q(w)), as scipy.stats.entropy(p, q); p, q > 0 after smoothing.
    return float(np.sum(p * np.log(p / q)))


def top_word_frequencies(texts: Iterable[str], n: int) -> list[tuple[str, float]]:
    """The ``n`` most frequent words of ``texts`` with their relative frequencies (unsmoothed), for plots.

    Frequencies are count / total word count; ties are broken alphabetically so the order is deterministic.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    counts = _word_counts(texts)
    total = sum(counts.values())
    if total == 0:
        return []
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]
    return [(word, count / total) for word, count in ranked]
