"""Shared core of Equipoise: settings, database and command line."""
