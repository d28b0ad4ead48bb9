"""Probes: what the guest is asked, over SSH or the serial console."""
