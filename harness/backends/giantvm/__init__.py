"""backends/giantvm"""
