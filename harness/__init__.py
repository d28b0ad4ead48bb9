"""gvm-harness: from ATOMIC_INC patch files to a jiffies-coherence verdict."""
