"""Test-only code shared by the suite: parity harness, fault injection, layering check."""
