"""supervisord-llm: a resilient supervisor daemon with a watchdog for local LLM inference servers."""

__version__ = "0.1.0"
