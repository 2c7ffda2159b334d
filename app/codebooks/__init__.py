"""Codebook revisions: installing a new one, with what it sets off (derived values recomputed)."""
