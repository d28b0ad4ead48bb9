"""hostkvm"""
