"""A small FastAPI app on wsbroadcast: see app.py."""
