"""Engines turn a generation request into images; each account names one."""
