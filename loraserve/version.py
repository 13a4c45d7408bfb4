"""The package version, at the bottom floor so the server can report it without importing the package."""
__version__ = "0.1.0"
