"""Shared test helpers (moto server, environment)."""
