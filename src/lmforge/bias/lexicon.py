"""Word lists for bias statistics, counterfactual augmentation and template probes.

Everything here is a plain, editable list written by us for lmforge. A user
replaces any part with a YAML or JSON file of the same shape (``load_lexicon``);
``lmforge bias --dump-lexicon FILE`` writes the defaults as a starting point.

Shape of a lexicon file (every key optional; a given key replaces the default)::

    groups:          # demographic term groups, by axis: {axis: {group: [terms]}}
      gender: {male: [he, him, ...], female: [she, her, ...]}
      religion: {christian: [...], muslim: [...], ...}
    pairs:           # counterfactual swaps, by axis: [[a, b], ...] (swapped both ways)
      gender: [[he, she], [man, woman], ...]
    names:           # optional name swaps (used only when CDA is asked to swap names)
      gender: [[john, mary], ...]
    occupations: [doctor, nurse, ...]
    sentiment: {positive: [...], negative: [...]}
    adjectives: [...]   # traits used by the template probes
    demonyms: {nationality: {american: [...], ...}}   # (a group axis like any other)

Sources and limitations (please read before trusting a number):

- Gender terms: the usual English gendered pronouns, kinship and address terms,
  in the spirit of the swap lists of Lu et al. 2018 ("Gender Bias in Neural
  Natural Language Processing", CDA) and Zhao et al. 2018 (WinoBias); written
  anew here, not copied. The gender axis is binary because English pronoun
  swaps are; non-binary identities are not represented by a swap, and "they" is
  deliberately left out (it is mostly plural).
- "her" is ambiguous (his / him); CDA resolves it with a next-word heuristic
  (see `lmforge.bias.cda`), which is right for the common cases and wrong for
  some (e.g. "gave her flowers" becomes "gave his flowers").
- Religion, nationality, race and age groups are short lists of identity terms
  (adjective and noun forms). They count mentions; they do not detect who a text
  is about, sarcasm, quotation or negation.
- Occupations: common English job titles, a subset of the occupations used in
  WinoBias (from the US Bureau of Labor Statistics categories) plus everyday
  ones. Gendered job titles (actress, waiter/waitress) are swap pairs instead.
- Sentiment words: short general-purpose lists of clearly positive and
  negative adjectives/nouns, chosen by us; far smaller and cruder than lexicons
  such as the Hu & Liu (2004) opinion lexicon or VADER. A continuation's
  sentiment score is (positive − negative) word counts; it ignores negation.
- Everything is lowercase English; matching is case-insensitive on word
  boundaries, single words or two-word phrases.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lmforge.fileio import write_text_atomic

# fmt: off
# (a, b) swap pairs for gender. Ambiguous forms ("her", "his") are handled by
# `lmforge.bias.cda` with a grammatical heuristic, so they are not listed here.
GENDER_PAIRS: list[list[str]] = [
    ["he", "she"],
    ["himself", "herself"],
    ["man", "woman"],
    ["men", "women"],
    ["boy", "girl"],
    ["boys", "girls"],
    ["gentleman", "lady"],
    ["gentlemen", "ladies"],
    ["father", "mother"],
    ["fathers", "mothers"],
    ["dad", "mom"],
    ["daddy", "mommy"],
    ["papa", "mama"],
    ["son", "daughter"],
    ["sons", "daughters"],
    ["brother", "sister"],
    ["brothers", "sisters"],
    ["husband", "wife"],
    ["husbands", "wives"],
    ["uncle", "aunt"],
    ["uncles", "aunts"],
    ["nephew", "niece"],
    ["nephews", "nieces"],
    ["grandfather", "grandmother"],
    ["grandson", "granddaughter"],
    ["king", "queen"],
    ["kings", "queens"],
    ["prince", "princess"],
    ["princes", "princesses"],
    ["sir", "madam"],
    ["mr", "mrs"],
    ["male", "female"],
    ["males", "females"],
    ["masculine", "feminine"],
    ["boyfriend", "girlfriend"],
    ["groom", "bride"],
    ["widower", "widow"],
    ["actor", "actress"],
    ["actors", "actresses"],
    ["waiter", "waitress"],
    ["steward", "stewardess"],
    ["hero", "heroine"],
    ["monk", "nun"],
    ["fiance", "fiancee"],
    ["bachelor", "spinster"],
    ["businessman", "businesswoman"],
    ["chairman", "chairwoman"],
    ["spokesman", "spokeswoman"],
    ["policeman", "policewoman"],
    ["gods", "goddesses"],
]

# Optional: frequent English given names, paired arbitrarily (same rough period/frequency).
GENDER_NAMES: list[list[str]] = [
    ["john", "mary"],
    ["james", "elizabeth"],
    ["william", "anne"],
    ["robert", "margaret"],
    ["michael", "sarah"],
    ["david", "jennifer"],
    ["thomas", "emily"],
    ["charles", "jane"],
    ["george", "emma"],
    ["henry", "alice"],
]

GROUPS: dict[str, dict[str, list[str]]] = {
    "gender": {
        "male": [
            "he", "him", "his", "himself", "man", "men", "boy", "boys", "gentleman",
            "gentlemen", "father", "fathers", "dad", "son", "sons", "brother", "brothers",
            "husband", "husbands", "uncle", "nephew", "grandfather", "king", "prince",
            "lord", "sir", "mr", "male", "boyfriend", "widower", "groom",
        ],
        "female": [
            "she", "her", "hers", "herself", "woman", "women", "girl", "girls", "lady",
            "ladies", "mother", "mothers", "mom", "daughter", "daughters", "sister",
            "sisters", "wife", "wives", "aunt", "niece", "grandmother", "queen",
            "princess", "madam", "mrs", "female", "girlfriend", "widow", "bride",
        ],
    },
    "religion": {
        "christian": ["christian", "christians", "church", "priest", "catholic", "protestant"],
        "jewish": ["jew", "jews", "jewish", "synagogue", "rabbi"],
        "muslim": ["muslim", "muslims", "islam", "islamic", "mosque", "imam"],
        "hindu": ["hindu", "hindus", "hinduism"],
        "buddhist": ["buddhist", "buddhists", "buddhism"],
        "atheist": ["atheist", "atheists", "atheism"],
    },
    "nationality": {
        "american": ["american", "americans"],
        "british": ["british", "english", "englishman", "englishmen"],
        "french": ["french", "frenchman", "frenchmen"],
        "german": ["german", "germans"],
        "italian": ["italian", "italians"],
        "russian": ["russian", "russians"],
        "chinese": ["chinese"],
        "indian": ["indian", "indians"],
        "mexican": ["mexican", "mexicans"],
        "african": ["african", "africans"],
    },
    "race": {
        "black": ["black people", "black man", "black woman", "african american"],
        "white": ["white people", "white man", "white woman", "caucasian"],
        "asian": ["asian", "asians"],
        "hispanic": ["hispanic", "hispanics", "latino", "latina"],
    },
    "age": {
        "young": ["young", "youth", "teenager", "teenagers", "child", "children"],
        "old": ["old", "elderly", "aged", "pensioner", "retiree"],
    },
}

OCCUPATIONS: list[str] = [
    "doctor", "physician", "surgeon", "nurse", "lawyer", "judge", "teacher", "professor",
    "engineer", "scientist", "programmer", "developer", "accountant", "banker", "manager",
    "secretary", "receptionist", "clerk", "cashier", "librarian", "hairdresser", "housekeeper",
    "cook", "chef", "baker", "farmer", "carpenter", "mechanic", "plumber", "electrician",
    "builder", "labourer", "laborer", "driver", "pilot", "sailor", "soldier", "officer",
    "captain", "guard", "sheriff", "detective", "firefighter", "dancer", "singer", "painter",
    "artist", "writer", "author", "poet", "journalist", "editor", "designer", "architect",
    "pharmacist", "dentist", "therapist", "psychologist", "ceo", "president", "politician",
    "senator", "minister", "priest", "merchant", "servant", "maid", "governess", "tailor",
    "seamstress", "nanny", "janitor", "cleaner", "assistant", "attendant", "counselor",
    "auditor", "analyst", "supervisor", "physicist", "chemist", "mathematician", "economist",
]

SENTIMENT: dict[str, list[str]] = {
    "positive": [
        "good", "great", "excellent", "kind", "gentle", "honest", "brave", "clever",
        "intelligent", "brilliant", "wise", "happy", "joyful", "beautiful", "lovely",
        "wonderful", "generous", "loyal", "admirable", "successful", "strong", "calm",
        "trustworthy", "friendly", "caring", "respected", "talented", "capable", "polite",
        "cheerful", "love", "loved", "hope", "peace", "pleasant", "delightful", "noble",
    ],
    "negative": [
        "bad", "terrible", "awful", "cruel", "dishonest", "cowardly", "stupid", "foolish",
        "ignorant", "lazy", "angry", "violent", "dangerous", "ugly", "wicked", "evil",
        "selfish", "greedy", "weak", "hysterical", "emotional", "dirty", "criminal",
        "rude", "hateful", "nasty", "miserable", "poor", "sad", "hate", "hated", "fear",
        "guilty", "incompetent", "unreliable", "aggressive", "lying",
    ],
}

# Trait adjectives for the template probes ("The <group> person is <adjective>.").
ADJECTIVES: list[str] = [
    "intelligent", "emotional", "strong", "weak", "lazy", "hardworking", "violent",
    "gentle", "rational", "hysterical", "honest", "dishonest", "competent", "incompetent",
    "aggressive", "caring", "rich", "poor", "dangerous", "trustworthy",
]

# fmt: on


@dataclass
class Lexicon:
    """The word lists used by the bias stage (see the module docstring)."""

    groups: dict[str, dict[str, list[str]]] = field(default_factory=lambda: copy.deepcopy(GROUPS))
    pairs: dict[str, list[list[str]]] = field(
        default_factory=lambda: {"gender": copy.deepcopy(GENDER_PAIRS)}
    )
    names: dict[str, list[list[str]]] = field(
        default_factory=lambda: {"gender": copy.deepcopy(GENDER_NAMES)}
    )
    occupations: list[str] = field(default_factory=lambda: list(OCCUPATIONS))
    sentiment: dict[str, list[str]] = field(default_factory=lambda: copy.deepcopy(SENTIMENT))
    adjectives: list[str] = field(default_factory=lambda: list(ADJECTIVES))
    source: str = "builtin"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}


_KEYS = ("groups", "pairs", "names", "occupations", "sentiment", "adjectives")


def _check_words(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(w, str) and w.strip() for w in value):
        raise ValueError(f"{where} should be a list of non-empty strings")
    return [" ".join(w.lower().split()) for w in value]


def lexicon_from_dict(data: dict[str, Any], where: str = "lexicon") -> Lexicon:
    """Validate a lexicon mapping (from YAML/JSON); keys not given keep the defaults."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a lexicon file holds a mapping with keys {', '.join(_KEYS)}")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {', '.join(_KEYS)}")
    lex = Lexicon(source=where)
    for key in ("groups",):
        if key in data:
            axes = data[key]
            if not isinstance(axes, dict):
                raise ValueError(f"{where}: {key} should map axis → {{group: [terms]}}")
            lex.groups = {
                str(axis): {
                    str(g): _check_words(terms, f"{where}: {key}.{axis}.{g}")
                    for g, terms in (groups or {}).items()
                }
                for axis, groups in axes.items()
            }
    for key in ("pairs", "names"):
        if key in data:
            axes = data[key]
            if not isinstance(axes, dict):
                raise ValueError(f"{where}: {key} should map axis → [[a, b], ...]")
            out: dict[str, list[list[str]]] = {}
            for axis, pairs in axes.items():
                checked = []
                for i, pair in enumerate(pairs or []):
                    words = _check_words(pair, f"{where}: {key}.{axis}[{i}]")
                    if len(words) != 2:
                        raise ValueError(f"{where}: {key}.{axis}[{i}] = {pair!r} is not a pair")
                    checked.append(words)
                out[str(axis)] = checked
            setattr(lex, key, out)
    if "occupations" in data:
        lex.occupations = _check_words(data["occupations"], f"{where}: occupations")
    if "adjectives" in data:
        lex.adjectives = _check_words(data["adjectives"], f"{where}: adjectives")
    if "sentiment" in data:
        s = data["sentiment"]
        if not isinstance(s, dict) or set(s) - {"positive", "negative"}:
            raise ValueError(f"{where}: sentiment should have keys positive and negative")
        lex.sentiment = {k: _check_words(v, f"{where}: sentiment.{k}") for k, v in s.items()}
    return lex


def load_lexicon(path: str | Path | None = None) -> Lexicon:
    """The built-in lexicon, or one read from a YAML or JSON file (see the docstring)."""
    if not path:
        return Lexicon()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lexicon file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # report the file, whatever the parser
        raise ValueError(f"{path}: cannot parse lexicon: {exc}") from None
    return lexicon_from_dict(data or {}, str(path))


def dump_lexicon(lex: Lexicon, path: str | Path) -> None:
    path = Path(path)
    data = lex.to_dict()
    if path.suffix.lower() == ".json":
        write_text_atomic(path, json.dumps(data, indent=1) + "\n")
    else:
        import yaml

        write_text_atomic(path, yaml.safe_dump(data, sort_keys=False, width=100))
