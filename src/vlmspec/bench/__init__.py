"""`vlmspec bench`: every arm (plain decoding, drafters, Hugging Face peers) on the same samples in one process.

runner (the loop and records.jsonl) → costs (c(k)) → metrics (summary.json, pure functions on records) →
report (report.md and PNG plots). `suites` reads DESIGN-format JSONL suites; `peers` wraps `model.generate`.
Entry point: `vlmspec.bench.runner.run_bench(BenchConfig(...))`.
"""
