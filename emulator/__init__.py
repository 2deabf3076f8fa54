"""lambdaemu: emulate AWS Lambda scaling against a real database."""

__version__ = "0.1.0"
