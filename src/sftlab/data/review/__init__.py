"""`sftlab data review`: read, label, fix and approve training examples in a local web page.

`session.py` holds the examples and their flags, `log.py` the append-only review log,
`app.py` the FastAPI app serving `page.html`, `suggest.py` model-assisted pre-labelling.
"""
