"""`icd serve`: a local web page for interactive editing (FastAPI + uvicorn, the optional `web` extra).

- `uploads`: turning uploaded bytes into an RGB image under size limits, with one-line errors;
- `engine`: the model behind a lock (one call at a time), the inversion cache, the live progress;
- `examples`: a few held-out world cases that fill in the page's prompts;
- `app`: the routes and `serve`; `page.html`: the page itself (plain HTML and JavaScript).
"""
