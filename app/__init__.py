"""The web app (Gradio): registry.py finds checkpoints and loads models, cards.py describes them,
handlers.py holds the event functions (validation, calls into sampling/), ui.py lays out the page and serves it
(offline: ui.launch sets the environment that keeps gradio from reaching the network).
"""
