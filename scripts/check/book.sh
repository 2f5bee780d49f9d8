#!/usr/bin/env bash
# The book (docs/): builds it with mdBook into target/book, then checks that
# every relative link and #anchor in docs/src/*.md and README.md resolves
# (scripts/check/book_links.py, against the ids of the pages just built).
# Any broken link fails, each one listed.
#
# mdbook is installed (pinned, --locked) when the pinned version is not
# found; it takes a few minutes to compile once per machine.
set -euo pipefail
cd "$(dirname "$0")/../.."

MDBOOK_VERSION=0.5.4
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin

mdbook=$(command -v mdbook || echo "$cargo_bin/mdbook")
found=$("$mdbook" --version 2>/dev/null || true)
if [[ $found != "mdbook v$MDBOOK_VERSION" ]]; then
  echo "book: installing mdbook $MDBOOK_VERSION, because ${found:-no mdbook} was found (once per machine)" >&2
  cargo install --quiet --locked mdbook --version "$MDBOOK_VERSION"
  mdbook=$cargo_bin/mdbook
fi

out=$PWD/target/book
echo "== $("$mdbook" --version): docs -> target/book"
rm -rf "$out"
"$mdbook" build docs --dest-dir "$out"

echo "== internal links (scripts/check/book_links.py)"
python3 scripts/check/book_links.py --html "$out"
