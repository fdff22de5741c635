"""Metering: tokens, meters, bills, prices and budgets (pure)."""
