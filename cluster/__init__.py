"""Kiln on Ray Serve: the same HTTP API, with each launched model a Serve deployment of replicas.

Torch-free on the front (`front`, `ingress`, `placement`, `wire`, `routing`, `serve`): the ingress process never
imports the engine. `replica` is the engine side: one Kiln runner (image or OCR) per Serve replica. Ray itself is
optional (`pip install 'kiln[ray]'`); nothing else in Kiln imports this package.
"""
