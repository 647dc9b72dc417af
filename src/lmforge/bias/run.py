"""The bias stage of `lmforge run`: audit every model of the run into ``bias/bias.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.config import Config


def bias_stage(cfg: Config, checkpoints: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    """CrowS-Pairs (and `bias.benchmarks`), probes; later models compared to the first."""
    from lmforge.bias.audit import bias_audit, format_report, write_bias_json
    from lmforge.bias.lexicon import load_lexicon
    from lmforge.bias.probes import load_probe_spec
    from lmforge.train.dist import print0

    b = cfg.bias
    report = bias_audit(
        [str(p) for p in checkpoints.values()],
        b.benchmarks,
        limit=b.limit,
        probes=b.probes,
        lexicon=load_lexicon(b.lexicon or None),
        spec=load_probe_spec(b.probe_spec or None),
        axes=b.axes or None,
        samples=b.samples,
        max_new_tokens=b.max_new_tokens,
        seed=b.seed,
        labels=list(checkpoints),
        log=print0,
    )
    write_bias_json(Path(out_dir) / "bias.json", report)
    print0(format_report(report))
    return {"summary": report["summary"]}
