"""REDCap-compatible API: a study as a REDCap project (PyCap, REDCapR and redcapAPI work unchanged)."""
