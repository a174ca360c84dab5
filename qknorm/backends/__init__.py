"""Interchangeable implementations of SPEC §4 and the policy choosing between them."""
