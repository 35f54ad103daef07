"""The electrode-voltage service (BentoML HTTP + gRPC); see docs/serving.md."""

#: Kept equal to pyproject.toml's version (tests/serving/test_openapi.py): the OpenAPI document's
#: ``info.version`` where the package is not installed (a built Bento carries only the source).
__version__ = "0.1.0"
