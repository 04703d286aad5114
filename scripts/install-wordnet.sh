#!/usr/bin/env bash
# Installs WordNet 3.0 for nltk (METEOR's synonym matching) without network access to nltk's servers:
# the database comes from Debian's `wordnet-base` and `wordnet-sense-index` packages (nltk's reader needs
# index.sense too), and nltk also needs a `lexnames` file, which Debian does not ship; its fixed content
# (the 45 lexicographer files of WordNet 3.0) is written here.
set -euo pipefail
target="${1:?usage: install-wordnet.sh TARGET_DIR (e.g. .venv/nltk_data/corpora/wordnet)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
packages=(wordnet-base wordnet-sense-index)
if ! apt-get download "${packages[@]}" >/dev/null 2>&1; then
  # A fresh machine may have no package lists yet.
  apt-get update >/dev/null 2>&1 || true
  apt-get download "${packages[@]}" >/dev/null 2>&1 || {
    echo "error: could not fetch Debian's ${packages[*]} packages with apt-get." >&2
    echo "  METEOR needs WordNet. On a machine with network access to nltk's data server, run:" >&2
    echo "  .venv/bin/python -m nltk.downloader -d .venv/nltk_data wordnet" >&2
    exit 1
  }
fi
for deb in *.deb; do dpkg-deb -x "$deb" root; done
cd - >/dev/null

mkdir -p "$target"
cp "$work"/root/usr/share/wordnet/* "$target"/
names=(adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
  noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive
  noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation
  noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication
  verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception
  verb.possession verb.social verb.stative verb.weather adj.ppl)
: > "$target/lexnames.tmp"
for i in "${!names[@]}"; do
  name="${names[$i]}"
  case "$name" in adj.*) pos=3 ;; adv.*) pos=4 ;; noun.*) pos=1 ;; verb.*) pos=2 ;; esac
  printf '%02d\t%s\t%d\n' "$i" "$name" "$pos" >> "$target/lexnames.tmp"
done
mv "$target/lexnames.tmp" "$target/lexnames"
echo "WordNet installed in $target"
