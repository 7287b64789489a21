"""`cascade serve` with nothing configured: embedded (SQLite, tier workers in the
process, no API key), answering at once."""
from __future__ import annotations

import openai
from helpers.api import Serve
from helpers.portfolios import write_portfolio

from router.core.records import load_dataset


def test_serve_with_nothing_configured_answers_at_once(bench, tmp_path):
    path = write_portfolio(tmp_path / "p.toml", bench, ["llama3.2-3b", "llama3.1-70b"], [-0.3])
    serve = Serve({"CASCADE_HOME": str(tmp_path / "home"), "CASCADE_BROKER_URL": None, "CASCADE_DATABASE_URL": None,
                   "CASCADE_PORTFOLIO": None},
                  path, tmp_path / "serve.log")
    try:
        serve.wait_ready()
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="not-needed", max_retries=0)
        prompt = load_dataset(bench / "rc-mmlu.jsonl.gz").split("test")[0].prompt
        r = client.chat.completions.create(model="cascade/default", messages=[{"role": "user", "content": prompt}])
        assert r.choices[0].message.content and r.model_extra["cascade"]["status"] == "succeeded"
        assert (tmp_path / "home" / "cascade.sqlite").exists()
    except Exception:
        print(serve.output())
        raise
    finally:
        serve.stop()
