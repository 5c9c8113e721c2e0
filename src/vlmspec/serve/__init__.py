"""`vlmspec serve`: an OpenAI-compatible HTTP server over the batched engine (see docs/serving.md).

app.py (routes) · schema.py (request models) · images.py (data URLs, allowed local files, limits) ·
responses.py (OpenAI objects + the vlmspec extension) · pieces.py (per-token text for the web page) ·
metrics.py (Prometheus) · errors.py (OpenAI-shaped 4xx) · config.py (limits) · cli.py · static/index.html
"""
