"""DVC stage entry points (``python -m pipelines.<stage> ...``): argument parsing, params,
calls into the library, declared outputs. No algorithm code lives here."""
