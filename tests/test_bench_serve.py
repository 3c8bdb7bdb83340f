"""bench/serve.py runs `impruver serve` and prints requests/s per client count (no timing is asserted)."""

from __future__ import annotations

from test_bench import BENCH, run_bench


def test_serve_bench_reports_each_client_count_and_the_ratio() -> None:
    report = run_bench(str(BENCH / "serve.py"), "--clients", "1,8", "--requests", "1", "--max-tokens", "4",
                       "--width", "32", "--layers", "1")
    assert set(report["results"]) == {"1", "8"}
    for clients, result in report["results"].items():
        assert result["requests"] == int(clients) and result["requests_per_s"] > 0
        # At most 4 tokens a request: a random model may end a reply early with its EOS token.
        ceiling = 4 * result["requests"] / result["seconds"]
        assert 0 < result["tokens_per_s"] <= ceiling * 1.02 + 0.2
    assert report["ratio_8_to_1"] > 0
