"""dreamserve: a self-hosted server for the Dreamina image-generation API."""

__version__ = "0.1.0"
