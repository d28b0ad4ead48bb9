"""backends/bochs"""
