"""Webhooks: signed notifications of study events to a team's other systems (Standard Webhooks)."""
