"""`make install` puts WordNet where nltk finds it offline, so METEOR's synonym stage really runs."""

from __future__ import annotations

from nltk.corpus import wordnet
from nltk.translate.meteor_score import meteor_score


def test_wordnet_is_installed_and_synonyms_count_in_meteor():
    assert "automobile" in {name for synset in wordnet.synsets("car") for name in synset.lemma_names()}
    # nltk feeds Porter-stemmed leftovers to the synonym stage, so use words that are their own stems.
    reference = [["the", "hound", "is", "red"]]
    synonym = meteor_score(reference, ["the", "dog", "is", "red"])
    unrelated = meteor_score(reference, ["the", "cat", "is", "red"])
    assert synonym > unrelated + 0.1
