"""The dashboard's run page shows eval.json as a metric × checkpoint table, not a JSON dump."""

import re

from fastapi.testclient import TestClient
from serve_helpers import ORGANISER_TOKEN, csrf_of

from lmforge.eval.results import CheckpointResults, Result, write_eval_json
from lmforge.serve import create_app
from lmforge.serve.security import SecuritySettings


def test_run_page_shows_one_row_per_metric_and_a_column_per_checkpoint(tmp_path):
    run = tmp_path / "runs" / "done"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("name: done\n")
    checkpoints = []
    for label, shift in (("pretrained", 0.0), ("finetuned", -0.5)):
        results = [
            Result("ppl", "bits_per_byte", 1.5123 + shift, 40, stderr=0.0311),
            Result("ppl", "loss", 1.1 + shift, 40, stderr=0.02),
            Result("translation", "bleu", 12.5 + 10 * shift, 50, ci_low=10.25, ci_high=14.75),
        ]
        checkpoints.append(CheckpointResults(f"{label}: {run}/{label}/step_000010", results))
    write_eval_json(run / "eval" / "eval.json", checkpoints)

    app = create_app(
        tmp_path / "runs",
        db_path=tmp_path / "db.sqlite",
        organiser_token=ORGANISER_TOKEN,
        security=SecuritySettings(allowed_hosts=["testserver"]),  # TestClient's Host
    )
    with TestClient(app) as client:
        csrf = csrf_of(client.get("/login").text)
        client.post("/login", data={"token": ORGANISER_TOKEN, "csrf": csrf})
        page = client.get("/runs/done").text
    table = re.search(r'<table class="compact eval">(.*?)</table>', page, re.S).group(1)
    header = re.findall(r"<th>(.*?)</th>", table)
    assert header == ["task", "metric", "n", "pretrained", "finetuned"]
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
    rows = [r for r in rows if r]
    assert rows == [
        ["ppl", "bits_per_byte", "40", "1.5123 ± 0.0311", "1.0123 ± 0.0311"],
        ["ppl", "loss", "40", "1.1000 ± 0.0200", "0.6000 ± 0.0200"],
        ["translation", "bleu", "50", "12.50 [10.25, 14.75]", "7.5000 [10.2500, 14.7500]"],
    ]
    assert "checkpoints[0]" not in page and ".results[" not in page
