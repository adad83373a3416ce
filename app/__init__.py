"""The web app (Gradio): registry.py finds checkpoints and loads models, cards.py describes them,
handlers.py holds the event functions (validation, calls into models/), ui.py lays out the page.

No outbound network: telemetry, version checks and hub access are switched off here, before
anything imports gradio.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["DO_NOT_TRACK"] = "1"
