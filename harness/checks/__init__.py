"""Checks: turning probe samples into pass/fail results."""
