"""The Hugging Face Space: FP32 and its compressed variants side by side (``python app.py``).

Importing this package switches off Gradio's analytics and the Hub client's telemetry before
either library is imported: the Space makes no request outside its machine.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Requests run in several threads at once, each with its own OpenMP team: idle OpenMP threads must
# sleep rather than spin, or concurrent requests slow each other down many times over (tests/conftest.py).
# Read when torch loads OpenMP, so this package must be imported first (app.py does).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
