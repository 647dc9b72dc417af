"""Regenerate the CrowS-Pairs copy that ships inside lmforge from the original CSV.

    python scripts/package_crows_pairs.py [CSV] [--out FILE]

CSV defaults to $LMFORGE_SHARED_DATA/crows_pairs/crows_pairs_anonymized.csv (the file
of https://github.com/nyu-mll/crows-pairs, see src/lmforge/bias/data/ATTRIBUTION.md);
FILE to src/lmforge/bias/data/crows_pairs.jsonl.gz. Keeps the columns lmforge reads (the
row index as "id", sent_more, sent_less, stereo_antistereo, bias_type), drops the
annotation columns, one JSON object per line, gzipped with no timestamp: the same CSV
always gives the same bytes, so anyone can check the packaged file.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from pathlib import Path

from lmforge.paths import shared_data

FIELDS = ["sent_more", "sent_less", "stereo_antistereo", "bias_type"]
PACKAGED = Path(__file__).resolve().parents[1] / "src/lmforge/bias/data/crows_pairs.jsonl.gz"


def convert(csv_path: Path, out: Path) -> int:
    """Write `out` from `csv_path`; returns the number of pairs."""
    lines = []
    with csv_path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            rec = {"id": row[""], **{k: row[k] for k in FIELDS}}
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    data = "".join(lines).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(data)  # no file name or time in the header: reproducible bytes
    tmp.replace(out)
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_csv = shared_data() / "crows_pairs" / "crows_pairs_anonymized.csv"
    parser.add_argument("csv", nargs="?", type=Path, default=default_csv)
    parser.add_argument("--out", type=Path, default=PACKAGED)
    args = parser.parse_args()
    n = convert(args.csv, args.out)
    print(f"{n} pairs → {args.out}")


if __name__ == "__main__":
    main()
