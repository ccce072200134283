"""Example applications built on wsbroadcast."""
