"""Builders and servers shared by the tests (imported as `helpers.<module>`)."""
