"""Silo: a durable background job queue server on SlateDB, speaking Silo's gRPC API."""

__version__ = "0.1.0"
