"""Tap stores: the tap schema (names, order, shapes), the store format, and its validation."""
