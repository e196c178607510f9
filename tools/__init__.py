"""Test- and benchmark-time tools (not part of the installed package; the runtime never imports them)."""
