"""``bayeslora serve``: an OpenAI-compatible HTTP server returning calibrated confidence with every answer.

* :mod:`.protocol`: pydantic request/response models (OpenAI's schema + marked bayeslora extension fields);
* :mod:`.generation`: decoding with per-token uncertainty, S posterior samples as one batched forward per step;
* :mod:`.service`: the loaded run behind a bounded single-worker queue (no web framework);
* :mod:`.app`: ``create_app(settings, service)``, the FastAPI routes.
"""

from __future__ import annotations

from .service import InferenceService, ServeSettings, base_run

__all__ = ["InferenceService", "ServeSettings", "base_run"]
