"""backends/emulated"""
