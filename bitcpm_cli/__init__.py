"""bitcpm: toolchain for ternary (1.58-bit) LLMs of the BitCPM-CANN family."""

__version__ = "0.1.0"
