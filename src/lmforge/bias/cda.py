"""Counterfactual data augmentation (CDA): swap gendered (or other paired) terms.

CDA (Lu et al. 2018, "Gender Bias in Neural Natural Language Processing")
adds to the training data a copy of each selected document in which every term
of a pair list is replaced by its counterpart ("he" ↔ "she", "father" ↔
"mother"), so that the model sees each context with both groups equally often.

Grammar. Most pairs map one to one. English possessives do not:

- "him" → "her"; "hers" → "his".
- "her" is either possessive ("her book" → "his book") or an object ("saw
  her" → "saw him"). Heuristic: when the next word is a content word (noun or
  adjective, i.e. not a closed-class word, not an "-ly" adverb, not
  punctuation/end) it is possessive → "his"; otherwise → "him".
- "his" is either a determiner ("his book" → "her book") or a pronoun ("the
  book is his" → "hers"), decided by the same next-word test.

The heuristic is cheap and right in the common cases; it errs on double-object
verbs ("gave her flowers" → "gave his flowers"). Capitalisation is kept
("He" → "She", "HIS" → "HER"). Names are swapped only when asked
(`names=True`) and only where they are capitalised (so "will" and "mark" as
ordinary words are never touched).

`CounterfactualAugmentStep` is the pipeline step: it augments a fraction
`ratio` of the documents, chosen by a hash of (seed, id) so every run and
executor picks the same ones, either adding the swapped copy next to the
original (``mode="add"``, the usual CDA) or replacing the original
(``mode="replace"``, CDA's "counterfactual data substitution" variant of
Maudslay et al. 2019, which keeps the corpus size). The copy keeps the
original's id, so the tokenizer puts both in the same train/validation split.
It runs after deduplication (a swapped copy is a near-duplicate by design).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

from lmforge.bias.lexicon import Lexicon
from lmforge.data.document import Document
from lmforge.data.steps import DropHook, Step

# fmt: off
# Closed-class words and common adverbs: after "her"/"his" they mean no noun phrase
# follows ("told her that", "saw her again", "a friend of his and ...").
FUNCTION_WORDS = frozenset(
    [
        "a", "an", "the", "this", "that", "these", "those", "my", "your", "his", "her", "its",
        "our", "their", "some", "any", "no", "every", "each", "all", "both", "either",
        "neither", "another", "such", "what", "which", "whose", "who", "whom", "whoever",
        "whatever", "to", "in", "on", "at", "by", "for", "from", "with", "of", "about", "into",
        "onto", "over", "under", "after", "before", "through", "during", "up", "down", "out",
        "off", "away", "back", "again", "as", "like", "than", "upon", "across", "along",
        "among", "around", "behind", "beside", "besides", "between", "beyond", "near",
        "towards", "toward", "till", "until", "within", "without", "against", "above", "below",
        "per", "via", "and", "or", "but", "nor", "so", "yet", "if", "then", "when", "while",
        "because", "though", "although", "since", "unless", "whether", "where", "wherever",
        "whenever", "once", "i", "you", "he", "she", "it", "we", "they", "me", "him", "us",
        "them", "myself", "yourself", "himself", "herself", "itself", "is", "was", "be", "been",
        "being", "are", "were", "am", "do", "does", "did", "done", "had", "has", "have",
        "having", "will", "would", "could", "should", "may", "might", "must", "can", "shall",
        "not", "never", "always", "also", "too", "very", "now", "here", "there", "yesterday",
        "today", "tomorrow", "tonight", "twice", "well", "much", "more", "most", "less",
        "least", "soon", "still", "just", "only", "ever", "already", "almost", "even", "quite",
        "rather", "perhaps", "indeed", "however", "therefore", "thus", "anyway", "somewhere",
        "everywhere", "nowhere"
    ]
)
# "-ly" words that are adjectives, so "her lovely face" stays possessive.
LY_ADJECTIVES = frozenset(
    [
        "lovely", "lonely", "only", "early", "ugly", "holy", "silly", "jolly", "elderly",
        "friendly", "curly", "lively", "lowly", "costly", "deadly", "kindly", "likely", "manly",
        "womanly", "motherly", "fatherly", "sisterly", "brotherly", "homely", "stately",
        "surly", "wily", "orderly", "cowardly", "beastly", "ghastly", "heavenly", "worldly",
        "daily", "weekly", "yearly", "comely", "gentlemanly", "ladylike", "timely"
    ]
)
# fmt: on

_WORD = re.compile(r"[A-Za-z]+")


def _next_word(text: str, end: int) -> str:
    """The word right after position `end`, or "" if punctuation or the end comes first."""
    i = end
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    m = _WORD.match(text, i)
    return m.group(0).lower() if m else ""


def starts_noun_phrase(word: str) -> bool:
    """Crude POS test: is `word` (lowercase) a content word (noun/adjective)?"""
    if not word or word in FUNCTION_WORDS:
        return False
    return not (word.endswith("ly") and word not in LY_ADJECTIVES)


def match_case(replacement: str, original: str) -> str:
    """`replacement` in the letter case of `original` (lower, Title or UPPER)."""
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


class Swapper:
    """Swaps the paired terms of the chosen axes in a text (see the module docstring)."""

    # Pronoun forms resolved by grammar rather than by the pair list.
    PRONOUNS = ("her", "his", "him", "hers")

    def __init__(self, lexicon: Lexicon, axes: Sequence[str] = ("gender",), names: bool = False):
        unknown = [a for a in axes if a not in lexicon.pairs]
        if unknown:
            raise ValueError(
                f"CDA axes {unknown} have no pair list in the lexicon "
                f"(known: {', '.join(sorted(lexicon.pairs)) or 'none'})"
            )
        self.mapping: dict[str, str] = {}
        self.name_keys: set[str] = set()
        sources = [(lexicon.pairs[a], False) for a in axes]
        if names:
            sources += [(lexicon.names.get(a, []), True) for a in axes]
        for pairs, is_name in sources:
            for a, b in pairs:
                for x, y in ((a, b), (b, a)):
                    if x in self.PRONOUNS:
                        continue
                    self.mapping[x] = y
                    if is_name:
                        self.name_keys.add(x)
        self.gendered_pronouns = "gender" in axes
        keys = list(self.mapping) + (list(self.PRONOUNS) if self.gendered_pronouns else [])
        # Longest first so two-word terms win over their first word.
        alternatives = "|".join(
            re.escape(k).replace(r"\ ", r"\s+") for k in sorted(keys, key=len, reverse=True)
        )
        self.pattern = re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE) if keys else None

    def _replace(self, original: str, text: str, end: int) -> str:
        key = " ".join(original.lower().split())
        if self.gendered_pronouns and key in self.PRONOUNS:
            if key == "him":
                target = "her"
            elif key == "hers":
                target = "his"
            elif key == "her":
                target = "his" if starts_noun_phrase(_next_word(text, end)) else "him"
            else:  # his
                target = "her" if starts_noun_phrase(_next_word(text, end)) else "hers"
        else:
            if key in self.name_keys and not original[:1].isupper():
                return original
            target = self.mapping[key]
        return match_case(target, original)

    def swap(self, text: str) -> tuple[str, Counter[str]]:
        """The counterfactual text and counts of the swaps made ("her→his": 3, ...)."""
        counts: Counter[str] = Counter()
        if self.pattern is None:
            return text, counts

        def sub(m: re.Match[str]) -> str:
            new = self._replace(m.group(0), text, m.end())
            if new != m.group(0):
                counts[f"{m.group(0).lower()}→{new.lower()}"] += 1
            return new

        return self.pattern.sub(sub, text), counts


def selected(doc_id: str, ratio: float, seed: int) -> bool:
    """Deterministic draw: True for about `ratio` of the ids (hash of seed and id)."""
    if ratio >= 1.0:
        return True
    if ratio <= 0.0:
        return False
    h = hashlib.blake2b(f"cda:{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < ratio


class CounterfactualAugmentStep(Step):
    """Pipeline step: CDA on a fraction `ratio` of the documents, adding or replacing."""

    name = "cda"

    def __init__(
        self,
        lexicon: Lexicon,
        ratio: float = 1.0,
        mode: str = "add",
        axes: Sequence[str] = ("gender",),
        names: bool = False,
        seed: int = 0,
        on_drop: DropHook | None = None,
    ):
        super().__init__(on_drop)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"cda ratio = {ratio} must be in [0, 1]")
        if mode not in ("add", "replace"):
            raise ValueError(f"cda mode = {mode!r} is not 'add' or 'replace'")
        self.swapper = Swapper(lexicon, axes, names)
        self.ratio, self.mode, self.seed = ratio, mode, seed

    def augment(self, doc: Document) -> Document | None:
        """The counterfactual of `doc` (a new Document), or None if it has no paired term."""
        text, counts = self.swapper.swap(doc.text)
        if not counts:
            return None
        self.stats.counters["swaps"] += sum(counts.values())
        for k, v in counts.items():
            self.stats.counters[f"swap:{k}"] += v
        return Document(doc.id, text, doc.source, doc.license, {**doc.meta, "cda": self.mode})

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        st = self.stats
        for doc in docs:
            t0 = time.process_time()
            st.add_in(doc)
            out = [doc]
            key = f"{doc.id}#{doc.meta.get('repeat', 0)}"
            if selected(key, self.ratio, self.seed):
                st.counters["documents_selected"] += 1
                cf = self.augment(doc)
                if cf is None:
                    st.counters["documents_without_terms"] += 1
                elif self.mode == "add":
                    out.append(cf)
                    st.counters["documents_added"] += 1
                else:
                    out = [cf]
                    st.counters["documents_replaced"] += 1
            for d in out:
                st.add_out(d)
            st.seconds += time.process_time() - t0
            yield from out

    def process(self, doc: Document) -> Document | str:  # pragma: no cover - run instead
        raise NotImplementedError


def augment_documents(
    docs: Iterable[Document],
    lexicon: Lexicon | None = None,
    ratio: float = 1.0,
    mode: str = "add",
    axes: Sequence[str] = ("gender",),
    names: bool = False,
    seed: int = 0,
) -> Iterator[Document]:
    """CDA outside the pipeline (e.g. on `data.sources` documents)."""
    step = CounterfactualAugmentStep(lexicon or Lexicon(), ratio, mode, axes, names, seed)
    yield from step(docs)
