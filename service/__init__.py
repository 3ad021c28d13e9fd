"""Parley: an AI assistant behind a phone number and an email address."""

__version__ = "0.1.0"
