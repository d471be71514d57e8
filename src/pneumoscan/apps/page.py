"""The web page served at `/`: static/index.html, plain HTML and JavaScript with no build step, talking to the API.

It is a packaged file (pyproject.toml's package-data) so it can be edited, linted and diffed as HTML.
Every figure on it goes through `num` or `pct`, so an undefined one (null) reads "n/a"."""

from importlib.resources import files

# read once, at import: the server answers every request for `/` from memory
PAGE_HTML: str = files(__package__).joinpath("static", "index.html").read_text(encoding="utf-8")
