"""Config presets (`--config=configs/<preset>.py`); importable so presets can share `base`."""
